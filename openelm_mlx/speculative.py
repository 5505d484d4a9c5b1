"""Speculative decoding: a cheap drafter proposes the next tokens, the model checks them all in one
forward pass and keeps the prefix it agrees with, so one model call yields one or more tokens.

Lossless. Greedy: the text is the model's own greedy text, token for token. Sampling: every token
follows the model's distribution p (Leviathan et al., 2023): a draft token d drawn from the
drafter's q is kept with probability min(1, p(d) / q(d)), and the first one rejected is replaced by
a draw from max(p - q, 0), normalized. A prompt-lookup draft is certain (q is one-hot), and then
the rule is the same as drawing from p and keeping d when the draw equals it.

How many tokens to draft is DraftPolicy's choice, step by step: none at all where drafts do not pay.

Two drafters: PromptLookup matches the last few tokens against the text so far and proposes what
followed them there (no second model; pays off when the answer copies from the prompt or the text
repeats itself; mlx-lm has none). DraftModel runs a smaller OpenELM with the same tokenizer.
mlx-lm's speculative_generate_step is not used: its sampled verification keeps a draft only when
an independent draw from p equals it, which accepts less often than min(1, p/q) for model drafts,
and it would bring mlx-lm's 3 s import into start-up.
"""

from typing import Dict, List, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from .cache import make_cache
from .sample import Sampling

# Prompt lookup tries the last 3 tokens, then 2. A single token recurs too often by chance: on free
# text most of its drafts were rejected (benchmarks/results/speculation-*).
MAX_NGRAM, MIN_NGRAM = 3, 2


class PromptLookup:
    """Drafts by finding the last MAX_NGRAM..MIN_NGRAM tokens earlier in the context."""

    free = True  # proposing costs no model call: its drafts can be checked against plain decoding's text

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


# A draft model probed after a plain run reads at most this many of the tokens it has not seen
# (it then drafts from them alone): catching up on the whole run would cost as much as drafting.
CATCH_UP = 32


class DraftModel:
    """Drafts by running a smaller model autoregressively, with its own KV cache."""

    free = False

    def __init__(self, model, sampling: Sampling, size: int):
        self.model, self.sampling, self.size = model, sampling, size
        self.cache = make_cache(model)
        self.fed = 0  # tokens of the context in the draft's cache

    def propose(self, context: List[int], k: int) -> Tuple[List[int], Optional[mx.array]]:
        """k tokens after the context, and the distributions [k, vocab] they were drawn from
        (log-probabilities; kept lazy and evaluated once, so the k steps queue without a sync)."""
        if len(context) - self.fed > CATCH_UP:  # after a long plain run: a fresh cache, the recent text only
            self.cache, self.fed = make_cache(self.model), len(context) - CATCH_UP
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

    def share(self, model) -> float:
        """This drafter's step as a share of `model`'s, until timed: by parameters on a CPU (its
        quantized kernels are no faster than float ones), by weight bytes elsewhere (decoding reads
        them)."""
        if mx.default_device() == mx.cpu:
            return self.model.config.num_parameters() / model.config.num_parameters()
        return weight_bytes(self.model) / weight_bytes(model)

    def rollback(self, valid: int):
        """The first `valid` tokens of the context are right: forget any fed after them."""
        if self.fed > valid:
            for c in self.cache:
                c.trim(self.fed - valid)
            self.fed = valid


def weight_bytes(model) -> int:
    """Bytes of every parameter as stored (packed weights, scales and biases when quantized)."""
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# Exponential weights of the newest observation: acceptance follows the text (a loop starts or ends
# within a few steps); step times are noisier (a shared machine) and drift slowly.
ACCEPT_WEIGHT, TIME_WEIGHT = 0.3, 0.2
PRIOR_ACCEPTANCE = 0.5  # a draft position not yet checked
OUTLIER = 1.5  # a step time counts as at most this times its estimate: one slow step moves it 10%
PRIOR_ROW = 0.5  # a drafted row not yet timed costs this share of a plain step (reference BLAS: ~0.5-1)
# Plain runs between decisions: long enough that plain decoding keeps its pipelining (the next
# call queued before a token is handed out). After a draft model's losing probe the run is as long
# as makes the probe's extra time PROBE_SHARE of the run's (a probe catches the draft model up).
MIN_RUN, MAX_RUN = 8, 256
PROBE_SHARE = 0.05


def ewma(old: Optional[float], new: float, weight: float) -> float:
    return new if old is None else old + weight * (new - old)


class DraftPolicy:
    """Chooses how many tokens to draft before each verification pass: the k in 0..size with the
    most expected tokens per second, E(k) / T(k).

    E(k) = 1 + a1 + a1*a2 + ... + a1*...*ak tokens per pass (the accepted prefix and one token of the
    model's own), a_i the exponentially weighted rate at which draft position i was accepted when
    the positions before it were. T(k): the measured seconds of a step that drafts k tokens (the
    drafting, a draft model's passes included, the pass over k + 1 rows, the verification), an
    exponentially weighted mean per k; between measured k interpolated, beyond the largest one
    extrapolated (row_seconds); a draft model's step priced, until timed, at draft_share
    (DraftModel.share) of a plain step. T(0) is a step of plain decoding, timed per token over plain
    runs; prompt lookup's first step is a probe (k = 1) and its second a plain run, a draft model's
    first a plain run and its second a probe (if it may pay at all: may_pay), so T(0) is known from
    then on.
    Only the calls decoding makes anyway are timed (no calibration pass); the first step of each k
    is not (a new shape's first pass allocates) and no time counts past OUTLIER x its estimate: a k
    made to look dear by one slow step on a shared machine would not be tried again.

    Why: a drafted row's cost depends on the BLAS (the mlx[cpu] wheel's reference BLAS: a 2-row
    pass ~2x a 1-row one; OpenBLAS: nearly free) and acceptance on the text, so a fixed draft length
    loses wherever drafts are rejected (0.69x of plain decoding on a passage the model does not copy).

    k = 0 decodes plainly for `run` tokens. A loop that appears later is still found: a free drafter
    (prompt lookup) has the drafts it would have made in the run checked against the text (check:
    no model call), and always drafts `size` tokens of which k are verified, so the position after
    them is checked against the model's own token and longer drafts are found worth it; a draft
    model that may pay gets a probe of k = 1 after each run, the next run as long as makes the
    probe's extra time PROBE_SHARE of the run's.
    """

    def __init__(self, size: int, free: bool, draft_share: float = 0.0):
        self.size, self.free, self.draft_share = size, free, draft_share
        self.acceptance = [PRIOR_ACCEPTANCE] * size
        self.seconds: List[Optional[float]] = [None] * (size + 1)
        self.timed = [False] * (size + 1)  # a first step of this k was seen (and not timed)
        # prompt lookup's first step drafts (a prompt may repeat itself); a draft model's first step is
        # a plain run, so that its probe is measured against plain decoding and sizes the next run
        self.run, self.probe, self.probing = MIN_RUN, free, False
        if not free and not self.may_pay():  # plain decoding throughout, in runs as long as they come
            self.run = MAX_RUN
        self.pending: Dict[int, Tuple[List[int], int]] = {}  # check: position -> (draft, positions observed)

    def expected_tokens(self, k: int) -> float:
        total = chain = 1.0
        for a in self.acceptance[:k]:
            chain *= a
            total += chain
        return total

    def step_seconds(self, k: int) -> float:
        known = [(j, t) for j, t in enumerate(self.seconds) if t is not None]  # (0, T(0)) first
        j0, t0 = [p for p in known if p[0] <= k][-1]
        above = [p for p in known if p[0] >= k]
        if not above:
            return t0 + (k - j0) * self.row_seconds(known)
        j1, t1 = above[0]
        return t0 if j1 == j0 else t0 + (t1 - t0) * (k - j0) / (j1 - j0)

    def row_seconds(self, known: list) -> float:
        """A drafted token's cost beyond the largest k timed: the slope between the two largest k
        timed; with one, a draft model's cost per drafted token over plain decoding (its own steps
        are most of it), a free drafter's PRIOR_ROW of a plain step (a step's fixed cost, the lost
        pipelining, is not per row)."""
        (ja, ta), (jb, tb) = known[-2:] if len(known) > 1 else (known[0], known[0])
        if ja == 0 and (jb == 0 or self.free):
            return (PRIOR_ROW + self.draft_share) * known[0][1]
        return max(tb - ta, 0.0) / (jb - ja)

    def draft_length(self, room: int) -> int:
        """k for the next step, at most `room` (the tokens left after the pass's own)."""
        best = 0  # until T(0) is timed: the first step probes, the next decodes plainly
        if self.seconds[0] is not None:
            best = max(range(min(self.size, room) + 1), key=lambda k: self.expected_tokens(k) / self.step_seconds(k))
        self.probing = not best and self.probe and room > 0
        if best:
            self.run = MIN_RUN
        elif self.probing:
            self.probe, best = False, 1
        return best

    def observe(self, draft: List[int], text: List[int], first: int = 0):
        """A draft against the tokens that followed where it was made: each position up to the first
        that differs is one observation of its acceptance (the text's next token is the model's own);
        positions before `first` were observed already (with less of the text known)."""
        k = min(len(draft), len(text))
        accepted = next((i for i in range(k) if draft[i] != text[i]), k)
        for i in range(first, min(accepted + 1, k)):
            self.acceptance[i] = ewma(self.acceptance[i], float(i < accepted), ACCEPT_WEIGHT)

    def drafted(self, k: int, seconds: float):
        """A step that drafted k tokens took `seconds`."""
        if self.probing and self.seconds[0]:  # its whole time: a probe's cost is the draft model catching up
            # on the run before it; the next probe catches up on the next run, up to CATCH_UP tokens
            waste = (seconds - self.seconds[0]) * CATCH_UP / min(self.run, CATCH_UP)
            self.run = min(MAX_RUN, max(MIN_RUN, round(waste / (PROBE_SHARE * self.seconds[0]))))
        if self.timed[k]:  # past OUTLIER x a measured estimate counts as that (a preempted step, mostly)
            if self.seconds[k] is not None:
                seconds = min(seconds, OUTLIER * self.step_seconds(k))
            self.seconds[k] = ewma(self.seconds[k], seconds, TIME_WEIGHT)
        self.timed[k] = True

    def plain(self, tokens: int, seconds: float, chosen: bool):
        """A plain run of `tokens`; chosen: the policy's k = 0 (not an empty draft)."""
        self.seconds[0] = ewma(self.seconds[0], seconds / tokens, TIME_WEIGHT)
        self.probe = chosen and not self.free and self.may_pay()

    def may_pay(self) -> bool:
        """Whether a draft model can pay at all: a whole accepted draft of k tokens yields k + 1
        tokens for a step of at least 1 + draft_share k plain steps (the pass, the draft model's k
        steps), no gain from draft_share 1 on, whatever the BLAS (a 4-bit copy of the model
        drafting for it on a CPU, where quantized kernels are no faster than float ones): such a
        draft model is never probed."""
        return self.draft_share < 1

    def check(self, drafter, context: List[int], start: int) -> int:
        """The drafts a free drafter would have made at each token from `start` on, checked against
        the text known after it; returns the first token whose `size` tokens of text are not all
        known yet. Every position of a draft is checked, also those past the k verified, so a
        loop's long drafts are known to be right before they are first verified; and as soon as
        the text after it is known (the rest of a draft later, `pending`), so that a loop is
        drafted a token after it shows, not `size` tokens after."""
        stop = max(start, len(context) - self.size)
        for j in range(start, len(context)):
            draft, seen = self.pending.pop(j, None) or (drafter.propose(context[:j], self.size)[0], 0)
            known = context[j : j + self.size]
            self.observe(draft, known, first=seen)
            if j >= stop:
                self.pending[j] = (draft, len(known))
        return stop


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
