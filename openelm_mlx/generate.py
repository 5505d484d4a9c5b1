"""Text generation: the token loop (plain or speculative), stop strings, honest timings.

The loop is written here, not taken from mlx-lm's generate_step: importing mlx-lm costs ~3 s of
start-up, and speculative decoding needs the distributions that generate_step does not return.
"""

import time
from dataclasses import asdict, dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx

from .cache import make_cache
from .errors import OpenELMError
from .options import check_options, check_speculation, generation_rules
from .overflow import OTHER_DTYPE_OPTION, check_finite
from .progress import forward
from .sample import Sampling
from .speculative import MIN_RUN, DraftModel, DraftPolicy, PromptLookup, verify
from .tokenizer import Tokenizer
from .units import size_text

FALLBACK_PROMPT = "Once upon a time"  # what `openelm generate` continues when given no prompt
DEFAULT_MAX_TOKENS = 256  # when not given: this many, or what remains of the context if less
DEFAULT_NUM_DRAFT = 4  # tokens a draft model proposes per step
PREFILL_STEP = 2048  # prompt tokens per forward pass: bounds the activations' memory
# What the peak memory of a run counts: MLX's allocator sees an MLX model's memory; a package
# runner (Core ML, Core AI, the MIL executor) allocates outside it, so only the process's own
# peak resident memory, everything in it included, says what that run held.
MEMORY_LABELS = {"mlx": "peak memory", "process": "process peak RSS"}


@dataclass
class GenerationOptions(Sampling):
    """How to generate, besides the model and the prompt: `openelm generate`'s and `chat`'s
    options (their ranges: options.generation_rules). The sampling fields (temp, top_p, top_k,
    min_p, repetition_penalty) are Sampling's: the options are the draw's filters and the rest.
    Speculative decoding is lossless: the same text greedily, the same distribution when sampling."""

    max_tokens: Optional[int] = None  # None: DEFAULT_MAX_TOKENS, or what remains of the context if less
    seed: Optional[int] = None  # None: MLX's own
    stop: Sequence[str] = ()  # stop before the first of these strings
    truncate: bool = False  # cut the prompt's start (keeping BOS) to fit the context, instead of failing
    prompt_lookup: Optional[int] = None  # draft up to K tokens by matching the last tokens earlier in the text
    num_draft: Optional[int] = None  # tokens a draft model proposes per step (None: DEFAULT_NUM_DRAFT)

    def check(self, vocab_size: int, context: int, draft_model=None):
        """Refuse values that would sample from nothing, from something else than asked, or
        speculate without a drafter, before anything is generated."""
        check_options(asdict(self), generation_rules(vocab_size, context))
        check_speculation(self.prompt_lookup, draft_model, self.num_draft)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_dropped: int = 0  # tokens cut from the prompt's start by truncate=True
    prompt_tps: float = 0.0  # prompt tokens / time to first token
    generation_tokens: int = 0
    generation_tps: float = 0.0  # tokens after the first / time since the first
    time_to_first_token: float = 0.0  # seconds
    peak_memory_bytes: int = 0  # what memory_source says: MLX's peak allocation, or the process's peak RSS
    memory_source: str = "mlx"  # "mlx" (mx.get_peak_memory), or "process" for a package runner (peak RSS)
    drafted: int = 0  # speculative decoding: tokens proposed, and how many the model accepted
    accepted: int = 0
    finish_reason: Optional[str] = None  # "eos", "stop", "length"

    def summary(self) -> str:
        speculation = ""
        if self.drafted:
            share = self.accepted / self.drafted
            speculation = f" ({self.accepted} of {self.drafted} drafted tokens accepted, {share:.0%})"
        return (
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tok/s | "
            f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tok/s{speculation} | "
            f"time to first token: {self.time_to_first_token * 1000:.0f} ms | "
            f"{MEMORY_LABELS[self.memory_source]}: {size_text(self.peak_memory_bytes)}"
        )


@dataclass
class GenerationChunk:
    text: str
    token: Optional[int]  # None on the final chunk when it only flushes text
    stats: GenerationStats


def fit_context(
    prompt: List[int], max_tokens: Optional[int], context: int, cached: int = 0, truncate: bool = False
) -> Tuple[List[int], int]:
    """(the prompt, tokens to generate): checked against the context, or with truncate=True cut
    from the front, keeping BOS. max_tokens=None generates DEFAULT_MAX_TOKENS or what remains."""
    room = context - cached - len(prompt)
    if max_tokens is None:
        if room >= 1 or not truncate:
            max_tokens = max(1, min(DEFAULT_MAX_TOKENS, room))
        else:
            max_tokens = min(DEFAULT_MAX_TOKENS, (context - cached) // 2)
    need = cached + len(prompt) + max_tokens
    if need <= context:
        return prompt, max_tokens
    if not truncate:
        raise OpenELMError(
            f"{len(prompt)} prompt tokens + {cached} cached + {max_tokens} to generate = {need} "
            f"exceeds the model's context of {context}: shorten the prompt, lower --max-tokens, or pass --truncate"
        )
    keep = context - cached - max_tokens - 1
    if keep < 1:
        raise OpenELMError(f"--max-tokens {max_tokens} leaves no room for a prompt in a context of {context}")
    return prompt[:1] + prompt[-keep:], max_tokens


class StopMatcher:
    """Holds back text that may be the start of a stop string, and cuts at the first match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str):
        """Returns (text safe to emit, stopped)."""
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False


def prefill(model, tokens: List[int], cache: list):
    """Feed tokens into the cache, PREFILL_STEP at a time; their logits are never computed. An MLX
    model goes through progress.forward, which a CPU evaluates a layer at a time: a long prompt is
    one uninterruptible call otherwise (a 512-token prompt of the 270M shape: 56-111 s on a 2-core
    CPU with the reference BLAS), and Ctrl-C would wait for it."""
    layered = hasattr(model, "transformer")  # not a package's PackageModel, which owns its states
    for start in range(0, len(tokens), PREFILL_STEP):
        chunk = mx.array(tokens[start : start + PREFILL_STEP])[None]
        if layered:
            forward(model, chunk, cache, on_layer=lambda done, layers: None)
        else:
            model(chunk, cache=cache)
        mx.eval([c.state for c in cache])


def generate_tokens(model, tokens: List[int], cache: list, max_tokens: int, sampling: Sampling) -> Iterator[int]:
    """Token ids after `tokens`, one model call each (plain decoding)."""
    prefill(model, tokens[:-1], cache)
    return plain_steps(model, tokens, cache, max_tokens, sampling)


def plain_steps(model, tokens: List[int], cache: list, max_tokens: int, sampling: Sampling) -> Iterator[int]:
    """Token ids after `tokens`, whose last only is not in the cache yet, one model call each. The
    next step is queued before the current token is handed out (mx.async_eval), so the host's work
    overlaps the device's, as in mlx-lm. The cache ends holding all but the last token."""
    history = mx.array(tokens) if sampling.penalizes else None  # what the repetition penalty reads

    def step(ids: mx.array):
        nonlocal history
        logits = model(ids[None], cache=cache)[0, -1:]
        logprobs = sampling.logprobs(logits, [history])
        token = sampling.sample(logprobs)
        if history is not None:
            history = mx.concatenate([history, token])
        return token, logits, mx.isfinite(logits).all()

    token, logits, finite = step(mx.array(tokens[-1:]))
    mx.async_eval(token, finite)
    for n in range(max_tokens):
        if n + 1 < max_tokens:
            next_token, next_logits, next_finite = step(token)
            mx.async_eval(next_token, next_finite)
        check_finite(logits, logits.dtype, OTHER_DTYPE_OPTION, finite)
        yield token.item()
        if n + 1 < max_tokens:
            token, logits, finite = next_token, next_logits, next_finite


def speculate(
    model, tokens: List[int], cache: list, max_tokens: int, sampling: Sampling, drafter, stats
) -> Iterator[int]:
    """Token ids after `tokens`, drafted and verified where DraftPolicy expects that to be faster
    than plain decoding, plainly elsewhere; counts drafted/accepted into stats."""
    prefill(model, tokens[:-1], cache)
    context = list(tokens)  # the cache holds all of it but the last token
    policy = DraftPolicy(drafter.size, drafter.free, 0.0 if drafter.free else drafter.share(model))
    n, checked = 0, len(context)  # a free drafter's drafts are checked at every token of the text
    while n < max_tokens:
        start = time.perf_counter()
        k = policy.draft_length(max_tokens - n - 1)
        # a free drafter proposes in full: the model's own token after the k verified checks the next
        proposed, q = drafter.propose(context, drafter.size if drafter.free else k) if k > 0 else ([], None)
        draft = proposed[:k]
        if not draft:  # plain decoding, pipelined
            run, begin = policy.run if k == 0 else MIN_RUN, len(context)
            for token in plain_steps(model, context[:], cache, min(run, max_tokens - n), sampling):
                context.append(token)
                n += 1
                handed = time.perf_counter()
                yield token
                start += time.perf_counter() - handed  # the caller's time is not decoding's
            policy.plain(len(context) - begin, time.perf_counter() - start, chosen=k == 0)
            if drafter.free:
                checked = policy.check(drafter, context, checked)
            continue
        logits = model(mx.array(context[-1:] + draft)[None], cache=cache)[0]
        seen = [mx.array(context + draft[:i]) for i in range(len(draft) + 1)] if sampling.penalizes else []
        logprobs = sampling.logprobs(logits, seen)
        check_finite(logits, logits.dtype, OTHER_DTYPE_OPTION)
        new = verify(logprobs, draft, q, sampling)
        accepted = len(new) - 1
        policy.drafted(len(draft), time.perf_counter() - start)
        if not drafter.free:
            policy.observe(proposed, new)
        stats.drafted += len(draft)
        stats.accepted += accepted
        for c in cache:
            c.trim(len(draft) - accepted)
        drafter.rollback(len(context) + accepted)
        context += new
        if drafter.free:
            checked = policy.check(drafter, context, checked)
        for token in new:
            n += 1
            yield token


def stream_generate(
    model,
    tokenizer: Tokenizer,
    prompt: Union[str, List[int]],
    options: Optional[GenerationOptions] = None,
    cache: Optional[list] = None,
    draft_model=None,
) -> Iterator[GenerationChunk]:
    """Yield text as it is generated. A str prompt gets BOS; a token list is used as is, which
    lets a chat continue a `cache` (from openelm_mlx.cache.make_cache) turn after turn.
    draft_model (a smaller OpenELM with the same tokenizer) drafts for speculative decoding."""
    options = options or GenerationOptions()
    options.check(tokenizer.vocab_size, model.config.max_context_length, draft_model)
    drafter = make_drafter(model, options, draft_model)
    tokens = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not tokens:
        raise OpenELMError("the prompt is empty")
    cached = cache[0].offset if cache else 0
    context = model.config.max_context_length
    fitted, max_tokens = fit_context(tokens, options.max_tokens, context, cached, options.truncate)
    if options.seed is not None:
        mx.random.seed(options.seed)
    cache = make_cache(model) if cache is None else cache

    detokenizer = tokenizer.detokenizer(context=fitted)
    stopper = StopMatcher(options.stop)
    stats = GenerationStats(prompt_tokens=len(fitted), prompt_dropped=len(tokens) - len(fitted), finish_reason="length")
    mx.reset_peak_memory()
    start = time.perf_counter()
    if drafter is None:
        steps = generate_tokens(model, fitted, cache, max_tokens, options)
    else:
        steps = speculate(model, fitted, cache, max_tokens, options, drafter, stats)
    for n, token in enumerate(steps):
        now = time.perf_counter()
        if n == 0:
            first = now
            stats.time_to_first_token = now - start
            stats.prompt_tps = len(fitted) / stats.time_to_first_token
        else:
            stats.generation_tps = n / (now - first)
        stats.generation_tokens = n + 1
        stats.peak_memory_bytes, stats.memory_source = peak_memory(model)
        if token == tokenizer.eos_id:
            stats.finish_reason = "eos"
            break
        text, stopped = stopper.feed(detokenizer.add(token))
        if stopped:
            stats.finish_reason = "stop"
            yield GenerationChunk(text, token, stats)
            return
        yield GenerationChunk(text, token, stats)
    text, _ = stopper.feed(detokenizer.flush())
    yield GenerationChunk(text + stopper.pending, None, stats)


def peak_memory(model) -> Tuple[int, str]:
    """(bytes, memory_source) of the run so far: the model's own measure if it has one (a package
    runner's, convert/runner.py's PackageModel), else MLX's peak allocation."""
    measure = getattr(model, "peak_memory", None)
    return measure() if measure else (mx.get_peak_memory(), "mlx")


def make_drafter(model, options: GenerationOptions, draft_model):
    """What proposes tokens for speculative decoding (options.prompt_lookup, or draft_model drafting
    options.num_draft as options sample), or None for plain decoding."""
    if options.prompt_lookup:
        return PromptLookup(options.prompt_lookup)
    if draft_model is None:
        return None
    if draft_model.config.vocab_size != model.config.vocab_size:
        raise OpenELMError(
            f"the draft model's vocab_size {draft_model.config.vocab_size} differs from the model's "
            f"{model.config.vocab_size}: a draft model must share the model's tokenizer"
        )
    return DraftModel(draft_model, options, options.num_draft or DEFAULT_NUM_DRAFT)


def generate(model, tokenizer: Tokenizer, prompt: Union[str, List[int]], draft_model=None, **options) -> str:
    """The whole completion as one string; `options` are GenerationOptions' fields."""
    chunks = stream_generate(model, tokenizer, prompt, GenerationOptions(**options), draft_model=draft_model)
    return "".join(chunk.text for chunk in chunks)
