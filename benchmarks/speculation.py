"""`openelm bench --prompt-lookup K` or `--draft-model M`: speculative decoding against plain greedy
decoding of the same model, prompt and length, in interleaved pairs (who goes first alternates),
per model, precision and task: `free` (a passage of text), `copy` (a passage, then its start again,
so that the answer copies it), `short` (`openelm generate`'s default prompt, so that the text is
the model's own) and `fresh` (the free passage's tokens shuffled: nothing repeats). The prompts and models are in spec_subjects.py."""

import statistics
import time
from typing import List, Optional

import mlx.core as mx

from openelm_mlx.cache import make_cache
from openelm_mlx.errors import OpenELMError
from openelm_mlx.generate import DEFAULT_NUM_DRAFT, GenerationStats, generate_tokens, speculate
from openelm_mlx.options import BENCH_SPECULATION_RULES, check_options, check_speculation
from openelm_mlx.sample import Sampling

from .plan import run_plan
from .spec_subjects import TASKS, Subjects
from .timing import spread

KINDS = ("plain", "speculative")
WARMUP_TOKENS = 16  # a warm-up pair decodes this many tokens (or -g if fewer)


def speculation_settings(prompt_lookup, draft_model, num_draft, backend, generation_tokens) -> Optional[dict]:
    """The speculation options, checked (their ranges: options.BENCH_RULES and
    BENCH_SPECULATION_RULES); None when neither --prompt-lookup nor --draft-model is given."""
    check_speculation(prompt_lookup, draft_model, num_draft)
    if prompt_lookup is None and draft_model is None:
        return None
    if backend != "mlx":
        raise OpenELMError(f"--backend {backend}: speculative decoding is timed on MLX models only (--backend mlx)")
    check_options({"generation_tokens": generation_tokens}, BENCH_SPECULATION_RULES)
    if draft_model is not None:
        num_draft = num_draft or DEFAULT_NUM_DRAFT
    return {"prompt_lookup": prompt_lookup, "draft_model": draft_model, "num_draft": num_draft}


class Counted:
    """A model that counts its forward passes."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def decode(model, prompt: List[int], max_tokens: int, drafter=None):
    """One greedy decode from a fresh cache, plain (drafter None) or speculative: (tokens, figures)."""
    mx.clear_cache()
    counted, cache, stats = Counted(model), make_cache(model), GenerationStats()
    if drafter is None:
        steps = generate_tokens(counted, prompt, cache, max_tokens, Sampling())
    else:
        steps = speculate(counted, prompt, cache, max_tokens, Sampling(), drafter, stats)
    tokens, times = [], []
    start = time.perf_counter()
    for token in steps:
        times.append(time.perf_counter())
        tokens.append(token)
    calls = counted.calls  # decoding's alone: an MLX model's prefill runs through progress.forward, not a call
    figures = {
        "tokens": len(tokens),
        "ttft_s": times[0] - start,
        "decode_s": times[-1] - times[0],
        "decode_tps": (len(tokens) - 1) / (times[-1] - times[0]),
        "total_s": times[-1] - start,
        "total_tps": len(tokens) / (times[-1] - start),
        "model_calls": calls,
        "tokens_per_call": len(tokens) / calls,
    }
    if drafter is not None:
        acceptance = stats.accepted / stats.drafted if stats.drafted else None
        figures.update(drafted=stats.drafted, accepted=stats.accepted, acceptance=acceptance)
    return tokens, figures


def run_pair(subject, task: str, max_tokens: int, speculative_first: bool) -> dict:
    """Plain and speculative decoding of one prompt, in the order given; the greedy tokens compared."""
    prompt, runs = subject.prompts[task], {}
    for kind in KINDS[::-1] if speculative_first else KINDS:
        runs[kind] = decode(subject.model, prompt, max_tokens, subject.drafter() if kind == "speculative" else None)
    (plain, a), (spec, b) = runs["plain"], runs["speculative"]
    return {
        "order": list(runs),
        "plain": a,
        "speculative": b,
        "identical": plain == spec,
        "speedup": b["decode_tps"] / a["decode_tps"],
        "speedup_total": b["total_tps"] / a["total_tps"],
        "output_tokens": plain,
    }


def summarize(entry: dict):
    """Median and spread over trials; drafted, accepted, tokens per call from the totals."""
    trials = entry.get("trials")
    if not trials:
        return
    spec = [t["speculative"] for t in trials]
    drafted, accepted = sum(s["drafted"] for s in spec), sum(s["accepted"] for s in spec)
    entry["summary"] = {
        "plain_decode_tps": spread([t["plain"]["decode_tps"] for t in trials]),
        "speculative_decode_tps": spread([s["decode_tps"] for s in spec]),
        "speedup": spread([t["speedup"] for t in trials]),
        "speedup_total": spread([t["speedup_total"] for t in trials]),
        "drafted_per_trial": statistics.fmean(s["drafted"] for s in spec),
        "accepted_per_trial": statistics.fmean(s["accepted"] for s in spec),
        "acceptance": accepted / drafted if drafted else None,
        "tokens_per_call": sum(s["tokens"] for s in spec) / sum(s["model_calls"] for s in spec),
        "identical": all(t["identical"] for t in trials),
    }


def run_speculation(results: dict, progress: bool):
    """One entry in results["speculation"] per model, precision and task."""
    settings = results["settings"]
    g, subjects = settings["generation_tokens"], Subjects(settings)

    def run_one(entry, config, trials):
        subject = subjects.get(config["spec"], config["precision"])
        entry.update(subject.describe(entry["task"]))
        entry["trials"] = []
        for i in range(settings["warmup"] + settings["trials"]):
            warmup = i < settings["warmup"]
            trials.at(f"{entry['task']}: " + ("warm-up" if warmup else f"trial {i - settings['warmup'] + 1}"))
            start = time.perf_counter()
            pair = run_pair(subject, entry["task"], min(g, WARMUP_TOKENS) if warmup else g, i % 2 == 1)
            trials.done(time.perf_counter() - start, timed=not warmup)
            if not warmup:
                output = pair.pop("output_tokens")
                entry.setdefault("output_tokens", output)
                entry["trials"].append(pair)
        entry.update(subject.decoded(entry["output_tokens"]))

    configs = [
        {"spec": spec, "precision": precision, "fields": {"task": task, "drafter": subjects.drafter_label}}
        for spec in settings["models"]
        for precision in settings["precisions"]
        for task in TASKS
    ]
    run_plan(results, configs, run_one, progress, key="speculation", finish=summarize)
