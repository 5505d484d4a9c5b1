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

from .errors import OpenELMError
from .options import SEED, check_options

REPETITION_CONTEXT = 20  # tokens the repetition penalty looks back over, as in mlx-lm


@dataclass
class Sampling:
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

    def check(self, vocab_size: int):
        """Refuse values that would sample from nothing, or from something else than asked."""
        finite = all(math.isfinite(v) for v in (self.temp, self.top_p, self.min_p, self.repetition_penalty or 1.0))
        checks = [
            (finite, "sampling options must be finite numbers"),
            (self.temp >= 0, f"--temp must be >= 0 (0 is greedy), got {self.temp}"),
            (0 <= self.top_p <= 1, f"--top-p must be in [0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"--top-k must be >= 0 (0 turns it off), got {self.top_k}"),
            (
                self.top_k < vocab_size,
                f"--top-k must be below the vocabulary size {vocab_size} (0 turns it off), got {self.top_k}",
            ),
            (0 <= self.min_p <= 1, f"--min-p must be in [0, 1], got {self.min_p}"),
            (
                self.repetition_penalty is None or self.repetition_penalty > 0,
                f"--repetition-penalty must be > 0 (1 turns it off), got {self.repetition_penalty}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise OpenELMError(message)

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


def check_seed(seed: Optional[int]):
    """MLX's random seed is an unsigned 64-bit integer: the rule every command's --seed follows."""
    if seed is not None:
        check_options({"seed": seed}, {"seed": SEED})


def _top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Keep the most likely tokens whose probabilities add up to top_p (at least one)."""
    ordered = mx.sort(logprobs, axis=-1)
    probs = mx.exp(ordered)
    mass_above = mx.cumsum(probs, axis=-1, reverse=True, inclusive=False)
    dropped = (mass_above >= top_p * (mass_above[..., :1] + probs[..., :1])).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(ordered, dropped, axis=-1)
    return mx.where(logprobs < threshold, -mx.inf, logprobs)
