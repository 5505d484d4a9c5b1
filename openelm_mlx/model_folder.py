"""The one writer of model folders, for `openelm convert` and `openelm train` alike: config.json,
model.safetensors (sharded with an index past 5 GB), generation_config.json, tokenizer.model,
tokenizer.json and tokenizer_config.json (+ chat_template.jinja for Instruct models).
openelm_mlx.load, mlx_lm.load (so mlx_lm.generate, chat and server too) and mlx-swift-lm read the
same model and the same tokenizer from it. Tensors are streamed, one at a time."""

import dataclasses
import json
import logging
import struct
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from . import __version__
from .config import OpenELMConfig
from .hf_tokenizer import hf_tokenizer_files
from .loader import DTYPES
from .mlx_swift_lm import mlx_swift_lm_notice
from .options import DEFAULT_GROUP_SIZE
from .outputs import staged_output
from .progress import progress_bar
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 5 * 1024**3
SAFETENSORS_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}

Entry = Tuple[str, tuple, mx.Dtype, str]  # (output name, shape, dtype, source name)


def source_name(source) -> str:
    """What converted_by.source records: a Hub repo id as given, a local folder by its name only
    (folders get uploaded, an absolute path would publish the writer's file system), and a folder
    of the Hugging Face cache (models--apple--OpenELM-270M/snapshots/<hash>) by its repo id."""
    path = Path(str(source)).expanduser()
    if not path.exists():
        return str(source)
    path = path.resolve()
    cached = [part for part in path.parts if part.startswith("models--")]
    if cached:
        return cached[-1].removeprefix("models--").replace("--", "/")
    return path.name


def write_model_folder(
    output,
    config: OpenELMConfig,
    weights: Dict[str, mx.array],
    dtype: mx.Dtype,
    source,
    tokenizer: Optional[Tokenizer] = None,
    instruct: bool = False,
    bits: Optional[int] = None,
    group_size: int = DEFAULT_GROUP_SIZE,
    quantize_embedding: bool = True,
    force: bool = False,
    reads: Iterable = (),
) -> Optional[str]:
    """Write `weights` (Hugging Face names; consumed) as a folder at `output`, floats stored in
    `dtype` and, with `bits`, linear layers quantized the way mlx-lm quantizes them. Everything is
    written into a temporary folder beside `output` and put in place at the end (outputs.py);
    `reads` are what the run reads, which --force must never delete. With a tokenizer, the folder
    also holds tokenizer.json and tokenizer_config.json (hf_tokenizer.py) for the runners without
    sentencepiece, the chat template too for an `instruct` model. Returns mlx-swift-lm's one-line
    notice for the command to print when that runner would rebuild this config differently, else None."""
    output = Path(output)
    plan = plan_tensors(weights, dtype, bits, group_size, quantize_embedding)
    config = dataclasses.replace(
        config,
        quantization={"group_size": group_size, "bits": bits, "mode": "affine"} if bits else config.quantization,
        torch_dtype=next(name for name, dt in DTYPES.items() if dt == dtype),  # what is stored
    )
    raw = config.to_dict()
    raw["converted_by"] = {"tool": "openelm-mlx", "version": __version__, "source": source_name(source)}
    if config.quantization:
        raw["quantization_config"] = config.quantization  # Hugging Face's name for it

    hf_files = {}
    if tokenizer is not None:  # before anything is written: a tokenizer it cannot reproduce is an error
        hf_files = hf_tokenizer_files(tokenizer, instruct, config.max_context_length)
    with staged_output(output, force, reads) as tmp:
        tmp.mkdir()
        write_weights(tmp, plan, weights, dtype, bits, group_size)
        write_json(tmp / "config.json", raw)
        write_json(
            tmp / "generation_config.json", {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
        )
        if tokenizer is not None:
            (tmp / "tokenizer.model").write_bytes(tokenizer.data)  # what our own loader reads
        for name, data in hf_files.items():
            (tmp / name).write_bytes(data)
    notice = mlx_swift_lm_notice(config)  # the folder is written; say where it will not run as it is
    if notice:
        log.info(notice)
    return output


def write_json(path: Path, value: dict):
    path.write_text(json.dumps(value, indent=2) + "\n")


def plan_tensors(weights, dtype, bits, group_size, quantize_embedding) -> List[Entry]:
    """(output name, shape, dtype, source name) for every tensor the output will hold."""
    plan = []
    for name in sorted(weights):
        w = weights[name]
        module = name[: -len(".weight")]
        quantize = (
            bits is not None
            and name.endswith(".weight")
            and w.ndim == 2
            and w.shape[-1] % group_size == 0  # mlx-lm leaves such layers unquantized too
            and (quantize_embedding or "token_embeddings" not in name)
        )
        if not quantize:
            stored = w.dtype if w.dtype == mx.uint32 else dtype  # packed weights stay packed
            plan.append((name, tuple(w.shape), stored, name))
            continue
        out_dim, in_dim = w.shape
        plan.append((name, (out_dim, in_dim * bits // 32), mx.uint32, name))
        plan.append((f"{module}.scales", (out_dim, in_dim // group_size), dtype, name))
        plan.append((f"{module}.biases", (out_dim, in_dim // group_size), dtype, name))
    return plan


def nbytes(shape, dtype) -> int:
    return int(np.prod(shape)) * dtype.size


def shard_plan(plan: List[Entry]) -> List[List[Entry]]:
    shards, size = [[]], 0
    for entry in plan:
        b = nbytes(entry[1], entry[2])
        if shards[-1] and size + b > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += b
    return shards


def write_header(f, entries: List[Entry]):
    header, offset = {"__metadata__": {"format": "mlx"}}, 0
    for name, shape, dtype, _ in entries:
        size = nbytes(shape, dtype)
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    f.write(struct.pack("<Q", len(blob)) + blob)


def to_bytes(x: mx.array) -> memoryview:
    if x.dtype == mx.bfloat16:  # numpy has no bfloat16: write its bits
        x = x.view(mx.uint16)
    return memoryview(np.ascontiguousarray(x))


def write_weights(folder: Path, plan: List[Entry], weights, dtype, bits, group_size):
    """Each tensor is read (or quantized) and written in turn; the source's is dropped once done."""
    shards = shard_plan(plan)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    progress = progress_bar(total=len(weights), unit="tensor", desc="writing", leave=False)
    pending: Dict[str, mx.array] = {}
    for file, entries in zip(names, shards):
        with open(folder / file, "wb") as f:
            write_header(f, entries)
            for name, _, stored, source in entries:
                if name not in pending:
                    w = weights.pop(source)  # drop the lazy source so its memory can go
                    if stored == mx.uint32 and w.dtype != mx.uint32:
                        wq, scales, biases = mx.quantize(w.astype(dtype), group_size, bits)
                        module = source[: -len(".weight")]
                        pending.update({source: wq, f"{module}.scales": scales, f"{module}.biases": biases})
                    else:
                        pending[name] = w.astype(stored)
                    progress.update()
                x = pending.pop(name)
                mx.eval(x)
                f.write(to_bytes(x))
    progress.close()
    if len(shards) > 1:
        weight_map = {e[0]: file for file, entries in zip(names, shards) for e in entries}
        total = sum(nbytes(e[1], e[2]) for e in plan)
        write_json(
            folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
