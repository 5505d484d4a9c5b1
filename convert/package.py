"""The one description of an exported OpenELM package, shared by the Core ML and Core AI exporters:
the weights as stored, the layers' shapes, RoPE tables and the `openelm.*` metadata.

Both packages hold the same model (weights, FFN scales, RoPE tables, the causal mask built inside
from positions) and the same `openelm.*` metadata. Their calling contracts are those of the stock
runners they serve: the Core AI LanguageBundle keeps Apple's (convert/coreai/graph.py for macOS,
ios_graph.py for iOS, bundle.py), the Core ML package swift-transformers' `inputIds`,
`causalMask`, `keyCache`/`valueCache` (convert/coreml/graph.py)."""

import importlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from openelm_mlx import __version__
from openelm_mlx.config import OpenELMConfig
from openelm_mlx.errors import OpenELMError
from openelm_mlx.files import (
    each,
    field_problem,
    integer,
    obj,
    one_of,
    optional,
    parse_json,
    read_json,
    regular_file,
    text,
)
from openelm_mlx.hf_tokenizer import hf_tokenizer_files
from openelm_mlx.loader import load_model
from openelm_mlx.model_folder import source_name
from openelm_mlx.options import check_options, count
from openelm_mlx.tokenizer import CHAT_TEMPLATE, MAX_TOKENIZER_BYTES, Tokenizer, find_tokenizer

from .compression import BLOCKWISE, IOS_PRESET, Palettized, Quantized, check_stored, compress, quantize_per_tensor
from .numerics import ffn_scale_exponents, fold_ffn_scales

EMBEDDING = "transformer.token_embeddings.weight"
FINAL_NORM = "transformer.norm.weight"
COMPUTE_DTYPES = {"float16": np.float16, "float32": np.float32}  # --compute-precision
# iOS's default context: Apple's iPhone GPU path corrupts output once the KV cache reaches 2048
# (coreai-models #124); the model's max_context_length if smaller.
IOS_CONTEXT = 1024
# The exporters' numeric options; each is checked against the model once it is loaded as well.
EXPORT_OPTION_RULES = {
    "context": optional(count(1, 1 << 20)),
    "block_size": count(1, 1 << 16),
}


@dataclass
class Layer:
    """One transformer block's shape, and its FFN output scale (numerics.py): proj_1's `up` rows
    are stored times 2**-ffn_scale_exponent and the FFN output is multiplied back in float32."""

    q_heads: int
    kv_heads: int
    ffn_dim: int
    ffn_scale_exponent: int


def block_names(i: int) -> Dict[str, str]:
    """model.py's parameter names of transformer block i, by role."""
    p = f"transformer.layers.{i}."
    return {
        "attn_norm": p + "attn_norm.weight",
        "qkv_proj": p + "attn.qkv_proj.weight",
        "q_norm": p + "attn.q_norm.weight",
        "k_norm": p + "attn.k_norm.weight",
        "out_proj": p + "attn.out_proj.weight",
        "ffn_norm": p + "ffn_norm.weight",
        "proj_1": p + "ffn.proj_1.weight",
        "proj_2": p + "ffn.proj_2.weight",
    }


def is_norm(name: str) -> bool:
    """RMSNorm weights stay float32 and uncompressed: they are tiny and scale float32 activations."""
    return name.endswith("norm.weight")


@dataclass
class PackageDescription:
    """Everything an exporter needs, backend-neutral: shapes per layer, the weights as they are
    stored (FFN scales folded in, compressed where asked), RoPE tables and the metadata."""

    config: OpenELMConfig
    source: str
    context: int
    prefill_length: int
    compression: str
    block_size: int
    compute_precision: str  # "float16" or "float32": matmuls, attention, KV cache, logits
    layers: List[Layer]
    weights: Dict[str, Union[np.ndarray, Quantized, Palettized]]  # HF name -> stored form
    rope_cos: np.ndarray  # [context, head_dim] float32
    rope_sin: np.ndarray  # sign-folded: rope(x) = x * cos + swap_halves(x) * sin
    target: str = "macos"  # "ios": the embedding int8 per tensor, int8 per block (ios_form)

    @property
    def compute_dtype(self):
        return COMPUTE_DTYPES[self.compute_precision]

    def metadata(self, tokenizer: Tokenizer) -> Dict[str, str]:
        """The openelm.* keys both packages carry (Core ML: userDefined metadata; Core AI:
        metadata.json), all strings. PackageInfo reads them back."""
        return {
            "openelm.bos_token_id": str(tokenizer.bos_id),
            "openelm.eos_token_id": str(tokenizer.eos_id),
            "openelm.context_length": str(self.context),
            "openelm.prefill_length": str(self.prefill_length),
            "openelm.vocab_size": str(self.config.vocab_size),
            "openelm.chat_template": CHAT_TEMPLATE,
            "openelm.source_model": self.source,
            "openelm.compression": self.compression,
            "openelm.block_size": str(self.block_size) if self.compression in BLOCKWISE else "",
            "openelm.compute_precision": self.compute_precision,
            "openelm.target": self.target,
            "openelm.ffn_scale_exponents": json.dumps([layer.ffn_scale_exponent for layer in self.layers]),
            "openelm.num_parameters": str(self.config.num_parameters()),
            "openelm.toolkit_version": __version__,
            "openelm.config": json.dumps(self.config.to_dict()),
        }


def describe(
    model_source,
    context: Optional[int],
    compression: str,
    block_size: int,
    compute_precision: str,
    compressions,
    tokenizer=None,
    target: str = "macos",
    on_step=lambda text: None,
):
    """Load `model_source` (anything openelm_mlx.load accepts), check the export settings (the
    exporter's `compressions`), and describe the package: (PackageDescription, the model's folder).
    One call may take the whole context (Core ML's inputIds range, Core AI's bundles), which the
    `openelm.prefill_length` metadata records. `tokenizer` (a path, else the model folder's) encodes the float16 guard's calibration
    text. For `target` "ios" the context defaults to IOS_CONTEXT and the weights take ios_form.
    on_step(text) is told where the calibration is (its progress)."""
    if compute_precision not in COMPUTE_DTYPES:
        raise OpenELMError(f"unknown compute precision '{compute_precision}': choose {' or '.join(COMPUTE_DTYPES)}")
    if compression not in compressions:
        raise OpenELMError(f"unknown compression '{compression}': choose one of {', '.join(compressions)}")
    check_export_options(context, block_size)
    model, folder = load_model(model_source, dtype="float32")
    config = model.config
    if context is None:
        context = min(IOS_CONTEXT, config.max_context_length) if target == "ios" else config.max_context_length
    if not 1 <= context <= config.max_context_length:
        raise OpenELMError(
            f"--context {context} is outside 1..{config.max_context_length} (the model's max_context_length)"
        )
    weights = model_weights(model)
    for name, w in weights.items():  # before the float16 bounds, whose searches never end on inf or NaN
        if not np.isfinite(w).all():
            raise OpenELMError(f"{name} holds inf or NaN values: the checkpoint is damaged; convert it again")
    tok = find_tokenizer(folder, tokenizer)
    scale_exponents = ffn_scale_exponents(model, weights, compute_precision, tok, on_step)
    weights = fold_ffn_scales(weights, scale_exponents)
    del model
    store = ios_form if target == "ios" else compress
    stored = {
        name: w if is_norm(name) else store(name, w, compression, block_size, COMPUTE_DTYPES[compute_precision])
        for name, w in weights.items()
    }
    layers = [
        Layer(q, kv, ffn, k)
        for q, kv, ffn, k in zip(config.num_query_heads, config.num_kv_heads, config.ffn_dims, scale_exponents)
    ]
    cos, sin = rope_tables(config, context)
    description = PackageDescription(
        config,
        source_name(model_source),
        context,
        context,  # prefill_length
        compression,
        block_size,
        compute_precision,
        layers,
        stored,
        cos,
        sin,
        target,
    )
    return description, folder


def ios_form(name: str, weight: np.ndarray, compression: str, block_size: int, scale_dtype):
    """compress() as the iOS contract needs it: the embedding table int8 per tensor (the engine
    loads it once, load_embeddings); everything else as compress() stores it, int8 per block, never
    per output channel (per-channel int8 gave garbage on Apple's GPU delegate: coreai-model-zoo
    knowledge/pipelined-engine.md:274-285)."""
    if name == EMBEDDING:
        with np.errstate(over="ignore"):  # a value past scale_dtype becomes inf and is refused
            stored = quantize_per_tensor(weight, scale_dtype)
        check_stored(name, weight, stored, scale_dtype)
        return stored
    return compress(name, weight, compression, block_size, scale_dtype)


def check_export_options(context: Optional[int], block_size: int):
    """The exporters' numeric options in their ranges (EXPORT_OPTION_RULES), before anything is
    imported or read; describe() checks them against the model."""
    check_options({"context": context, "block_size": block_size}, EXPORT_OPTION_RULES)


def require(module: str, extra: str):
    """Import an optional extra's module, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise OpenELMError(f"{module} is not installed: pip install 'openelm-mlx[{extra}]'") from None


def model_weights(model) -> Dict[str, np.ndarray]:
    """HF-named float32 numpy weights of an MLX Model; quantized layers are dequantized."""
    params = dict(tree_flatten(model.parameters()))
    q = model.config.quantization or {}
    out = {}
    for name, value in params.items():
        base = name.rsplit(".", 1)[0]
        if name.endswith((".scales", ".biases")):
            continue
        if f"{base}.scales" in params:
            value = mx.dequantize(
                value,
                params[f"{base}.scales"],
                params.get(f"{base}.biases"),
                group_size=q["group_size"],
                bits=q["bits"],
            )
        out[name] = np.array(value.astype(mx.float32))
    return out


def rope_tables(config: OpenELMConfig, context: int):
    """cos and sign-folded sin, [context, head_dim] float32: rope(x) = x*cos + swap_halves(x)*sin."""
    hd = config.head_dim
    inv_freq = config.rope_freq_constant ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.arange(context, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    return (np.concatenate([cos, cos], 1).astype(np.float32), np.concatenate([-sin, sin], 1).astype(np.float32))


# What each openelm.* key may hold (all are strings in the package; numbers and lists are decoded
# first): a package is input, and a field that would size a buffer or index the vocabulary is
# checked before anything uses it. Exponents: FFN scales 2**-k, 0 for most models, under 20 measured.
PACKAGE_FIELDS = {
    "openelm.context_length": integer(1, 1 << 31),
    "openelm.prefill_length": integer(1, 1 << 31),
    "openelm.vocab_size": integer(1, 1 << 20),  # config.json's vocab_size range
    "openelm.bos_token_id": integer(0, 1 << 20),
    "openelm.eos_token_id": integer(0, 1 << 20),
    "openelm.compression": one_of("none", "int8", "int4", "palettize4", "palettize6", IOS_PRESET),
    "openelm.block_size": integer(0, 1 << 16),
    "openelm.compute_precision": one_of(*COMPUTE_DTYPES),
    "openelm.ffn_scale_exponents": each(integer(0, 64)),
    "openelm.source_model": text,
    "openelm.chat_template": text,
    "openelm.config": obj,
    "openelm.target": one_of("macos", "ios"),
}
NUMERIC = {"openelm.context_length", "openelm.prefill_length", "openelm.vocab_size", "openelm.bos_token_id"}
NUMERIC |= {"openelm.eos_token_id", "openelm.block_size"}
DECODED = {"openelm.ffn_scale_exponents", "openelm.config"}  # JSON inside the string


@dataclass
class PackageInfo:
    """The openelm.* metadata of an exported package, read back (PackageDescription.metadata)."""

    context: int
    prefill_length: int
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    compression: str
    block_size: int  # int8 and int4 (compression.BLOCKWISE), else 0
    compute_precision: str
    ffn_scale_exponents: List[int]
    source_model: str
    chat_template: str
    config: dict
    target: str = "macos"  # absent before iOS bundles existed, and in Core ML packages

    @classmethod
    def from_metadata(cls, meta, package, command: str) -> "PackageInfo":
        """Each field decoded and held to PACKAGE_FIELDS, then to the others (prefill within the
        context, special ids within the vocabulary, the config's own sizes): one line naming the
        field, else a PackageInfo every runner can trust."""

        def fail(why):
            raise OpenELMError(f"{package}: {why}: re-export it with `openelm {command}`") from None

        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            fail("its metadata is not a map of strings")
        values = {"openelm.target": "macos", "openelm.block_size": "0"}
        for key in PACKAGE_FIELDS:
            if key not in meta and key not in values:
                fail(f"metadata key '{key}' is missing (not an openelm package?)")
            raw = meta.get(key, values.get(key))
            if key in NUMERIC:
                raw = raw or ("0" if key == "openelm.block_size" else "")  # "" when not int4
                raw = int(raw) if re.fullmatch(r"-?\d{1,20}", raw) else raw
            elif key in DECODED:
                raw = parse_json(
                    raw.encode(), f"{package}: metadata key '{key}'", f"re-export it with `openelm {command}`"
                )
            values[key] = raw
        problem = field_problem(values, PACKAGE_FIELDS)
        if problem:
            fail(f"metadata {problem}")
        info = cls(*(values[key] for key in PACKAGE_FIELDS))
        try:
            config = OpenELMConfig.from_dict(info.config, "metadata key 'openelm.config'")
        except OpenELMError as e:
            fail(str(e))
        for bad, why in (
            (info.prefill_length > info.context, f"prefill_length {info.prefill_length} exceeds the context"),
            (max(info.bos_token_id, info.eos_token_id) >= info.vocab_size, "a special token id is past the vocabulary"),
            (config.vocab_size != info.vocab_size, f"the config's vocab_size is {config.vocab_size}"),
            (
                info.context > config.max_context_length,
                f"the config's max_context_length is {config.max_context_length}",
            ),
            (
                len(info.ffn_scale_exponents) != config.num_transformer_layers,
                f"{len(info.ffn_scale_exponents)} FFN scale exponents for {config.num_transformer_layers} layers",
            ),
        ):
            if bad:
                fail(
                    f"its metadata disagrees with itself ({why}; context {info.context}, vocab_size {info.vocab_size})"
                )
        return info


def check_graph(info: PackageInfo, package, command: str, contexts, vocab_sizes):
    """The metadata against the program, as each package reader finds it: `contexts`, the KV
    caches' lengths (the largest must be the context every runner sizes its checks by), and
    `vocab_sizes`, the logits' last dimensions (each must be the vocabulary a runner indexes).
    None found: a program without that contract, which the runner's own checks refuse by name."""
    contexts, vocab_sizes = [c for c in contexts if c], [v for v in vocab_sizes if v]
    for what, found, claimed in (
        ("KV-cache length", contexts, info.context),
        ("logits size", vocab_sizes, info.vocab_size),
    ):
        if found and (max(found) != claimed or (what == "logits size" and min(found) != claimed)):
            raise OpenELMError(
                f"{package}: its metadata says {claimed} ({'context' if 'KV' in what else 'vocab_size'}) but the "
                f"program's {what} is {max(found)}: re-export it with `openelm {command}`"
            )


def check_files(folder: Path):
    """Every entry of a package folder a folder or a regular file (links followed): a FIFO would
    hang a reader, a device never ends; refused by stat, nothing opened."""
    for parent, folders, files in os.walk(folder):
        for name in files + [f for f in folders if os.path.islink(os.path.join(parent, f))]:
            regular_file(Path(parent) / name)


def check_tokenizer(tokenizer: Tokenizer, info: PackageInfo, package):
    """The tokenizer a package is run with must have the package's vocabulary: a larger one feeds
    ids past the embedding, a smaller one cannot decode what the package samples."""
    if tokenizer.vocab_size != info.vocab_size:
        raise OpenELMError(
            f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but {package} has a vocabulary of "
            f"{info.vocab_size}: re-export the package, or pass its tokenizer with --tokenizer"
        )


def check_tokenizer_folder(folder: Path, info: PackageInfo, package):
    """The Hugging Face files the Swift runners read from a package's tokenizer folder: strict
    JSON objects, tokenizer.json's vocabulary the package's size."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = folder / name
        if not os.path.lexists(path):
            continue
        data = read_json(path, MAX_TOKENIZER_BYTES, "re-export the package")
        vocab = data.get("model", {}).get("vocab") if name == "tokenizer.json" and isinstance(data, dict) else None
        if not isinstance(data, dict) or (name == "tokenizer.json" and not isinstance(vocab, (dict, list))):
            raise OpenELMError(f"{path} is not a Hugging Face tokenizer file: re-export the package")
        if vocab is not None and len(vocab) != info.vocab_size:
            raise OpenELMError(
                f"{path} has {len(vocab)} pieces but {package} has a vocabulary of {info.vocab_size}: re-export the package"
            )


def tokenizer_folder(package) -> Path:
    """OUT.mlpackage -> OUT.tokenizer/, the tokenizer folder written beside a Core ML package: not
    OUT/ (a Core AI bundle's name) nor OUT.tokenizer.model (older exports'), so they never collide."""
    package = Path(package)
    return package.with_name(package.stem + ".tokenizer")


def tokenizer_path(package) -> Path:
    """The sentencepiece model written beside a package: OUT.tokenizer/tokenizer.model beside
    OUT.mlpackage, OUT.tokenizer.model beside OUT.aimodel."""
    package = Path(package)
    if package.suffix == ".mlpackage":
        return tokenizer_folder(package) / "tokenizer.model"
    return package.with_name(package.stem + ".tokenizer.model")


def package_tokenizer(package, info: PackageInfo, tokenizer=None, beside: Optional[Path] = None) -> Tokenizer:
    """The tokenizer a package runs with: `tokenizer` (--tokenizer), else the one the exporter
    wrote (`beside`, default tokenizer_path(package)) with the folder it is in, each checked
    against the package's vocabulary."""
    beside = Path(beside or tokenizer_path(package))
    if tokenizer is None and beside.parent.name.endswith("tokenizer"):
        check_tokenizer_folder(beside.parent, info, package)
    found = find_tokenizer(None, tokenizer or (beside if os.path.lexists(beside) else None))
    check_tokenizer(found, info, package)
    return found


def package_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def export_summary(description: PackageDescription, output: Path, seconds: float) -> dict:
    size = package_size(output)
    n_params = description.config.num_parameters()
    return {
        "output": str(output),
        "tokenizer": str(tokenizer_folder(output) if output.suffix == ".mlpackage" else tokenizer_path(output)),
        "compression": description.compression,
        "compute_precision": description.compute_precision,
        "context": description.context,
        "prefill_length": description.prefill_length,
        "ffn_scale_exponents": [layer.ffn_scale_exponent for layer in description.layers],
        "bytes": size,
        "parameters": n_params,
        "bytes_per_parameter": size / n_params,
        "seconds": seconds,
    }


def export_from_args(export, args, summary_line, **extra):
    """The export commands' main: `export` (export_coreml or export_coreai) with the shared
    options (add_export_arguments) and `extra` ones, then summary_line(its summary)."""
    summary = export(
        args.model,
        args.output,
        context=args.context,
        compress=args.compress,
        block_size=args.block_size,
        force=args.force,
        tokenizer=args.tokenizer,
        progress=True,
        **extra,
    )
    print(summary_line(summary))


def add_export_arguments(parser, suffix: str, compressions, output_help: Optional[str] = None):
    """The exporters' shared options. No --prefill-length: swift-transformers sends the whole prompt
    in one call, and Apple's engines choose how many tokens each call takes."""
    parser.add_argument("model", help="model folder or Hugging Face repo id (MLX folders may be quantized)")
    parser.add_argument(
        "-o", "--output", required=True, help=output_help or f"OUT{suffix} (the tokenizer goes to OUT.tokenizer.model)"
    )
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        help="KV-cache length in tokens (default: the model's max_context_length; for --target ios "
        f"{IOS_CONTEXT} at most)",
    )
    parser.add_argument("--compress", choices=compressions, default="none", help="weight compression (none: 16-bit)")
    parser.add_argument("--block-size", type=int, default=32, help="int8 and int4 block size along the input axis")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model if the model folder has none")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def tokenizer_files(tok: Tokenizer, instruct: bool, context: int) -> Dict[str, bytes]:
    """The tokenizer folder both exports ship (Core ML: OUT.tokenizer/, Core AI: the bundle's
    tokenizer/): tokenizer.json and tokenizer_config.json (+ chat_template.jinja for an Instruct
    model) for the Swift runners, and tokenizer.model for our own loading (sentencepiece). Built
    before anything is written: an unusable tokenizer is refused first."""
    return hf_tokenizer_files(tok.path, instruct, context) | {"tokenizer.model": Path(tok.path).read_bytes()}


def write_files(folder: Path, files: Dict[str, bytes]):
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
