"""The numerics policy of both exporters, and the float16 guard for "massive activations".

Policy: the residual stream, every RMSNorm (QK-norm included) and RoPE run in float32; matmuls,
attention, the KV cache and the logits in the compute precision (float16 on devices). What stays
float16 is each sub-layer's own output, and real LLMs emit "massive activations" (~1e5 in a few
channels, past float16's 65504) from the FFN, at BOS and at delimiters ('.', ',', newline)
anywhere in a prompt (Sun et al. 2024; OpenELM in Core ML: swift-transformers #95).

Rescaling: SwiGLU is linear in `up`, so proj_1's `up` rows are stored times 2**-k and the FFN
output is multiplied by 2**k after its cast to float32: the same function, with the float16
intermediates (up, silu(gate) * up, proj_2's output) 2**k times smaller. A power of two changes no
mantissa and commutes exactly with symmetric int8/int4 quantization (the scales take it) and with
palettization (the LUT does). Layers that need no rescaling get k = 0: no change at all.

Why k is safe for every input, not only the tokens calibration saw: each sub-layer's input is
RMS-normalised, x = n * g with ||n|| <= sqrt(d) (g the norm's weight), whichever token it is. So
from the weights alone (weight_bounds), with a_j = gate row j * g and b_j = up row j * g:
- |gate_j| <= sqrt(d) ||a_j||, |up_j| <= sqrt(d) ||b_j|| (Cauchy-Schwarz, for every partial sum too);
- |silu(gate_j) up_j| <= |a_j.n| |b_j.n| <= d (||a_j|| ||b_j|| + |a_j.b_j|) / 2 (|silu(z)| <= |z|; the
  maximum of a product of two linear forms on the ball);
- proj_2's output channel c (and any partial sum of it): sum_j |P_cj| |prod_j|, at most both
  sum_j |P_cj| bound_j and max_j |P_cj| * sum_j |prod_j|, where sum_j |prod_j| <= d/2 lambda_max(Q),
  Q = sum_j t_j a_j a_j^T + b_j b_j^T / t_j, t_j = ||b_j|| / ||a_j|| (AM-GM per unit; lambda_max
  itself bounded with a proof, top_eigenvalue_bound). The second form keeps the bound near what
  text reaches on ordinary layers, where summing every unit's worst case is 2-3x looser on the
  demo model and 56x on a random layer of 270M's widest shape; a loose bound raises k for
  nothing, pushing small values into float16's subnormals (docs/numerics.md: the measurements).
k is the least that brings that bound within FLOAT16_MAX / BOUND_MARGIN (the margin covers the
float16 rounding of inputs and partial sums). A layer whose bound needs more than MAX_EXPONENT is
refused: float16 would keep too little of its ordinary values.

The attention scores are bounded by QK-norm (head_dim * max|q gain| * max|k gain|, reached by
aligned q and k): refused past FLOAT16_MAX / BOUND_MARGIN.

Where it is not safe: tensors that cannot be rescaled this way (q/k/v, the attention output,
the gate, the logits) are bounded the same way, but only refused when realistic text comes
within CALIBRATION_MARGIN of overflow (calibration_peaks over openelm_mlx/data/calibration.txt
through the model's own tokenizer: prose, punctuation, newlines, digits, code, the chat template).
A model whose worst case for one of those exceeds float16 while real text stays far below is
exported, and could still overflow on an input unlike any text; --compute-precision float32
(Core AI) removes the question. Hardware that flushes float16 subnormals to zero loses more of
a rescaled layer's small values than the runtimes measured here (docs/numerics.md)."""

from importlib.resources import files
from typing import Dict, List

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from openelm_mlx.errors import OpenELMError

FLOAT16_MAX = 65504.0
BOUND_MARGIN = 2.0  # worst-case bound * 2 <= FLOAT16_MAX
GRAM_SLACK = 1.001  # covers the float32 sums of the FFN bound's Gram matrix
POWER_ITERATIONS = 50  # top_eigenvalue_bound's first guess; more only tightens it
# Refuse a tensor that cannot be rescaled when real text brings it within 4x of float16's range.
CALIBRATION_MARGIN = 4.0
# Rescaling moves a layer's ordinary values toward float16's subnormals (below 6.1e-5). Measured
# (benchmarks/float16_rescaling.py, the demo model's FFNs on the calibration text): the float16
# error stays 4.1e-4 up to k = 10, 7.1e-4 at 12, 2.3e-3 at 14, 8.9e-3 at 16. Past 12, refuse.
MAX_EXPONENT = 12
# The float16 tensors that cannot be rescaled: their calibration peaks are checked.
FIXED = ("qkv_proj", "attention", "gate", "logits")
FLOAT32_HINT = "export with --compute-precision float32 (export-coreai)"


def calibration_text() -> str:
    """openelm_mlx/data/calibration.txt, shipped with the package."""
    return files("openelm_mlx").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def calibration_tokens(tokenizer, window: int) -> List[List[int]]:
    """The calibration text through the model's own tokenizer (BOS first, `</s>` as the eos id, as
    the chat template renders it), cut into windows of at most `window` tokens."""
    tokens = tokenizer.encode(calibration_text())
    return [tokens[i : i + window] for i in range(0, len(tokens), window)]


def calibration_peaks(model, tokens, on_layer=None) -> List[Dict[str, float]]:
    """Per layer, the largest |value| of each tensor the package computes in float16, for the
    MLX model (float32) on `tokens`. Walks model.py's blocks, calling their modules plainly;
    on_layer(done, layers) after each (progress: a 2048-token window of 270M is minutes on a CPU)."""

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
        if on_layer:
            on_layer(len(peaks), len(model.layers))
    peaks[-1]["logits"] = peak(model.transformer.token_embeddings.as_linear(model.transformer.norm(h)))
    return peaks


def normed_rows(w: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """Rows of w times the RMSNorm gain feeding it, in float64: row . n is the output for norm output n."""
    return w.astype(np.float64) * gain.astype(np.float64)[None, :]


def top_eigenvalue_bound(gram: np.ndarray) -> float:
    """An upper bound on the largest eigenvalue of a positive semi-definite matrix, proven rather
    than estimated: power iteration guesses mu, and a Cholesky factorization of mu * I - gram
    succeeds only if mu is above every eigenvalue (mu grows until it does). ~10x faster than
    eigvalsh, whose tridiagonalization dominated the export of 270M (88 s here)."""
    v = np.random.default_rng(0).standard_normal(len(gram))
    for _ in range(POWER_ITERATIONS):
        v = gram @ v
        v /= np.linalg.norm(v)
    mu = float(v @ gram @ v) * 1.01 + 1e-12 * float(np.trace(gram))
    while True:
        try:
            np.linalg.cholesky(mu * np.eye(len(gram)) - gram)
            return mu
        except np.linalg.LinAlgError:
            mu *= 1.05


def ffn_bounds(proj_1: np.ndarray, proj_2: np.ndarray, gain: np.ndarray) -> Dict[str, float]:
    """Worst-case |value| over every input of the FFN's float16 tensors (the module docstring)."""
    d = gain.shape[0]
    a, b = np.split(normed_rows(proj_1, gain), 2, axis=0)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    per_unit = d * (na * nb + np.abs(np.sum(a * b, axis=1))) / 2
    live = (na > 0) & (nb > 0)  # a unit with a zero row contributes nothing
    t = np.sqrt(nb[live] / na[live])[:, None]
    stacked = np.concatenate([a[live] * t, b[live] / t]).astype(np.float32)  # float32: 3x faster
    gram = (stacked.T @ stacked).astype(np.float64)  # [d, d]; float32 sums err by << GRAM_SLACK
    total = d / 2 * top_eigenvalue_bound(gram) * GRAM_SLACK if live.any() else 0.0
    p = np.abs(proj_2.astype(np.float64))
    out = np.minimum(p @ per_unit, p.max(axis=1) * total)
    return {
        "gate": float(np.sqrt(d) * na.max()),
        "up": float(np.sqrt(d) * nb.max()),
        "silu(gate) * up": float(per_unit.max()),
        "proj_2": float(out.max()),
    }


def weight_bounds(weights: Dict[str, np.ndarray], config) -> List[Dict[str, float]]:
    """Per layer, the worst-case |value| over every input of each float16 tensor the package
    computes, from the float32 weights (HF names) alone; "logits" on the last layer."""
    d, hd = config.model_dim, config.head_dim
    bounds = []
    for i, (nq, nkv) in enumerate(zip(config.num_query_heads, config.num_kv_heads)):
        p = f"transformer.layers.{i}."
        qkv = np.linalg.norm(normed_rows(weights[p + "attn.qkv_proj.weight"], weights[p + "attn_norm.weight"]), axis=1)
        qkv *= np.sqrt(d)
        # Attention averages cached values: each output channel is at most its v channel's bound.
        v = qkv[(nq + nkv) * hd :].reshape(nkv, hd)
        v_per_q = np.repeat(v, nq // nkv, axis=0).reshape(-1)
        # q, k after QK-norm: norm <= sqrt(hd) max|gain| (RoPE rotates, keeping the norm).
        q_gain, k_gain = (np.abs(weights[p + f"attn.{n}_norm.weight"]).max() for n in "qk")
        bounds.append(
            {
                "qkv_proj": float(qkv.max()),
                "scores": float(hd * q_gain * k_gain),
                "attention": float((np.abs(weights[p + "attn.out_proj.weight"].astype(np.float64)) @ v_per_q).max()),
                **ffn_bounds(
                    weights[p + "ffn.proj_1.weight"], weights[p + "ffn.proj_2.weight"], weights[p + "ffn_norm.weight"]
                ),
            }
        )
    embedding = normed_rows(weights["transformer.token_embeddings.weight"], weights["transformer.norm.weight"])
    bounds[-1]["logits"] = float(np.sqrt(d) * np.linalg.norm(embedding, axis=1).max())
    return bounds


def exponent_for(peak: float) -> int:
    """The least k >= 0 with peak * 2**-k <= FLOAT16_MAX / BOUND_MARGIN."""
    k = 0
    while peak * 2.0**-k > FLOAT16_MAX / BOUND_MARGIN:
        k += 1
    return k


def ffn_scale_exponents(
    model, weights: Dict[str, np.ndarray], compute_precision: str, tokenizer, on_step=lambda text: None
) -> List[int]:
    """k per layer (see the module docstring) for the MLX model and its float32 weights; all 0 for
    float32 compute, which cannot overflow. Refuses, in one line, what float16 cannot hold.
    on_step(text) is told where the calibration is."""
    config = model.config
    if compute_precision == "float32":
        return [0] * config.num_transformer_layers
    peaks = [dict.fromkeys(FIXED, 0.0) for _ in range(config.num_transformer_layers)]
    windows = calibration_tokens(tokenizer, config.max_context_length)
    for w, window in enumerate(windows):

        def at_layer(i, n, w=w):
            on_step(f"calibrate: window {w + 1}/{len(windows)}, layer {i}/{n}")

        for layer, new in zip(peaks, calibration_peaks(model, window, at_layer)):
            layer.update({name: max(layer.get(name, 0.0), value) for name, value in new.items()})
    exponents = []
    for i, (bound, peak) in enumerate(zip(weight_bounds(weights, config), peaks)):
        for name in FIXED:
            if peak.get(name, 0.0) > FLOAT16_MAX / CALIBRATION_MARGIN:
                raise OpenELMError(
                    f"layer {i}'s {name} reaches {peak[name]:.3g} on the calibration text, too close to "
                    f"float16's {FLOAT16_MAX:.0f}: {FLOAT32_HINT}"
                )
        if bound["scores"] > FLOAT16_MAX / BOUND_MARGIN:  # QK-norm makes this bound tight: aligned q and k reach it
            raise OpenELMError(
                f"layer {i}'s attention scores can reach {bound['scores']:.3g} (its QK-norm weights), beyond "
                f"float16's {FLOAT16_MAX:.0f}: {FLOAT32_HINT}"
            )
        ffn_peak = max(bound["up"], bound["silu(gate) * up"], bound["proj_2"])
        k = exponent_for(ffn_peak)
        if k > MAX_EXPONENT:
            raise OpenELMError(
                f"layer {i}'s FFN can reach {ffn_peak:.3g}, which float16 holds only scaled by 2**-{k}, losing its "
                f"ordinary values: {FLOAT32_HINT}"
            )
        exponents.append(k)
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
