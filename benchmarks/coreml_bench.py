"""`openelm bench --backend coreml`: prefill and decode speed of exported packages, run by Core ML
(macOS 15+) through the package's own `prefill` and `decode` functions."""

import resource
import sys
import time
from pathlib import Path

import numpy as np

from openelm_mlx.errors import OpenELMError

from . import timing

FP16_BYTES = 2  # the package's KV-cache states are fp16


def package_weight_bytes(package: Path) -> int:
    """Bytes of the package's weight file(s): what one decode step reads."""
    return sum(f.stat().st_size for f in package.glob("Data/com.apple.CoreML/weights/*") if f.is_file())


def peak_rss_bytes() -> int:
    # ru_maxrss is in bytes on macOS (kilobytes on Linux); Core ML allocates outside MLX's counters.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def time_package(runner, prompt: list, generation_tokens: int) -> dict:
    """One trial with fresh (zeroed) cache states: prefill the prompt, then greedy decode."""
    start = time.perf_counter()
    runner.reset()
    token = int(np.argmax(runner.prefill(prompt)))
    first = time.perf_counter()
    inter_token, last = [], first
    for _ in range(generation_tokens):
        token = int(np.argmax(runner.decode(token)))
        now = time.perf_counter()
        inter_token.append(now - last)
        last = now
    # Core ML returns logits on the host, so prefill and the first token end together.
    return timing.trial_metrics(len(prompt), first - start, first - start, inter_token, peak_rss_bytes())


def run_coreml(results: dict, progress: bool):
    if sys.platform != "darwin":
        raise OpenELMError(
            "--backend coreml runs packages with Core ML, which exists only on macOS 15+: "
            "run it on a Mac (or benchmark the MLX model with --backend mlx)"
        )
    from openelm_mlx.convert.coreml_runtime import CoreMLRunner

    from .bench import run_plan

    settings = results["settings"]
    p, g = settings["prompt_tokens"], settings["generation_tokens"]

    def run_one(entry, config):
        runner = CoreMLRunner(config["spec"], backend="coreml")
        info = runner.info
        if p + g > info.context:
            raise OpenELMError(
                f"-p {p} + -g {g} exceeds the package's context of {info.context}: re-export with a larger --context"
            )
        weights = package_weight_bytes(Path(config["spec"]))
        kv = 2 * sum(info.config["num_kv_heads"]) * info.config["head_dim"] * FP16_BYTES
        entry.update(
            precision=f"{info.compression} (package)",
            parameters=None,
            activation_dtype="float16",
            weight_bytes=weights,
            kv_bytes_per_position=kv,
            decode_bytes_per_token=timing.decode_bytes_per_token(weights, kv, p, g),
        )
        prompt = np.random.default_rng(settings["seed"]).integers(0, info.vocab_size, p).tolist()
        entry["implementations"]["coreml"] = {"trials": []}
        for i in range(settings["warmup"] + settings["trials"]):
            trial = time_package(runner, prompt, g)
            if i >= settings["warmup"]:
                entry["implementations"]["coreml"]["trials"].append(trial)

    configs = [{"spec": spec, "precision": "package", "implementations": ["coreml"]} for spec in settings["models"]]
    run_plan(results, configs, run_one, progress)
