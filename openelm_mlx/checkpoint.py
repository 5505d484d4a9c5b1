"""Find, read and check OpenELM checkpoints: Hugging Face folders or repos, Apple's corenet
MLX export, and this toolkit's own MLX folders. Only safetensors are read, never pickles or code."""

import json
import re
import struct
from pathlib import Path
from typing import Dict

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import OpenELMConfig
from .errors import OpenELMError
from .model import Model

# What is fetched from the Hub: never *.py (remote code) nor *.bin (pickles).
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
CORENET_VOCAB = 32128  # corenet pads the training vocabulary; the tokenizer has 32000 pieces


def resolve_source(source) -> Path:
    """A local checkpoint folder, or a Hugging Face repo id downloaded into the Hub cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise OpenELMError(f"{source} is a file: pass the folder that holds config.json and the weights")
    if not REPO_ID.match(str(source)):
        raise OpenELMError(
            f"no model folder at '{source}': give an existing folder or a Hugging Face repo id like apple/OpenELM-270M"
        )
    return _download(str(source))


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise OpenELMError(
            f"cannot download '{repo_id}': offline and not in the local Hugging Face cache "
            f"({type(e).__name__}); connect to the network or pass a local folder"
        ) from None
    except HfHubHTTPError as e:
        first_line = str(e).splitlines()[0]
        raise OpenELMError(
            f"cannot download '{repo_id}': {first_line}; check the repo id and your access (huggingface-cli login)"
        ) from None
    except OSError as e:
        raise OpenELMError(f"cannot download '{repo_id}': {e}") from None


def weight_files(folder: Path) -> list:
    """The safetensors files of a checkpoint folder, in the order their index lists them."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise OpenELMError(f"{index} is not a valid safetensors index ({e}): re-download it") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise OpenELMError(
                f"{index.name} names shards that are not in {folder}: {', '.join(missing)}; finish the download"
            )
        return files
    for name in ("model.safetensors", "weights.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return shards
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise OpenELMError(
            f"{folder} holds only PyTorch pickle weights (.bin/.pt); openelm-mlx reads safetensors only, "
            "since loading pickles can run arbitrary code: use the repo's model.safetensors"
        )
    raise OpenELMError(f"no *.safetensors weights in {folder}")


def check_safetensors(path: Path) -> dict:
    """Read and check a safetensors header, so a broken file fails with its name, not deep in MLX."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise OpenELMError(f"{path} is not a valid safetensors file ({e}): re-download or re-convert it") from None
    if 8 + header_len + end > size:
        raise OpenELMError(
            f"{path} is truncated ({size} bytes, header promises {8 + header_len + end}): re-download or re-convert it"
        )
    return header


def read_weights(folder: Path) -> Dict[str, mx.array]:
    """All tensors of a checkpoint folder, lazily (nothing is read until used), with HF names."""
    weights = {}
    for path in weight_files(folder):
        check_safetensors(path)
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
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [
        f"{k} {tuple(weights[k].shape)} (expected {tuple(v.shape)})"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
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
    if problems:
        raise OpenELMError(
            "the weights do not match config.json ("
            + "; ".join(problems)
            + "): check that config.json belongs to these weights"
        )
