"""What mlx-swift-lm (ml-explore/mlx-swift-lm, the Swift MLX runner) makes of our config.json.
Its OpenELM.swift reads only head_dim, num_transformer_layers, model_dim, vocab_size,
ffn_dim_divisor and three flags; it rebuilds every layer's widths from the released recipe and
fixes rope θ and the norm eps. A config built otherwise loads there wrongly or not at all."""

import math
from typing import List, Optional

import numpy as np

from .config import OpenELMConfig

f32 = np.float32


def swift_linspace(start: float, stop: float, layers: int) -> List[float]:
    """`stride(from:through:by:)` over Float then `round(x * 100) / 100` (OpenELM.swift:264-268,
    283-287). Swift's stride computes start + i * step in float32 and keeps the last value only if
    it lands on `stop` or below, so it can come out one short; round() is half away from zero."""
    step = (f32(stop) - f32(start)) / f32(layers - 1)
    values, i = [], 0
    while (v := f32(start) + f32(i) * step) <= f32(stop):
        values.append(f32(math.floor(float(v * f32(100)) + 0.5)) / f32(100))
        i += 1
    return values


def swift_make_divisible(v, divisor: int) -> int:
    """makeDivisible in float32 (OpenELM.swift:20-28), corenet's rule."""
    v = f32(v)
    rounded = max(f32(divisor), f32(int((v + f32(divisor) / f32(2)) / f32(divisor)) * divisor))
    if rounded < f32(0.9) * v:
        rounded += f32(divisor)
    return int(rounded)


def mlx_swift_lm_differences(config: OpenELMConfig) -> List[str]:
    """Where mlx-swift-lm's rebuilt model (OpenELM.swift:244-298: linspaces 0.5-1.0 and 0.5-4.0,
    4 query heads per kv head, θ 1e4, eps 1e-6, untied head Linear(layers, vocab) at :194-196)
    differs from `config`; empty for Apple's released configs."""
    c, n = config, config.num_transformer_layers
    if n < 2:
        return [f"{n} layer: mlx-swift-lm divides by layers - 1"]
    qkv, ffn = swift_linspace(0.5, 1.0, n), swift_linspace(0.5, 4.0, n)
    if len(qkv) != n or len(ffn) != n:
        return [f"mlx-swift-lm's float32 multipliers for {n} layers come out one short (it would crash)"]
    q_heads = [swift_make_divisible(f32(c.model_dim) * m, c.head_dim * 4) // c.head_dim for m in qkv]
    rebuilt = {
        "num_query_heads": (q_heads, c.num_query_heads),
        "num_kv_heads": ([q // 4 for q in q_heads], c.num_kv_heads),
        "ffn widths": ([swift_make_divisible(m * f32(c.model_dim), c.ffn_dim_divisor) for m in ffn], c.ffn_dims),
        "rope_freq_constant": (10000, c.rope_freq_constant),
        "rms_norm_eps": (1e-6, c.rms_norm_eps),
        "share_input_output_layers": (True, c.share_input_output_layers),
        "ffn_with_glu": (True, c.ffn_with_glu),
    }
    return [f"{name} {ours} (it uses {theirs})" for name, (theirs, ours) in rebuilt.items() if theirs != ours]


def mlx_swift_lm_notice(config: OpenELMConfig) -> Optional[str]:
    """One line for stderr when mlx-swift-lm would rebuild this model differently, else None."""
    differences = mlx_swift_lm_differences(config)
    if not differences:
        return None
    return (
        "note: mlx-swift-lm rebuilds OpenELM's widths from the released recipe and will not run "
        f"this folder as it is: {'; '.join(differences)}"
    )
