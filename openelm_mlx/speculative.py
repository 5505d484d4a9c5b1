"""Speculative decoding: a cheap drafter proposes the next tokens, the model checks them all in one
forward pass and keeps the prefix it agrees with, so one model call yields one or more tokens.

Lossless. Greedy: the text is the model's own greedy text, token for token. Sampling: every token
follows the model's distribution p (Leviathan et al., 2023): a draft token d drawn from the
drafter's q is kept with probability min(1, p(d) / q(d)), and the first one rejected is replaced by
a draw from max(p - q, 0), normalized. A prompt-lookup draft is certain (q is one-hot), and then
the rule is the same as drawing from p and keeping d when the draw equals it.

Two drafters: PromptLookup matches the last few tokens against the text so far and proposes what
followed them there (no second model; pays off when the answer copies from the prompt or the text
repeats itself; mlx-lm has none). DraftModel runs a smaller OpenELM with the same tokenizer.
mlx-lm's speculative_generate_step is not used: its sampled verification keeps a draft only when
an independent draw from p equals it, which accepts less often than min(1, p/q) for model drafts,
and it would bring mlx-lm's 3 s import into start-up.
"""

from typing import List, Optional, Tuple

import mlx.core as mx

from .cache import make_cache
from .sample import Sampling

# Prompt lookup tries the last 3 tokens, then 2. A single token recurs too often by chance: on free
# text most of its drafts were rejected (benchmarks/results/speculation-*).
MAX_NGRAM, MIN_NGRAM = 3, 2


class PromptLookup:
    """Drafts by finding the last MAX_NGRAM..MIN_NGRAM tokens earlier in the context."""

    def __init__(self, size: int):
        self.size = size

    def propose(self, context: List[int], k: int) -> Tuple[List[int], Optional[mx.array]]:
        import numpy as np  # only --prompt-lookup needs it: every `openelm generate` imports this module

        tokens = np.asarray(context)
        for n in range(min(MAX_NGRAM, len(tokens) - 1), MIN_NGRAM - 1, -1):
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            starts = np.flatnonzero((windows == tokens[-n:]).all(axis=1)) + n  # where a continuation begins
            if starts.size:
                # The latest match that has k tokens after it (the freshest copy of a loop), else the
                # earliest (the longest continuation).
                full = starts[starts + k <= len(tokens)]
                start = full[-1] if full.size else starts[0]
                return tokens[start : start + k].tolist(), None
        return [], None

    def rollback(self, valid: int):
        pass  # no state


class DraftModel:
    """Drafts by running a smaller model autoregressively, with its own KV cache."""

    def __init__(self, model, sampling: Sampling, size: int):
        self.model, self.sampling, self.size = model, sampling, size
        self.cache = make_cache(model)
        self.fed = 0  # tokens of the context in the draft's cache

    def propose(self, context: List[int], k: int) -> Tuple[List[int], Optional[mx.array]]:
        """k tokens after the context, and the distributions [k, vocab] they were drawn from
        (log-probabilities; kept lazy and evaluated once, so the k steps queue without a sync)."""
        logits = self.model(mx.array(context[self.fed :])[None], cache=self.cache)[0, -1:]
        self.fed = len(context)
        seen = mx.array(context)
        draft, dists = [], []
        for i in range(k):
            logprobs = self.sampling.logprobs(logits, [seen])
            token = self.sampling.sample(logprobs)
            draft.append(token)
            dists.append(logprobs)
            if i + 1 < k:
                seen = mx.concatenate([seen, token])
                logits = self.model(token[None], cache=self.cache)[0, -1:]
                self.fed += 1
        draft, dists = mx.concatenate(draft), mx.concatenate(dists)
        mx.eval(draft, dists)
        return draft.tolist(), dists

    def rollback(self, valid: int):
        """The first `valid` tokens of the context are right: forget any fed after them."""
        if self.fed > valid:
            for c in self.cache:
                c.trim(self.fed - valid)
            self.fed = valid


def verify(logprobs: mx.array, draft: List[int], q: Optional[mx.array], sampling: Sampling) -> List[int]:
    """The accepted draft tokens and one more from the model: logprobs [len(draft) + 1, vocab] are
    the model's distributions after the context and after each draft token; q the drafter's, or
    None for a certain draft."""
    k = len(draft)
    if q is None or sampling.greedy:  # a certain draft, or greedy: keep d while it is the model's pick
        picks = sampling.sample(logprobs).tolist()
        n = next((i for i in range(k) if picks[i] != draft[i]), k)
        return draft[:n] + [picks[n]]
    rows, ids = mx.arange(k), mx.array(draft)
    p, q = mx.exp(logprobs), mx.exp(q)
    keep = (mx.random.uniform(shape=(k,)) * q[rows, ids] < p[rows, ids]).tolist()
    n = next((i for i in range(k) if not keep[i]), k)
    if n == k:
        return draft + [sampling.sample(logprobs[k:]).item()]
    residual = mx.maximum(p[n] - q[n], 0.0)
    if residual.sum().item() <= 0:  # p == q up to rounding: a rejection had probability ~0
        residual = p[n]
    return draft[:n] + [mx.random.categorical(mx.log(residual)).item()]
