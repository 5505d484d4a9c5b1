"""Find, read and check OpenELM checkpoints: Hugging Face folders or repos, Apple's corenet
MLX export, and this toolkit's own MLX folders. Only safetensors are read, never pickles or code."""

import os
import struct
from math import prod
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import OpenELMConfig
from .errors import OpenELMError
from .files import each, field_problem, integer, is_repo_id, obj, one_of, open_regular, parse_json, read_json, shown
from .model import Model

INDEX = "model.safetensors.index.json"
# What is fetched from the Hub: never *.py (remote code) nor *.bin (pickles).
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    INDEX,
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
CORENET_VOCAB = 32128  # corenet pads the training vocabulary; the tokenizer has 32000 pieces
# The dtypes an OpenELM checkpoint stores (U32: packed quantized weights) and their sizes.
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4}
# The safetensors reference implementation's cap on a header, checked before it is read.
MAX_HEADER_BYTES = 100_000_000
TENSOR_RULES = {
    "dtype": one_of(*DTYPE_SIZES),
    "shape": each(integer(0, 2**31 - 1)),  # MLX's dimensions are 32-bit
    "data_offsets": each(integer(0, 2**63)),
}


def resolve_source(source) -> Path:
    """A local checkpoint folder, or a Hugging Face repo id downloaded into the Hub cache. Only
    `owner/name` is a repo id; anything else that does not exist ('./typo', '~/x', 'a/b/c')
    is a missing folder."""
    path = Path(str(source)).expanduser()
    other = what_else(path)  # a package, a run folder, a single file: say what to pass instead
    if other:
        raise OpenELMError(f"{source} is {other}")
    if path.is_dir():
        return path
    if os.path.lexists(path):
        raise OpenELMError(f"{source} is not a folder: pass the folder that holds config.json and the weights")
    if not is_repo_id(str(source)):
        raise OpenELMError(
            f"no model folder at '{source}': give the path of a checkpoint folder, or a Hugging Face repo id like "
            "apple/OpenELM-270M (`openelm models` lists the released ones)"
        )
    return _download(str(source))


def what_else(path: Path) -> Optional[str]:
    """What `path` is when it is something other than a checkpoint folder that the toolkit makes or
    reads, with what to pass instead; None for anything else (a checkpoint folder, a missing path)."""
    parent = path.parent if str(path.parent) != "." else "the folder that holds it"
    suffix, folder_only = path.suffix.lower(), path.is_dir() and not os.path.lexists(path / "config.json")
    if suffix in (".aimodel", ".aimodelc") or (folder_only and (path / "metadata.json").is_file()):
        return (
            "a Core AI model (export-coreai), not a model folder: run its bundle folder with --backend coreai, "
            "or pass the model folder it was exported from"
        )
    if suffix in (".mlpackage", ".mlmodel", ".mlmodelc"):
        return (
            "a Core ML model (export-coreml), not a model folder: run an .mlpackage with --backend coreml "
            "(macOS) or --backend mil-reference, or pass the model folder it was exported from"
        )
    if folder_only and (path / "model" / "config.json").is_file():
        return f"a training run folder (openelm train): its model is {path / 'model'}, pass that"
    if not path.is_file():
        return None
    if suffix == ".gguf":
        return "a GGUF file (llama.cpp's format): openelm-mlx reads safetensors checkpoint folders, such as apple/OpenELM-270M"
    if suffix in (".safetensors", ".json"):
        return f"not a folder: pass {parent}, the folder that holds config.json and the weights"
    if path.name == "tokenizer.model" or suffix == ".model":
        return "a tokenizer, not a model: pass the model folder instead (and this file with --tokenizer)"
    return None


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    neither = f"no model folder at '{repo_id}', and cannot download '{repo_id}' from the Hugging Face Hub"
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise OpenELMError(
            f"{neither}: offline and not in the local cache ({type(e).__name__}); "
            "check the path, or connect to the network"
        ) from None
    except HfHubHTTPError as e:
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise OpenELMError(
            f"{neither}: {first_line}; check the path, or the repo id and your access (hf auth login)"
        ) from None
    except OSError as e:
        raise OpenELMError(f"{neither}: {e}") from None


def weight_files(folder: Path) -> Dict[Path, Optional[set]]:
    """The safetensors files of a checkpoint folder, each with the tensors its index lists in it
    (None without an index), in the order the index names them."""
    index = folder / INDEX
    if os.path.lexists(index):
        files: Dict[Path, set] = {}
        for tensor, name in read_index(index).items():
            files.setdefault(folder / name, set()).add(tensor)
        missing = [f.name for f in files if not os.path.lexists(f)]
        if missing:
            raise OpenELMError(
                f"{index.name} names shards that are not in {folder}: {', '.join(missing)}; finish the download"
            )
        return files
    for name in ("model.safetensors", "weights.safetensors"):
        if os.path.lexists(folder / name):
            return {folder / name: None}
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return dict.fromkeys(shards)
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise OpenELMError(
            f"{folder} holds only PyTorch pickle weights (.bin/.pt); openelm-mlx reads safetensors only, "
            "since loading pickles can run arbitrary code: use the repo's model.safetensors"
        )
    raise OpenELMError(f"no *.safetensors weights in {folder}")


def read_index(index: Path) -> Dict[str, str]:
    """tensor name -> shard of a model.safetensors.index.json. A shard must be a .safetensors file
    in the index's own folder: no '..', no absolute path, no subfolder. (The shard itself may be
    a link, as the Hub cache makes them: snapshots/REV/x.safetensors -> ../../blobs/SHA.)"""
    raw = read_json(index)
    if not isinstance(raw, dict):
        problem = f"must hold a JSON object, got {shown(raw)}"
    else:
        weight_map = raw.get("weight_map")
        problem = field_problem(raw, {"weight_map": obj, "metadata": obj})
        problem = problem or (None if weight_map else "field 'weight_map' is missing or empty")
    if problem is None:
        bad = ((k, shard_problem(v)) for k, v in weight_map.items())
        problem = next((f"field 'weight_map' entry '{k}' {why}" for k, why in bad if why), None)
    if problem:
        raise OpenELMError(f"{index}: {problem}: download the index again")
    return weight_map


def shard_problem(name) -> Optional[str]:
    """Why an index may not name `name` as a shard, or None."""
    if not isinstance(name, str) or not name.endswith(".safetensors"):
        return f"must name a .safetensors file, got {shown(name)}"
    if "/" in name or "\\" in name or "\0" in name or name.startswith("."):
        return f"names {name!r}, but a shard must be a file in the index's own folder"
    return None


def read_header(
    path: Path, fix: str = "download or convert it again", dtypes: Dict[str, int] = DTYPE_SIZES
) -> Dict[str, dict]:
    """The tensors a safetensors file declares (name -> dtype, shape, data_offsets), checked as
    the format defines them before MLX reads any data: a header within the file and the cap,
    known dtypes, whole dimensions, offsets that match each shape and tile the data exactly.
    `fix`: what the error tells the user to do; `dtypes`: the ones allowed, with their sizes."""
    rules = {**TENSOR_RULES, "dtype": one_of(*dtypes)}

    def fail(why):
        raise OpenELMError(f"{path} {why}: {fix}")

    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if header_len is None or header_len > min(size - 8, MAX_HEADER_BYTES):
            claim = "no header" if header_len is None else f"a {header_len:,}-byte header"
            fail(f"is not a safetensors file or is truncated ({size:,} bytes, {claim})")
        blob = f.read(header_len)
    header = parse_json(blob, f"the header of {path}") if blob.lstrip().startswith(b"{") else None
    if not isinstance(header, dict):
        fail("is not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}  # MLX writes null when there is none
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        fail(f"has a '__metadata__' that is not an object of strings: {shown(metadata)}")
    spans = []
    for name, entry in header.items():
        missing = [k for k in rules if k not in entry] if isinstance(entry, dict) else []
        problem = obj(entry) or (f"field '{missing[0]}' is missing" if missing else field_problem(entry, rules))
        if problem:
            fail(f"declares tensor '{name}' wrongly: {problem}")
        offsets, shape, dtype = entry["data_offsets"], entry["shape"], entry["dtype"]
        need = prod(shape) * dtypes[dtype]
        if len(offsets) != 2 or offsets[1] - offsets[0] != need:
            fail(
                f"declares tensor '{name}' wrongly: data_offsets {offsets} do not span the {need:,} bytes of {dtype} {shape}"
            )
        spans.append((offsets[0], offsets[1], name))
    data_size, position, previous = size - 8 - header_len, 0, None
    for begin, end, name in sorted(spans):
        if begin != position:
            where = f"after a gap of {begin - position:,} bytes" if begin > position else f"inside tensor '{previous}'"
            fail(f"is not a valid safetensors file: tensor '{name}' starts at byte {begin:,}, {where}")
        position, previous = end, name
    if position > data_size:
        fail(f"is truncated ({size:,} bytes, its header promises {8 + header_len + position:,})")
    if position < data_size:
        fail(f"has {data_size - position:,} bytes after its last tensor, which no tensor declares")
    return header


def read_weights(folder: Path) -> Dict[str, mx.array]:
    """All tensors of a checkpoint folder, lazily (nothing is read until used), with HF names.
    Every header, and what the index says of it, is checked before MLX opens a file."""
    weights: Dict[str, mx.array] = {}
    origin: Dict[str, str] = {}
    for path, listed in weight_files(folder).items():
        header = read_header(path)
        absent = sorted((listed or set()) - set(header))
        if absent:
            raise OpenELMError(
                f"{folder / INDEX} puts tensor '{absent[0]}' in {path.name}, which does not hold it: download them again"
            )
        twice = next((name for name in header if name in origin), None)
        if twice:
            raise OpenELMError(f"tensor '{twice}' is in both {origin[twice]} and {path.name} in {folder}")
        origin.update(dict.fromkeys(header, path.name))
        try:
            weights.update(mx.load(str(path)))
        except (RuntimeError, ValueError) as e:
            raise OpenELMError(f"cannot read {path}: {e}") from None
    return sanitize(weights)


def sanitize(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Map corenet's MLX export onto the Hugging Face names (the one rename this project needs)."""
    if any(k.startswith("transformer.") for k in weights):
        return weights
    out = {f"transformer.{k}": v for k, v in weights.items()}
    emb = out.get("transformer.token_embeddings.weight")
    if emb is not None and emb.shape[0] == CORENET_VOCAB:
        out["transformer.token_embeddings.weight"] = emb[:32000]
    return out


def quantized_paths(weights: Dict[str, mx.array]) -> set:
    return {k[: -len(".scales")] for k in weights if k.endswith(".scales")}


def build_model(config: OpenELMConfig, weights: Dict[str, mx.array]) -> Model:
    """A Model holding `weights`: quantized where the checkpoint is, checked name by name."""
    model = Model(config)
    quantized = quantized_paths(weights)
    if quantized:
        if not config.quantization:
            raise OpenELMError(
                "the weights are quantized (*.scales tensors) but config.json has no 'quantization' entry"
            )
        q = config.quantization
        nn.quantize(
            model, group_size=q["group_size"], bits=q["bits"], class_predicate=lambda path, module: path in quantized
        )
    check_weights(model, weights)
    model.load_weights(list(weights.items()), strict=False)
    return model


def check_weights(model: nn.Module, weights: Dict[str, mx.array]):
    problems = weight_problems(model, weights)
    if problems:
        raise OpenELMError(
            "the weights do not match config.json ("
            + "; ".join(problems)
            + "): check that config.json belongs to these weights"
        )


def weight_problems(model: nn.Module, weights: Dict[str, mx.array]) -> List[str]:
    """What keeps `weights` from being `model`'s: missing, unexpected, wrongly shaped or typed tensors."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    # Packed quantized weights are uint32, every other tensor a float.
    wrong_dtype = [
        f"{k} {weights[k].dtype} (expected {'uint32' if v.dtype == mx.uint32 else 'a float'})"
        for k, v in expected.items()
        if k in weights and (weights[k].dtype == mx.uint32) != (v.dtype == mx.uint32)
    ]

    def show(names):
        return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

    problems = []
    if missing:
        problems.append(f"missing tensors: {show(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {show(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {show(wrong)}")
    if wrong_dtype:
        problems.append(f"wrong dtypes: {show(wrong_dtype)}")
    return problems
