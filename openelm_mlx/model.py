"""OpenELM in MLX: parameter names follow the Hugging Face checkpoint, so weights load as they are."""

from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn

from .config import OpenELMConfig


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
        qkv = self.qkv_proj(x).reshape(B, L, -1, self.head_dim).transpose(0, 2, 1, 3)
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
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


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
        gate, up = mx.split(self.proj_1(x), 2, axis=-1)  # the first half is the gate
        return self.proj_2(swiglu(gate, up))


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
        return self.transformer.token_embeddings.as_linear(h)  # tied output layer

    @property
    def layers(self):
        return self.transformer.layers
