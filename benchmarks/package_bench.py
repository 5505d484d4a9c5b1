"""`openelm bench --backend coreml|coreai`: prefill and decode speed of exported packages through
their runners (convert/package_runner.py: Core ML as swift-transformers calls it, Core AI's `prefill`
and `decode` functions), run by Core ML (macOS 15+) or by Apple's Core AI
runtime (macOS 27; on Linux the reference runtime bundled with coreai-core, whose figures say
nothing about device speed)."""

import sys
import time
from pathlib import Path

import numpy as np

from openelm_mlx.convert.runner import open_runner
from openelm_mlx.errors import OpenELMError
from openelm_mlx.progress import ticking
from openelm_mlx.units import peak_rss_bytes

from . import timing
from .plan import WARMUP_DECODE_TOKENS, run_plan

# What each backend's figures are (results.json and the table carry it).
RUNTIME_NOTES = {
    "coreml": "Core ML on this Mac",
    "coreai": "Apple's Core AI runtime on macOS 27"
    if sys.platform == "darwin"
    else "Apple's reference runtime on Linux (coreai-core), not device speed",
}


def package_weight_bytes(package: Path) -> int:
    """Bytes of the package's weights: what one decode step reads (a Core AI model keeps them in
    main.mlirb, with the program, which is small beside them)."""
    files = (
        package.glob("Data/com.apple.CoreML/weights/*") if package.suffix == ".mlpackage" else [package / "main.mlirb"]
    )
    return sum(f.stat().st_size for f in files if f.is_file())


def time_package(runner, prompt: list, generation_tokens: int, show=lambda text: None) -> dict:
    """One trial with fresh (zeroed) cache states: prefill the prompt, then greedy decode.
    `show(text)` is told where the trial is, outside the timed intervals of decode."""
    start = time.perf_counter()
    runner.reset()
    show("prefill")
    token = int(np.argmax(runner.prefill(prompt)))
    first = time.perf_counter()
    inter_token, last = [], first
    for k in range(generation_tokens):
        token = int(np.argmax(runner.decode(token)))
        inter_token.append(time.perf_counter() - last)
        show(f"decode {k + 1}/{generation_tokens}")
        last = time.perf_counter()  # drawing the bar is not the runtime's time
    # The package returns logits on the host, so prefill and the first token end together.
    return timing.trial_metrics(len(prompt), first - start, first - start, inter_token, peak_rss_bytes())


def run_packages(results: dict, progress: bool):
    settings = results["settings"]
    backend = settings["backend"]
    if backend == "coreml" and sys.platform != "darwin":
        raise OpenELMError(
            "--backend coreml runs packages with Core ML, which exists only on macOS 15+: "
            "run it on a Mac, or time a Core AI export with --backend coreai"
        )
    p, g = settings["prompt_tokens"], settings["generation_tokens"]

    def run_one(entry, config, trials):
        runner = open_runner(config["spec"], backend)
        info = runner.info
        if p + g > info.context:
            raise OpenELMError(
                f"-p {p} + -g {g} exceeds the package's context of {info.context}: re-export with a larger --context"
            )
        weights = package_weight_bytes(runner.bundle.asset if backend == "coreai" else Path(config["spec"]))
        kv = 2 * sum(info.config["num_kv_heads"]) * info.config["head_dim"] * np.dtype(info.compute_precision).itemsize
        entry.update(
            precision=f"{info.compression} (package)",
            parameters=None,
            activation_dtype=info.compute_precision,
            weight_bytes=weights,
            kv_bytes_per_position=kv,
            decode_bytes_per_token=timing.decode_bytes_per_token(weights, kv, p, g),
            runtime=RUNTIME_NOTES[backend],
        )
        prompt = np.random.default_rng(settings["seed"]).integers(0, info.vocab_size, p).tolist()
        entry["implementations"][backend] = {"trials": []}
        for i in range(settings["warmup"] + settings["trials"]):
            warmup = i < settings["warmup"]
            what = "warm-up" if warmup else f"trial {i - settings['warmup'] + 1}/{settings['trials']}"
            with ticking(trials.bar):  # one runtime call can take minutes (float16 on Linux)
                trial = time_package(runner, prompt, min(g, WARMUP_DECODE_TOKENS) if warmup else g, trials.inside(what))
            trials.done(trial["ttft_s"] + trial["decode_s"], timed=not warmup)
            if not warmup:
                entry["implementations"][backend]["trials"].append(trial)

    configs = [{"spec": spec, "precision": "package", "implementations": [backend]} for spec in settings["models"]]
    run_plan(results, configs, run_one, progress)
