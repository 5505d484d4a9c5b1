"""The KV cache of one layer: keys (after RoPE) and values for the positions seen so far.

The same interface as mlx-lm's KVCache (offset, update_and_fetch, state, trim), so either drives
the model. It is written here because importing mlx-lm costs ~3 s of start-up (it imports
transformers), more than a short generation takes; see benchmarks/startup.py.
"""

from typing import List

import mlx.core as mx


class KVCache:
    step = 256  # grow in blocks of positions: one allocation per 256 tokens, not one per token

    def __init__(self):
        self.keys = None  # [B, kv_heads, capacity, head_dim]
        self.values = None
        self.offset = 0  # positions in use; those past it are stale and never read

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append keys/values [B, kv_heads, L, head_dim]; return everything cached so far."""
        start, end = self.offset, self.offset + keys.shape[2]
        if self.keys is None or end > self.keys.shape[2]:
            B, heads, _, dim = keys.shape
            grow = -(-keys.shape[2] // self.step) * self.step
            new_k = mx.zeros((B, heads, grow, dim), keys.dtype)
            new_v = mx.zeros((B, heads, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :start, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :start, :], new_v], axis=2)
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    @property
    def state(self):
        return self.keys, self.values

    def trim(self, n: int) -> int:
        """Forget the last n positions (rejected draft tokens, an interrupted reply)."""
        n = min(self.offset, n)
        self.offset -= n
        return n


def make_cache(model) -> List[KVCache]:
    """One cache per layer; a model that keeps its own state (an exported package) makes its own."""
    if hasattr(model, "make_cache"):
        return model.make_cache()
    return [KVCache() for _ in model.layers]
