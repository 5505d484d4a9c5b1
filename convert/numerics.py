"""The numerics policy of both exporters, and the float16 overflow guard for "massive activations".

Policy: the residual stream, every RMSNorm (QK-norm included) and RoPE run in float32; matmuls,
attention, the KV cache and the logits in the compute precision (float16 on devices). What stays
float16 is each sub-layer's own output, and real LLMs emit "massive activations" (~1e5 in a few
channels at a few positions; OpenELM in Core ML ports) from the FFN, past float16's 65504.

Guard: SwiGLU is linear in `up`, so proj_1's `up` rows are stored times 2**-k and the FFN output
is multiplied by 2**k after its cast to float32: the same function, with the float16 intermediates
(up, silu(gate) * up, proj_2's output) 2**k times smaller. A power of two changes no mantissa
(exact, unless a value drops below float16's normal range) and commutes exactly with symmetric
int8/int4 quantization (the scales take the factor) and with palettization (the LUT does). k is
chosen per layer from a calibration pass of the MLX model in float32; layers without large
activations get k = 0, i.e. no change at all."""

import math
from typing import Dict, List

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from openelm_mlx.errors import OpenELMError

FLOAT16_MAX = 65504.0
# k brings the FFN's float16 intermediates to at most FLOAT16_MAX / 32 on the calibration tokens:
# a 32x margin for inputs that excite the layer more than the calibration does.
FFN_PEAK_LIMIT = FLOAT16_MAX / 32
# Other float16 tensors (q/k/v, attention output, gate, logits) are not rescaled: refuse a model
# whose calibration already brings them within 4x of overflow.
OTHER_PEAK_LIMIT = FLOAT16_MAX / 4
CALIBRATION_TOKENS = 32


def calibration_peaks(model, tokens) -> List[Dict[str, float]]:
    """Per layer, the largest |value| of each tensor the package computes in float16, for the
    MLX model (float32) on `tokens`. Walks model.py's blocks, keeping the FFN's intermediates."""

    def peak(x):
        return float(mx.abs(x).max())

    h = model.transformer.token_embeddings(mx.array([tokens]))
    peaks = []
    for layer in model.layers:
        x = layer.attn_norm(h)
        attn = layer.attn(x, "causal")
        h = h + attn
        gate, up = mx.split(layer.ffn.proj_1(layer.ffn_norm(h)), 2, axis=-1)
        product = nn.silu(gate) * up
        out = layer.ffn.proj_2(product)
        h = h + out
        peaks.append(
            {
                "qkv_proj": peak(layer.attn.qkv_proj(x)),
                "attention": peak(attn),
                "gate": peak(gate),
                "up": peak(up),
                "silu(gate) * up": peak(product),
                "proj_2": peak(out),
            }
        )
    peaks[-1]["logits"] = peak(model.transformer.token_embeddings.as_linear(model.transformer.norm(h)))
    return peaks


def ffn_scale_exponents(model, compute_precision: str) -> List[int]:
    """k per layer (see the module docstring); all 0 for float32 compute, which cannot overflow."""
    layers = model.config.num_transformer_layers
    if compute_precision == "float32":
        return [0] * layers
    rng = np.random.default_rng(0)
    tokens = [model.config.bos_token_id] + rng.integers(3, model.config.vocab_size, CALIBRATION_TOKENS - 1).tolist()
    exponents = []
    for i, peaks in enumerate(calibration_peaks(model, tokens)):
        for name in ("qkv_proj", "attention", "gate", "logits"):
            if peaks.get(name, 0.0) > OTHER_PEAK_LIMIT:
                raise OpenELMError(
                    f"layer {i}'s {name} reaches {peaks[name]:.3g} on calibration tokens, too close to float16's "
                    f"{FLOAT16_MAX:.0f}: export with --compute-precision float32"
                )
        ffn_peak = max(peaks["up"], peaks["silu(gate) * up"], peaks["proj_2"])
        exponents.append(max(0, math.ceil(math.log2(ffn_peak / FFN_PEAK_LIMIT))) if ffn_peak > 0 else 0)
    return exponents


def fold_ffn_scales(weights: Dict[str, np.ndarray], exponents: List[int], unfold: bool = False):
    """The weights with proj_1's `up` rows (its second half) times 2**-k per layer, or with the
    folding undone (unfold=True): the stored weights <-> the model's."""
    out = dict(weights)
    for i, k in enumerate(exponents):
        if k:
            name = f"transformer.layers.{i}.ffn.proj_1.weight"
            w = out[name].copy()
            w[w.shape[0] // 2 :] *= np.float32(2.0 ** (k if unfold else -k))
            out[name] = w
    return out
