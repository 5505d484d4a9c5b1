"""Sampling: which distribution the next token is drawn from, and the draw.

The filters and their order are mlx-lm's (top-p, min-p, top-k on the model's log-probabilities,
then the temperature), so a seed gives the same text in both. They are written here rather than
imported because importing mlx-lm costs ~3 s of start-up, and because speculative decoding needs
the distribution itself (to accept or reject a draft), not only a sampled token.
"""

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx

REPETITION_CONTEXT = 20  # tokens the repetition penalty looks back over, as in mlx-lm


@dataclass
class Sampling:
    """The filters of one draw (their ranges: options.generation_rules); generate.GenerationOptions
    is these and the rest of generate's options."""

    temp: float = 0.0  # 0: greedy
    top_p: float = 0.0  # 0 or 1: off
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: Optional[float] = None  # None or 1: off

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    @property
    def penalizes(self) -> bool:
        return self.repetition_penalty not in (None, 1.0)

    def logprobs(self, logits: mx.array, history: Sequence[mx.array] = ()) -> mx.array:
        """Log-probabilities [N, vocab] of the distribution each row's token is drawn from. Row i's
        repetition penalty looks at history[i], the tokens before it (only used with a penalty)."""
        logits = logits.astype(mx.float32)
        if self.penalizes:
            logits = mx.concatenate([self._penalize(row[None], seen) for row, seen in zip(logits, history)])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if self.greedy:
            return logprobs
        if 0 < self.top_p < 1:
            logprobs = _top_p(logprobs, self.top_p)
        if self.min_p > 0:
            logprobs = mx.where(
                logprobs < logprobs.max(axis=-1, keepdims=True) + math.log(self.min_p), -mx.inf, logprobs
            )
        if self.top_k > 0:
            drop = mx.argpartition(-logprobs, kth=self.top_k - 1, axis=-1)[..., self.top_k :]
            logprobs = mx.put_along_axis(logprobs, drop, mx.array(-mx.inf, logprobs.dtype), axis=-1)
        scaled = logprobs * (1.0 / self.temp)
        return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)

    def sample(self, logprobs: mx.array) -> mx.array:
        """One token per row of `logprobs()`'s output."""
        if self.greedy:
            return mx.argmax(logprobs, axis=-1)
        return mx.random.categorical(logprobs)

    def _penalize(self, logits: mx.array, seen: mx.array) -> mx.array:
        seen = seen[-REPETITION_CONTEXT:]
        if seen.size == 0:
            return logits
        chosen = logits[:, seen]
        p = self.repetition_penalty
        logits[:, seen] = mx.where(chosen < 0, chosen * p, chosen / p)
        return logits


def _top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Keep the most likely tokens whose probabilities add up to top_p (at least one)."""
    ordered = mx.sort(logprobs, axis=-1)
    probs = mx.exp(ordered)
    mass_above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
    dropped = (mass_above >= top_p * (mass_above[..., :1] + probs[..., :1])).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(ordered, dropped, axis=-1)
    return mx.where(logprobs < threshold, -mx.inf, logprobs)
