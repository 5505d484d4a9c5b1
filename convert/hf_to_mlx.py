"""`openelm convert`: a Hugging Face (or corenet, or our own) checkpoint -> an MLX folder,
optionally 4/8-bit. Tensor by tensor, written as it goes, so memory stays near one tensor."""

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from openelm_mlx import __version__
from openelm_mlx.checkpoint import build_model, quantized_paths, read_weights, resolve_source
from openelm_mlx.config import OpenELMConfig
from openelm_mlx.errors import OpenELMError
from openelm_mlx.loader import DTYPES, named_dtype
from openelm_mlx.tokenizer import check_tokenizer_fits, find_tokenizer

MAX_SHARD_BYTES = 5 * 1024**3
# Lets mlx_lm.load (through transformers) build the same LLaMA tokenizer, BOS included.
MLX_LM_TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "legacy": True,
}
SAFETENSORS_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32"}


def storage_dtype(name: str, weights: Dict[str, mx.array], config: OpenELMConfig) -> mx.Dtype:
    """'auto' keeps a 16-bit checkpoint as it is and stores a float32 one in 16 bits
    (bfloat16 for 3B); loading upcasts to float32 where activations need it."""
    dtype = named_dtype(name)
    if dtype is not None:
        return dtype
    source = weights["transformer.token_embeddings.weight"].dtype
    if source in (mx.float16, mx.bfloat16):
        return source
    return mx.bfloat16 if config.wants_bfloat16 else mx.float16


def plan_tensors(weights, out_dtype, bits, group_size, quantize_embedding) -> List[Tuple[str, tuple, mx.Dtype, str]]:
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
            dtype = w.dtype if w.dtype == mx.uint32 else out_dtype  # packed weights stay packed
            plan.append((name, tuple(w.shape), dtype, name))
            continue
        out_dim, in_dim = w.shape
        plan.append((name, (out_dim, in_dim * bits // 32), mx.uint32, name))
        plan.append((f"{module}.scales", (out_dim, in_dim // group_size), out_dtype, name))
        plan.append((f"{module}.biases", (out_dim, in_dim // group_size), out_dtype, name))
    return plan


def nbytes(shape, dtype) -> int:
    return int(np.prod(shape)) * dtype.size


def shard_plan(plan) -> List[list]:
    shards, size = [[]], 0
    for entry in plan:
        b = nbytes(entry[1], entry[2])
        if shards[-1] and size + b > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += b
    return shards


def write_header(f, entries):
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


def convert(
    source,
    output,
    dtype: str = "auto",
    bits: Optional[int] = None,
    group_size: int = 64,
    tokenizer: Optional[str] = None,
    quantize_embedding: bool = True,
    force: bool = False,
) -> Path:
    """Write an MLX folder (config.json, model.safetensors, tokenizer.model) that both
    openelm_mlx.load and mlx_lm.load read. Returns the output folder."""
    if bits not in (None, 4, 8):
        raise OpenELMError(f"--bits must be 4 or 8, got {bits}")
    if group_size not in (32, 64, 128):
        raise OpenELMError(f"--group-size must be 32, 64 or 128, got {group_size}")
    output = Path(output)
    if output.exists() and not force:
        raise OpenELMError(f"{output} already exists: choose another -o or pass --force to replace it")

    folder = resolve_source(source)
    config = OpenELMConfig.from_pretrained(folder)
    weights = read_weights(folder)
    if quantized_paths(weights) and bits is not None:
        raise OpenELMError(f"{source} is already quantized: convert from the float checkpoint to change --bits")
    build_model(config, weights)  # checks names and shapes; the weights stay lazy, nothing is read
    tok = find_tokenizer(folder, tokenizer, required=False)
    if tok is not None:
        check_tokenizer_fits(tok, config)

    out_dtype = storage_dtype(dtype, weights, config)
    plan = plan_tensors(weights, out_dtype, bits, group_size, quantize_embedding)
    if bits is not None:
        config.quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
    config.torch_dtype = next(name for name, dt in DTYPES.items() if dt == out_dtype)  # what is stored

    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_weights(tmp, plan, weights, out_dtype, bits, group_size)
        out_config = config.to_dict()
        out_config["converted_by"] = {"tool": "openelm-mlx", "version": __version__, "source": str(source)}
        if config.quantization:
            out_config["quantization_config"] = config.quantization  # Hugging Face's name for it
        (tmp / "config.json").write_text(json.dumps(out_config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, indent=2) + "\n"
        )
        if tok is not None:
            shutil.copyfile(tok.path, tmp / "tokenizer.model")
            (tmp / "tokenizer_config.json").write_text(json.dumps(MLX_LM_TOKENIZER_CONFIG, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    size = sum(nbytes(shape, dt) for _, shape, dt, _ in plan)
    print(
        f"wrote {output}: {size / 1e9:.3f} GB, {8 * size / config.num_parameters():.2f} bits per weight"
        + ("" if tok else " (no tokenizer.model found: pass --tokenizer to include one)")
    )
    return output


def _write_weights(folder: Path, plan, weights, out_dtype, bits, group_size):
    shards = shard_plan(plan)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    progress = tqdm(total=len(weights), unit="tensor", desc="converting", leave=False)
    pending: Dict[str, mx.array] = {}
    for file, entries in zip(names, shards):
        with open(folder / file, "wb") as f:
            write_header(f, entries)
            for name, _, dtype, source in entries:
                if name not in pending:
                    w = weights.pop(source)  # drop the lazy source so its memory can go
                    if dtype == mx.uint32 and w.dtype != mx.uint32:
                        wq, scales, biases = mx.quantize(w.astype(out_dtype), group_size, bits)
                        module = source[: -len(".weight")]
                        pending.update({source: wq, f"{module}.scales": scales, f"{module}.biases": biases})
                    else:
                        pending[name] = w.astype(dtype)
                    progress.update()
                x = pending.pop(name)
                mx.eval(x)
                f.write(to_bytes(x))
    progress.close()
    if len(shards) > 1:
        weight_map = {e[0]: file for file, entries in zip(names, shards) for e in entries}
        total = sum(nbytes(e[1], e[2]) for e in plan)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )


def add_arguments(parser):
    parser.add_argument("source", help="Hugging Face folder or repo id, corenet MLX export, or MLX folder")
    parser.add_argument("-o", "--output", required=True, help="output folder")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="float dtype to store (auto: keep 16-bit sources, float32 -> float16, bfloat16 for 3B)",
    )
    parser.add_argument(
        "--bits", type=int, choices=[4, 8], help="quantize weights to 4 or 8 bits (MLX affine, group-wise)"
    )
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
    parser.add_argument(
        "--no-quantize-embedding",
        dest="quantize_embedding",
        action="store_false",
        help="keep the tied embedding (and so the output layer) in the float dtype",
    )
    parser.add_argument("--tokenizer", help="tokenizer.model (file, folder or repo id) to copy into the output")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")


def main(args):
    convert(
        args.source,
        args.output,
        dtype=args.dtype,
        bits=args.bits,
        group_size=args.group_size,
        tokenizer=args.tokenizer,
        quantize_embedding=args.quantize_embedding,
        force=args.force,
    )
