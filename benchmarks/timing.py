"""Timing one model: prefill, time to first token, decode, and the figures derived from them.

Conventions follow llama-bench (pp/tg on synthetic tokens, sampling excluded but for an argmax)
so numbers compare with what llama.cpp and mlx-lm users post."""

import statistics
import time
from typing import Dict, List, Sequence

import mlx.core as mx
import numpy as np

from openelm_mlx.cache import make_cache
from openelm_mlx.model import Model
from openelm_mlx.progress import forward
from openelm_mlx.speculative import weight_bytes

METRICS = ("prefill_tps", "decode_tps", "ttft_s", "itl_median_s", "itl_p90_s", "peak_memory_bytes")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated."""
    return float(np.percentile(values, q))


def spread(values: Sequence[float]) -> Dict[str, float]:
    """Median and spread over trials (stdev is the sample standard deviation, 0 for one trial)."""
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def kv_bytes_per_position(config, activation_dtype) -> int:
    """Keys and values of one position, all layers (the cache holds activations' dtype)."""
    return 2 * sum(config.num_kv_heads) * config.head_dim * activation_dtype.size


def decode_bytes_per_token(weights: int, kv_per_position: int, prompt_tokens: int, generation_tokens: int) -> float:
    """Bytes one decode step reads: every weight once (the tied embedding is the output layer)
    plus the KV cache, whose length averages prompt + (generated + 1) / 2 over the decode."""
    return weights + kv_per_position * (prompt_tokens + (generation_tokens + 1) / 2)


def roofline(decode_tps: float, bytes_per_token: float, bandwidth_gbs: float) -> float:
    """Measured tok/s over the bandwidth bound (bandwidth / bytes read per token): 1.0 = at the limit."""
    return decode_tps / (bandwidth_gbs * 1e9 / bytes_per_token)


def trial_metrics(
    prompt_tokens: int, prefill_s: float, ttft_s: float, inter_token_s: List[float], peak_memory_bytes: int
) -> dict:
    return {
        "prefill_s": prefill_s,
        "prefill_tps": prompt_tokens / prefill_s,
        "ttft_s": ttft_s,
        "decode_s": sum(inter_token_s),
        "decode_tps": len(inter_token_s) / sum(inter_token_s),
        "itl_median_s": statistics.median(inter_token_s),
        "itl_p90_s": percentile(inter_token_s, 90),
        "peak_memory_bytes": peak_memory_bytes,
        "inter_token_s": inter_token_s,
    }


def prefill_logits(model, tokens: mx.array, cache, on_layer=None) -> mx.array:
    """Logits of the last prompt position only, as llama-bench's pp and mlx-lm's generate do:
    the output layer over every prompt position would be work no generator does. On a CPU the
    prompt is evaluated a layer at a time (progress.forward), so Ctrl-C acts between layers."""
    h = forward(model, tokens, cache, on_layer)[:, -1:, :]
    return model.transformer.token_embeddings.as_linear(h)


def new_cache(model) -> list:
    """Each implementation's own KV cache: ours for our Model, mlx-lm's for mlx-lm's (imported
    here: only --compare mlx-lm builds an mlx-lm model, and importing mlx-lm takes ~3 s)."""
    if isinstance(model, Model):
        return make_cache(model)
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def time_generation(model, prompt: mx.array, generation_tokens: int, show=lambda text: None) -> dict:
    """One trial: a fresh cache, prefill of `prompt` [1, P], then greedy decode step by step.
    `show(text)` is told where the trial is (a prefill layer, a decode token), outside the timed
    intervals of decode."""
    mx.clear_cache()
    mx.reset_peak_memory()
    resident = mx.get_active_memory()
    start = time.perf_counter()
    cache = new_cache(model)
    logits = prefill_logits(model, prompt, cache, lambda i, n: show(f"prefill layer {i}/{n}"))
    token = mx.argmax(logits[:, -1, :], axis=-1)
    mx.eval(token)
    prefill_end = time.perf_counter()
    token.item()
    first = time.perf_counter()
    inter_token, last = [], first
    for k in range(generation_tokens):
        token = mx.argmax(model(token[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(token)
        inter_token.append(time.perf_counter() - last)
        show(f"decode {k + 1}/{generation_tokens}")
        last = time.perf_counter()  # drawing the bar is not the model's time
    # The weights plus what the trial allocated on top (cache, activations): other arrays alive
    # in this process (a float source kept for the next precision) do not count.
    peak = weight_bytes(model) + mx.get_peak_memory() - resident
    return trial_metrics(prompt.shape[1], prefill_end - start, first - start, inter_token, peak)


def summarize(trials: List[dict]) -> Dict[str, dict]:
    return {k: spread([t[k] for t in trials]) for k in METRICS}


def paired_ratios(ours: List[dict], theirs: List[dict]) -> Dict[str, dict]:
    """ours / theirs per interleaved trial pair (higher = we are faster), then median and spread:
    pairing cancels most of the load that other processes put on the machine."""
    return {
        f"{metric}_ratio": spread([a[metric] / b[metric] for a, b in zip(ours, theirs)])
        for metric in ("prefill_tps", "decode_tps")
    }
