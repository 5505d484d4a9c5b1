"""OpenELM in MLX: parameter names follow the Hugging Face checkpoint, so weights load as they are."""

import os
import sys
from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn

from .config import OpenELMConfig

# Below this many tokens a quantized matmul is cheaper than dequantizing its weight.
DEQUANTIZE_MIN_TOKENS = 16


# Dequantize-then-BLAS pays off only with an optimised BLAS. 270M q4, 64-token prompt, 2-core EPYC:
# 16x mlx-lm's prefill with OpenBLAS preloaded, but 0.81x with the mlx[cpu] wheel's bundled
# reference BLAS (~6 GFLOP/s), which is no faster than MLX's quantized kernel. An unknown BLAS
# keeps MLX's quantized kernel: mlx-lm's own path, so never slower than mlx-lm.
FAST_BLAS = ("openblas", "mkl", "blis", "accelerate", "veclib", "armpl")  # in the library's path
_fast_blas: Optional[bool] = None


def sgemm_library() -> str:
    """The file whose cblas_sgemm MLX's CPU matmuls call ('' if not found): one in the process's
    global scope (LD_PRELOAD) wins over libmlx's own dependency, as in the dynamic linker."""
    import ctypes  # here: only a quantized CPU prefill asks, once per process

    if sys.platform == "darwin":
        return "Accelerate"

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p)] + [("s", ctypes.c_void_p)] * 2

    with open("/proc/self/maps") as maps:
        libmlx = next((line.split()[-1] for line in maps if line.rstrip().endswith("/libmlx.so")), None)
    for scope in (None, libmlx):
        try:
            address = ctypes.cast(ctypes.CDLL(scope, os.RTLD_NOLOAD | os.RTLD_LAZY).cblas_sgemm, ctypes.c_void_p)
            info = DlInfo()
            if ctypes.CDLL(None).dladdr(address, ctypes.byref(info)):
                return os.path.realpath(info.fname.decode())
        except (OSError, AttributeError):  # not in this scope, or no libmlx.so (another build)
            continue
    return ""


def dequantize_pays_off() -> bool:
    """Whether MLX's CPU matmuls use a fast BLAS (looked up once per process)."""
    global _fast_blas
    if _fast_blas is None:
        _fast_blas = any(name in sgemm_library().lower() for name in FAST_BLAS)
    return _fast_blas


def linear(layer, x: mx.array) -> mx.array:
    """x through a linear layer (or the tied embedding used as one). For a quantized layer over
    many tokens on a CPU with a fast BLAS, dequantize once and use BLAS: MLX's CPU kernel does one
    matrix-vector product per token (15x slower for 128 tokens with OpenBLAS)."""
    quantized = isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    if quantized and x.shape[-2] >= DEQUANTIZE_MIN_TOKENS and mx.default_device() == mx.cpu and dequantize_pays_off():
        w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
        return x @ w.T.astype(x.dtype)
    if isinstance(layer, (nn.Embedding, nn.QuantizedEmbedding)):
        return layer.as_linear(x)
    return layer(x)


@mx.compile
def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up as one fused kernel (as mlx-lm's, written here: importing mlx-lm costs ~3 s)."""
    return nn.silu(gate) * up


class Attention(nn.Module):
    def __init__(self, config: OpenELMConfig, layer: int):
        super().__init__()
        self.head_dim = hd = config.head_dim
        self.n_heads = config.num_query_heads[layer]
        self.n_kv_heads = config.num_kv_heads[layer]
        self.scale = hd**-0.5
        self.eps = config.rms_norm_eps
        self.rope_base = config.rope_freq_constant
        d = config.model_dim
        self.qkv_proj = nn.Linear(d, (self.n_heads + 2 * self.n_kv_heads) * hd, bias=False)
        self.out_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        # One head_dim-wide weight shared by every head (corenet's QK-norm).
        self.q_norm = nn.RMSNorm(hd, eps=self.eps)
        self.k_norm = nn.RMSNorm(hd, eps=self.eps)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        B, L, _ = x.shape
        qkv = linear(self.qkv_proj, x).reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3)
        # [B, q + 2*kv heads, L, hd] split in checkpoint order: q heads | k heads | v heads
        q, k, v = mx.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=1)
        q, k = self.q_norm(q), self.k_norm(k)

        offset = cache.offset if cache is not None else 0
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_base, scale=1.0, offset=offset)
        if cache is not None:  # cache keys after RoPE: equal to HF's re-rotation, cheaper
            k, v = cache.update_and_fetch(k, v)

        # GQA: query head j reads kv head j // (n_heads / n_kv_heads), as the fast kernel does.
        if hasattr(cache, "bits"):
            out = quantized_attention(q, k, v, self.scale, mask, cache)
        else:
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return linear(self.out_proj, out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def quantized_attention(q, k, v, scale, mask, cache) -> mx.array:
    """Attention over mlx-lm's quantized KV cache (mlx_lm generate_step(..., kv_bits=...) swaps it
    in): keys and values come as (packed, scales, biases). Only mlx-lm makes such a cache, so
    mlx-lm is already imported when this runs, and its kernel serves."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    return quantized_scaled_dot_product_attention(q, k, v, scale, mask, cache.group_size, cache.bits)


class FeedForward(nn.Module):
    def __init__(self, config: OpenELMConfig, layer: int):
        super().__init__()
        d, ffn = config.model_dim, config.ffn_dims[layer]
        self.proj_1 = nn.Linear(d, 2 * ffn, bias=False)
        self.proj_2 = nn.Linear(ffn, d, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = mx.split(linear(self.proj_1, x), 2, axis=-1)  # the first half is the gate
        return linear(self.proj_2, swiglu(gate, up))


class TransformerBlock(nn.Module):
    def __init__(self, config: OpenELMConfig, layer: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.model_dim, eps=config.rms_norm_eps)
        self.attn = Attention(config, layer)
        self.ffn_norm = nn.RMSNorm(config.model_dim, eps=config.rms_norm_eps)
        self.ffn = FeedForward(config, layer)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        h = x + self.attn(self.attn_norm(x), mask, cache)
        return h + self.ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: OpenELMConfig):
        super().__init__()
        self.token_embeddings = nn.Embedding(config.vocab_size, config.model_dim)
        self.layers = [TransformerBlock(config, i) for i in range(config.num_transformer_layers)]
        self.norm = nn.RMSNorm(config.model_dim, eps=config.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        h = self.token_embeddings(tokens)
        cache = cache or [None] * len(self.layers)
        # The fast kernel's "causal" mask is aligned to the end, so it also holds
        # when earlier tokens sit in the cache; a single query needs none.
        mask = "causal" if h.shape[1] > 1 else None
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    """OpenELM: tokens [B, S] (and an optional per-layer KV cache) -> logits [B, S, vocab]."""

    def __init__(self, config: OpenELMConfig):
        super().__init__()
        self.config = config
        self.model_type = "openelm"
        self.transformer = Transformer(config)

    def __call__(self, tokens: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        h = self.transformer(tokens, cache)
        return linear(self.transformer.token_embeddings, h)  # tied output layer

    @property
    def layers(self):
        return self.transformer.layers
