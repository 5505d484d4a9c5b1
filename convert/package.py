"""The one description of an exported OpenELM package, shared by the Core ML and Core AI exporters:
the weights as stored, the layers' shapes, RoPE tables and the `openelm.*` metadata (describe).

Both packages hold the same model (weights, FFN scales, RoPE tables, the causal mask built inside
from positions) and the same `openelm.*` metadata. Their calling contracts are those of the stock
runners they serve: the Core AI LanguageBundle keeps Apple's (convert/coreai/graph.py for macOS,
ios_graph.py for iOS, bundle.py), the Core ML package swift-transformers' `inputIds`,
`causalMask`, `keyCache`/`valueCache` (convert/coreml/graph.py). The rest of a package's life:
export.py writes it (the flow both exporters share), export_cli.py holds their shared options,
package_input.py reads it back as input."""

import importlib
import importlib.util
import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from openelm_mlx import __version__
from openelm_mlx.config import OpenELMConfig
from openelm_mlx.errors import OpenELMError
from openelm_mlx.loader import load_model
from openelm_mlx.model_folder import source_name
from openelm_mlx.options import EXPORT_RULES, check_options
from openelm_mlx.tokenizer import CHAT_TEMPLATE, Tokenizer, find_tokenizer

from .compression import BLOCKWISE, Palettized, Quantized, check_stored, compress, quantize_per_tensor
from .numerics import ffn_scale_exponents, fold_ffn_scales

EMBEDDING = "transformer.token_embeddings.weight"
FINAL_NORM = "transformer.norm.weight"
COMPUTE_DTYPES = {"float16": np.float16, "float32": np.float32}  # --compute-precision
# iOS's default context: Apple's is 4096 (_constants.py:29), but its iPhone GPU path corrupts
# output once the KV cache reaches 2048 (coreai-models #124); the model's max_context_length if smaller.
IOS_CONTEXT = 1024


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
    exporter's `compressions`), and describe the package: (PackageDescription, the model's folder,
    the Tokenizer the package ships).
    One call may take the whole context (Core ML's inputIds range, Core AI's bundles), which the
    `openelm.prefill_length` metadata records. `tokenizer` (a path, else the model folder's) is
    the one the package ships; it encodes the float16 guard's calibration text. For `target`
    "ios" the context defaults to IOS_CONTEXT and the weights take ios_form. on_step(text) is told where the
    calibration is (its progress)."""
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
    return description, folder, tok


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
    """The exporters' numeric options in their ranges (options.EXPORT_RULES), before anything is
    imported or read; describe() checks them against the model."""
    check_options({"context": context, "block_size": block_size}, EXPORT_RULES)


def installed(module: str, extra: str):
    """Say in one line how to install an optional extra's module that is missing, without
    importing it: coremltools takes ~4 s to import, and a mistake in the input is said first."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise OpenELMError(f"{module} is not installed: pip install 'openelm-mlx[{extra}]'")


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
