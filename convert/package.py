"""The one description of an exported OpenELM package, shared by the Core ML and Core AI exporters:
the weights as stored, the layers' shapes, RoPE tables and the `openelm.*` metadata.

Both packages hold the same model (weights, FFN scales, RoPE tables, the causal mask built inside
from positions) and the same `openelm.*` metadata. Their calling contracts are those of the stock
runners they serve: the Core AI LanguageBundle keeps Apple's (convert/coreai/graph.py for macOS,
ios_graph.py for iOS, bundle.py), the Core ML package swift-transformers' `inputIds`,
`causalMask`, `keyCache`/`valueCache` (convert/coreml/graph.py)."""

import importlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from openelm_mlx import __version__, outputs
from openelm_mlx.config import OpenELMConfig
from openelm_mlx.errors import OpenELMError
from openelm_mlx.files import optional
from openelm_mlx.hf_tokenizer import hf_tokenizer_files
from openelm_mlx.loader import load_model
from openelm_mlx.model_folder import source_name
from openelm_mlx.options import check_options, count
from openelm_mlx.tokenizer import CHAT_TEMPLATE, Tokenizer, find_tokenizer

from .compression import BLOCKWISE, Palettized, Quantized, check_stored, compress, quantize_per_tensor
from .numerics import ffn_scale_exponents, fold_ffn_scales

FUNCTIONS = ("prefill", "decode")
EMBEDDING = "transformer.token_embeddings.weight"
FINAL_NORM = "transformer.norm.weight"
COMPUTE_DTYPES = {"float16": np.float16, "float32": np.float32}  # --compute-precision
# iOS's default context: Apple's iPhone GPU path corrupts output once the KV cache reaches 2048
# (coreai-models #124); the model's max_context_length if smaller.
IOS_CONTEXT = 1024
# The exporters' numeric options; each is checked against the model once it is loaded as well.
EXPORT_OPTION_RULES = {
    "context": optional(count(1, 1 << 20)),
    "prefill_length": optional(count(1, 1 << 20)),
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
    prefill_length: Optional[int],
    compression: str,
    block_size: int,
    compute_precision: str,
    compressions,
    tokenizer=None,
    target: str = "macos",
):
    """Load `model_source` (anything openelm_mlx.load accepts), check the export settings (the
    exporter's `compressions`), and describe the package: (PackageDescription, the model's folder).
    prefill_length None: one call takes up to the whole context (Core ML's inputIds range, Core AI's
    bundles). `tokenizer` (a path, else the model folder's) encodes the float16 guard's calibration
    text. For `target` "ios" the context defaults to IOS_CONTEXT and the weights take ios_form."""
    if compute_precision not in COMPUTE_DTYPES:
        raise OpenELMError(f"unknown compute precision '{compute_precision}': choose {' or '.join(COMPUTE_DTYPES)}")
    if compression not in compressions:
        raise OpenELMError(f"unknown compression '{compression}': choose one of {', '.join(compressions)}")
    check_export_options(context, prefill_length, block_size)
    model, folder = load_model(model_source, dtype="float32")
    config = model.config
    if context is None:
        context = min(IOS_CONTEXT, config.max_context_length) if target == "ios" else config.max_context_length
    if not 1 <= context <= config.max_context_length:
        raise OpenELMError(
            f"--context {context} is outside 1..{config.max_context_length} (the model's max_context_length)"
        )
    prefill_length = context if prefill_length is None else prefill_length
    if not 1 <= prefill_length <= context:
        raise OpenELMError(f"--prefill-length {prefill_length} must be between 1 and --context ({context})")
    weights = model_weights(model)
    scale_exponents = ffn_scale_exponents(model, weights, compute_precision, find_tokenizer(folder, tokenizer))
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
        prefill_length,
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


def check_export_options(context: Optional[int], prefill_length: Optional[int], block_size: int):
    """The exporters' numeric options in their ranges (EXPORT_OPTION_RULES), before anything is
    imported or read; describe() checks them against the model."""
    check_options({"context": context, "prefill_length": prefill_length, "block_size": block_size}, EXPORT_OPTION_RULES)


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
    def from_metadata(cls, meta: Dict[str, str], package, command: str) -> "PackageInfo":
        try:
            return cls(
                context=int(meta["openelm.context_length"]),
                prefill_length=int(meta["openelm.prefill_length"]),
                vocab_size=int(meta["openelm.vocab_size"]),
                bos_token_id=int(meta["openelm.bos_token_id"]),
                eos_token_id=int(meta["openelm.eos_token_id"]),
                compression=meta["openelm.compression"],
                block_size=int(meta["openelm.block_size"] or 0),
                compute_precision=meta["openelm.compute_precision"],
                ffn_scale_exponents=[int(k) for k in json.loads(meta["openelm.ffn_scale_exponents"])],
                source_model=meta["openelm.source_model"],
                chat_template=meta["openelm.chat_template"],
                config=json.loads(meta["openelm.config"]),
                target=meta.get("openelm.target", "macos"),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise OpenELMError(f"{package} has no openelm metadata ({e}): export it with `openelm {command}`") from None


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


def package_tokenizer(package, tokenizer=None) -> Tokenizer:
    """The tokenizer written beside the package by the exporter, or `tokenizer`."""
    beside = tokenizer_path(package)
    return find_tokenizer(None, tokenizer or (beside if beside.is_file() else None))


def check_output(output, suffix: str, force: bool) -> Path:
    """Refuse a wrong suffix, or an existing package or tokenizer without --force, before any work."""
    output = Path(output)
    if output.suffix != suffix:
        raise OpenELMError(f"output '{output}' must end in {suffix}")
    for path in (output, tokenizer_path(output)):
        outputs.check_output(path, force)
    return output


@contextmanager
def staged_package(output: Path, tokenizer: Tokenizer, force: bool, reads) -> Iterator[Path]:
    """A temporary path beside OUTPUT to write the package to. When the block ends without error,
    the package and the tokenizer beside it are placed together (outputs.py: never over something
    that appeared meanwhile, --force never over what the export reads); on error nothing is."""
    with outputs.staged_outputs([output, tokenizer_path(output)], force, reads) as (package, tok):
        yield package
        shutil.copyfile(tokenizer.path, tok)


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


def export_from_args(export, args, **extra):
    """The export commands' main: `export` (export_coreml or export_coreai) with the shared
    options (add_export_arguments) and `extra` ones, then its one-line summary."""
    if "prefill_length" in vars(args):
        extra["prefill_length"] = args.prefill_length
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
    print(
        f"wrote {summary['output']} ({summary['bytes'] / 2**20:.1f} MiB, "
        f"{summary['bytes_per_parameter']:.3f} bytes/parameter, {summary['compression']}, "
        f"{summary['compute_precision']} compute) and {summary['tokenizer']} in {summary['seconds']:.1f} s"
    )


def add_export_arguments(parser, suffix: str, compressions, output_help: Optional[str] = None, prefill: bool = True):
    """The exporters' shared options; `prefill` False leaves out --prefill-length (Core ML: the
    runner sends the whole prompt in one call; Core AI: the engine chooses how many tokens each call takes)."""
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
    if prefill:
        parser.add_argument("--prefill-length", type=int, default=128, help="most tokens per prefill call")
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
