"""Text generation: mlx-lm's generation loop and samplers, OpenELM's tokenizer, honest timings."""

import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Union

import mlx.core as mx

from .errors import OpenELMError
from .model import Model
from .tokenizer import Tokenizer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_tps: float = 0.0  # prompt tokens / time to first token
    generation_tokens: int = 0
    generation_tps: float = 0.0  # tokens after the first / time since the first
    time_to_first_token: float = 0.0  # seconds
    peak_memory_gb: float = 0.0
    finish_reason: Optional[str] = None  # "eos", "stop", "length"

    def summary(self) -> str:
        return (
            f"prompt: {self.prompt_tokens} tokens, {self.prompt_tps:.1f} tok/s | "
            f"generation: {self.generation_tokens} tokens, {self.generation_tps:.1f} tok/s | "
            f"time to first token: {self.time_to_first_token * 1000:.0f} ms | "
            f"peak memory: {self.peak_memory_gb:.2f} GB"
        )


@dataclass
class GenerationChunk:
    text: str
    token: Optional[int]  # None on the final chunk when it only flushes text
    stats: GenerationStats


def check_sampling(max_tokens, temp, top_p, top_k, min_p, repetition_penalty):
    checks = [
        (max_tokens >= 1, f"--max-tokens must be at least 1, got {max_tokens}"),
        (temp >= 0, f"--temp must be >= 0 (0 is greedy), got {temp}"),
        (0 <= top_p <= 1, f"--top-p must be in [0, 1], got {top_p}"),
        (top_k >= 0, f"--top-k must be >= 0 (0 turns it off), got {top_k}"),
        (0 <= min_p <= 1, f"--min-p must be in [0, 1], got {min_p}"),
        (
            repetition_penalty is None or repetition_penalty > 0,
            f"--repetition-penalty must be > 0 (1 turns it off), got {repetition_penalty}",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise OpenELMError(message)


def fit_context(prompt: List[int], max_tokens: int, context: int, cached: int = 0, truncate: bool = False) -> List[int]:
    """The prompt, checked (or cut from the front, keeping BOS) against the context length."""
    need = cached + len(prompt) + max_tokens
    if need <= context:
        return prompt
    if not truncate:
        raise OpenELMError(
            f"{len(prompt)} prompt tokens + {cached} cached + {max_tokens} to generate = {need} "
            f"exceeds the model's context of {context}: shorten the prompt, lower --max-tokens, or pass --truncate"
        )
    keep = context - cached - max_tokens - 1
    if keep < 1:
        raise OpenELMError(f"--max-tokens {max_tokens} leaves no room for a prompt in a context of {context}")
    return prompt[:1] + prompt[-keep:]


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


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: Union[str, List[int]],
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    stop: Sequence[str] = (),
    cache: Optional[list] = None,
    truncate: bool = False,
) -> Iterator[GenerationChunk]:
    """Yield text as it is generated. A str prompt gets BOS; a token list is used as is, which
    lets a chat continue a cache (`cache`, from mlx_lm's make_prompt_cache) turn after turn."""
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    check_sampling(max_tokens, temp, top_p, top_k, min_p, repetition_penalty)
    tokens = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not tokens:
        raise OpenELMError("the prompt is empty")
    cached = cache[0].offset if cache else 0
    tokens = fit_context(tokens, max_tokens, model.config.max_context_length, cached, truncate)
    if seed is not None:
        mx.random.seed(seed)

    sampler = make_sampler(temp, top_p=top_p, min_p=min_p, top_k=top_k)
    processors = make_logits_processors(repetition_penalty=repetition_penalty) if repetition_penalty else None
    detokenizer = tokenizer.detokenizer(context=tokens)
    stopper = StopMatcher(stop)
    stats = GenerationStats(prompt_tokens=len(tokens), finish_reason="length")

    mx.reset_peak_memory()
    start = time.perf_counter()
    steps = generate_step(
        mx.array(tokens),
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors,
        prompt_cache=cache,
    )
    for n, (token, _) in enumerate(steps):
        now = time.perf_counter()
        if n == 0:
            first = now
            stats.time_to_first_token = now - start
            stats.prompt_tps = len(tokens) / stats.time_to_first_token
        else:
            stats.generation_tps = n / (now - first)
        stats.generation_tokens = n + 1
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
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


def generate(model: Model, tokenizer: Tokenizer, prompt: Union[str, List[int]], **kwargs) -> str:
    """The whole completion as one string (see stream_generate for the options)."""
    return "".join(chunk.text for chunk in stream_generate(model, tokenizer, prompt, **kwargs))
