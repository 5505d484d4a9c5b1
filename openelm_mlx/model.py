"""OpenELM in MLX: parameter names follow the Hugging Face checkpoint, so weights load as they are."""

import os
import threading
from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn

from . import blas
from .config import OpenELMConfig

# Below this many tokens a quantized matmul is cheaper than dequantizing its weight.
DEQUANTIZE_MIN_TOKENS = 16
# From this many multiply-adds on, a matmul split across 2 CPU threads ran 0.99-2.0x as fast as
# whole (median 1.77x, 62 cases of 270M and demo-model shapes); below it, 13 of 26 cases ran slower,
# down to 0.56x (benchmarks/cpu_split.py, results/cpu-split-linux-cpu-2026-11-30.json).
SPLIT_MIN_WORK = 1 << 20


# Measured on a 2-core EPYC, 270M, ours / mlx-lm (benchmarks/results/linux-cpu-*-2026-11-30*):
# - Dequantize-then-BLAS pays off only with an optimised BLAS: q4, 64-token prompt, 16x mlx-lm's
#   prefill with OpenBLAS preloaded, 0.81x with the mlx[cpu] wheel's bundled reference BLAS.
# - MLX runs each CPU op on one thread. Split across threads (one CPU stream per core), a
#   quantized matmul ran ~1.8x faster; so did a float one over several rows with the reference
#   BLAS (an optimised BLAS splits its own work). With column_major(): 270M pp64 / tg16 1.5-2.9x
#   mlx-lm's in fp32, q8 and q4, the logits bit for bit the same.
def linear(layer, x: mx.array) -> mx.array:
    """x through a linear layer (or the tied embedding used as one), the fastest way measured
    for the device and BLAS (above); every way gives the same values."""
    quantized = isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    rows = x.size // x.shape[-1]
    if mx.default_device() == mx.cpu and getattr(layer, "bias", None) is None:
        streams = cpu_streams()
        if quantized and rows >= DEQUANTIZE_MIN_TOKENS and blas.fast_blas():
            w = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits, layer.mode)
            return x @ w.T.astype(x.dtype)
        work = rows * x.shape[-1] * layer.weight.shape[0]  # multiply-adds
        if len(streams) > 1 and work >= SPLIT_MIN_WORK:
            if quantized:  # by output features, so that one row (decoding) splits too
                return mx.concatenate(
                    [quantized_rows(layer, x, *r, s) for r, s in zip(cuts(layer.weight, streams), streams)], -1
                )
            if rows > 1 and not blas.fast_blas():  # by rows: a slice of a column-major weight is a copy
                flat = x.reshape(rows, x.shape[-1])
                parts = [
                    mx.matmul(flat[i:j], layer.weight.T, stream=s) for (i, j), s in zip(cuts(flat, streams), streams)
                ]
                return mx.concatenate(parts, 0).reshape(*x.shape[:-1], -1)
    if isinstance(layer, (nn.Embedding, nn.QuantizedEmbedding)):
        return layer.as_linear(x)
    return layer(x)


_threads = threading.local()


def cpu_streams() -> list:
    """A stream (a thread) per core this process may use, at most 4 (measured: 2). The first is the
    caller's own (None): handing every part to new streams made a 9-token pass 20% slower. MLX
    streams serve only the thread that made them, so each thread gets its own."""
    if not hasattr(_threads, "streams"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        _threads.streams = [None] + [mx.new_stream(mx.cpu) for _ in range(min(cores, 4) - 1)]
    return _threads.streams


def cuts(a: mx.array, streams: list) -> list:
    """(start, stop) of near-equal runs of `a`'s rows, one per stream, none empty (MLX's quantized
    kernel crashes the process on an empty weight)."""
    n = a.shape[0]
    k = min(len(streams), n)
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


def quantized_rows(layer, x: mx.array, start: int, stop: int, stream) -> mx.array:
    """x times the output features [start, stop) of a quantized layer, computed on `stream`."""
    biases = layer.get("biases")
    return mx.quantized_matmul(
        x,
        layer.weight[start:stop],
        layer.scales[start:stop],
        None if biases is None else biases[start:stop],
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
        stream=stream,
    )


def column_major(model: nn.Module) -> None:
    """On a CPU with the reference BLAS, store each float32 matrix column-major (same values): its
    sgemm computes x @ W.T as a dot product per output, but as vector updates, 2x faster, when
    W.T is contiguous. Files written from the model hold the values row-major all the same."""
    if mx.default_device() != mx.cpu or blas.fast_blas():
        return
    for _, m in model.named_modules():
        if type(m) in (nn.Linear, nn.Embedding) and m.weight.dtype == mx.float32:
            m.weight = mx.contiguous(m.weight.T).T
            mx.eval(m.weight)  # one at a time: peak memory is the model plus one matrix


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
