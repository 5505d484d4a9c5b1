"""`openelm bench`: prompt and generation speed of OpenELM, per model size and precision,
optionally against mlx-lm's OpenELM on the same weights in the same run."""

import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx

from openelm_mlx import outputs
from openelm_mlx.errors import OpenELMError
from openelm_mlx.options import BENCH_RULES, DEFAULT_GROUP_SIZE, MAX_SEED, check_options
from openelm_mlx.overflow import check_finite
from openelm_mlx.progress import forward

from . import timing
from .machine import machine_info
from .plan import MLX_LM, OURS, WARMUP_DECODE_TOKENS, Trials, run_plan
from .report import FILES, RESULTS_BYTES, markdown, write_results
from .speculation import run_speculation, speculation_settings
from .subjects import PRECISIONS, activation_dtype, build_subject, check_spec, load_source, mlx_lm_twin

SCHEMA = "openelm-bench/1"
MLX_LM_DEFAULT = "fp16"  # mlx_lm.convert's default: float16 weights and activations
PACKAGE_BACKENDS = ("coreml", "coreai")  # exported packages, timed by benchmarks/package_bench.py


# -p, -g and --trials when not given. On a GPU llama-bench's pp512/tg128 (the figures peers post),
# 5 trials. On a CPU with the mlx[cpu] wheel's reference BLAS the 270M shape prefills 3-9 tokens/s
# (2-core x86-64): a bare bench had timed none of its 3 configurations after 9.5 min. A CPU runs
# pp64/tg16, 3 trials, as this project's committed CPU results do (benchmarks/results/linux-cpu-*):
# a few minutes (docs/progress-and-stopping.md).
GPU_DEFAULTS = {"prompt_tokens": 512, "generation_tokens": 128, "trials": 5}
CPU_DEFAULTS = {"prompt_tokens": 64, "generation_tokens": 16, "trials": 3}


def device_defaults() -> Dict[str, int]:
    return CPU_DEFAULTS if mx.default_device() == mx.cpu else GPU_DEFAULTS


def default_precisions() -> List[str]:
    # float32 activations on a CPU, where 16-bit matmuls are scalar fallbacks (loader.resolve_dtype)
    return ["fp32", "q8", "q4"] if mx.default_device() == mx.cpu else ["fp16", "q8", "q4"]


def plan(models: Sequence[str], precisions: Sequence[str], compare: Optional[str]) -> List[dict]:
    """The configurations to run, in order. With --compare mlx-lm each model also gets mlx-lm's
    default conversion (if not asked for anyway), the speed an mlx-lm user actually gets."""
    configs = []
    for spec in models:
        for precision in precisions:
            configs.append(
                {"spec": spec, "precision": precision, "implementations": [OURS, MLX_LM] if compare else [OURS]}
            )
        if compare and MLX_LM_DEFAULT not in precisions:
            configs.append(
                {
                    "spec": spec,
                    "precision": MLX_LM_DEFAULT,
                    "implementations": [MLX_LM],
                    "role": "mlx-lm default conversion",
                }
            )
    return configs


def run_configuration(entry: dict, names: List[str], source: tuple, settings: dict, trials: Trials):
    """Time one configuration into `entry` (trials land there as they finish, so an interrupt
    keeps them). Implementations alternate who goes first, trial by trial."""

    config, make_weights = source
    p, g = settings["prompt_tokens"], settings["generation_tokens"]
    check_fits(config, p, g)
    ours = build_subject(config, make_weights, entry["precision"])
    subjects = {name: ours if name == OURS else mlx_lm_twin(ours) for name in names}
    dtype = activation_dtype(entry["precision"], config)
    kv = timing.kv_bytes_per_position(config, dtype)
    entry.update(
        parameters=config.num_parameters(),
        activation_dtype=str(dtype).replace("mlx.core.", ""),
        weight_bytes=timing.weight_bytes(ours),
        kv_bytes_per_position=kv,
        decode_bytes_per_token=timing.decode_bytes_per_token(timing.weight_bytes(ours), kv, p, g),
    )
    # random tokens after BOS, as every real prompt starts (OpenELM's largest activations are at BOS)
    prompt = mx.random.randint(0, config.vocab_size, (1, p), key=mx.random.key(settings["seed"]))
    prompt[0, 0] = config.bos_token_id
    logits = forward(ours, prompt, on_layer=lambda i, n: trials.at(f"checking the logits: layer {i}/{n}"))
    check_finite(ours.transformer.token_embeddings.as_linear(logits), dtype, "--precisions fp32 (or bf16)")
    for name in names:
        entry["implementations"][name] = {"trials": []}
    for i in range(settings["warmup"] + settings["trials"]):
        warmup = i < settings["warmup"]
        for name in names if i % 2 == 0 else names[::-1]:
            what = "warm-up" if warmup else f"trial {i - settings['warmup'] + 1}/{settings['trials']}"
            what += f" {name}" if len(names) > 1 else ""
            trial = timing.time_generation(
                subjects[name],
                prompt,
                min(g, WARMUP_DECODE_TOKENS) if warmup else g,
                trials.inside(what),
            )
            trials.done(trial["ttft_s"] + trial["decode_s"], timed=not warmup)
            if not warmup:
                entry["implementations"][name]["trials"].append(trial)


def check_fits(config, prompt_tokens: int, generation_tokens: int):
    if prompt_tokens + generation_tokens > config.max_context_length:
        raise OpenELMError(
            f"-p {prompt_tokens} + -g {generation_tokens} exceeds the model's context of {config.max_context_length}"
        )


def best_vs_default(configurations: List[dict]) -> List[dict]:
    """Per model: our fastest decode setting against mlx-lm's default conversion (medians)."""
    out = []
    for model in dict.fromkeys(c["model"] for c in configurations):
        mine = [c for c in configurations if c["model"] == model and "summary" in c["implementations"].get(OURS, {})]
        ref = [
            c
            for c in configurations
            if c["model"] == model
            and c["precision"] == MLX_LM_DEFAULT
            and "summary" in c["implementations"].get(MLX_LM, {})
        ]
        if not mine or not ref:
            continue
        best = max(mine, key=lambda c: c["implementations"][OURS]["summary"]["decode_tps"]["median"])
        a, b = best["implementations"][OURS]["summary"], ref[0]["implementations"][MLX_LM]["summary"]
        out.append(
            {
                "model": model,
                "openelm_mlx_precision": best["precision"],
                "mlx_lm_precision": MLX_LM_DEFAULT,
                "decode_tps_ratio": a["decode_tps"]["median"] / b["decode_tps"]["median"],
                "prefill_tps_ratio": a["prefill_tps"]["median"] / b["prefill_tps"]["median"],
            }
        )
    return out


def run_benchmark(
    models: Sequence[str] = ("270M",),
    precisions: Optional[Sequence[str]] = None,
    prompt_tokens: Optional[int] = None,
    generation_tokens: Optional[int] = None,
    trials: Optional[int] = None,
    warmup: int = 1,
    compare: Optional[str] = None,
    backend: str = "mlx",
    seed: int = 0,
    progress: bool = True,
    prompt_lookup: Optional[int] = None,
    draft_model: Optional[str] = None,
    num_draft: Optional[int] = None,
) -> dict:
    """Benchmark every (model, precision) and return the results (see results.json). A failing
    configuration is recorded with its error; Ctrl-C stops and returns what was gathered. -p, -g
    and --trials not given (None): the device's (device_defaults)."""
    given = dict(prompt_tokens=prompt_tokens, generation_tokens=generation_tokens, trials=trials)
    prompt_tokens, generation_tokens, trials = (device_defaults()[k] if v is None else v for k, v in given.items())
    packages = backend in PACKAGE_BACKENDS
    if packages and precisions:
        raise OpenELMError(f"a {backend} package's precision was fixed when it was exported: drop --precisions")
    precisions = ["package"] if packages else list(precisions or default_precisions())
    counts = dict(prompt_tokens=prompt_tokens, generation_tokens=generation_tokens, trials=trials, warmup=warmup)
    check_options(dict(counts, seed=seed, prompt_lookup=prompt_lookup, num_draft=num_draft), BENCH_RULES)
    check_settings(models, precisions, compare, backend)
    speculation = speculation_settings(prompt_lookup, draft_model, num_draft, backend, generation_tokens)
    if backend == "mlx" and len(models) == 1:  # a lone broken checkpoint: say so before measuring
        config, _ = load_source(models[0], seed)
        # speculation shortens its prompt to what -g leaves of the context (speculation.py)
        check_fits(config, 1 if speculation else prompt_tokens, generation_tokens)
    settings = dict(
        models=list(models),
        precisions=precisions,
        prompt_tokens=prompt_tokens,
        generation_tokens=generation_tokens,
        trials=trials,
        warmup=warmup,
        compare=compare,
        backend=backend,
        seed=seed,
        group_size=DEFAULT_GROUP_SIZE,
        speculation=speculation,
    )
    results = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "environment": machine_info(),
        "configurations": [],
        "speculation": [],  # with --prompt-lookup or --draft-model: speculation.py, instead of the configurations
        "interrupted": False,
    }
    if packages:
        from .package_bench import run_packages

        run_packages(results, progress)
    elif speculation:
        run_speculation(results, progress)
    else:
        run_mlx(results, progress)
    if hasattr(os, "getloadavg"):  # other processes' load shows up in the spread: record it
        results["environment"]["load_average_end"] = list(os.getloadavg())
    results["best_vs_mlx_lm_default"] = best_vs_default(results["configurations"])
    return results


def run_mlx(results: dict, progress: bool):
    settings = results["settings"]
    sources: Dict[str, tuple] = {}  # each checkpoint resolved (or downloaded) once

    def run_one(entry, config, trials):
        if config["spec"] not in sources:
            sources[config["spec"]] = load_source(config["spec"], settings["seed"])
        run_configuration(entry, config["implementations"], sources[config["spec"]], settings, trials)

    run_plan(results, plan(settings["models"], settings["precisions"], settings["compare"]), run_one, progress)


def check_settings(models, precisions, compare, backend):
    """The options that are not numbers (those are in options.BENCH_RULES)."""
    checks = [
        (len(models) > 0, "--models is empty: name sizes (270M,450M,1.1B,3B) or checkpoint folders"),
        (
            backend in PACKAGE_BACKENDS or all(p in PRECISIONS for p in precisions),
            f"unknown precision in {','.join(precisions)}: choose from {','.join(PRECISIONS)}",
        ),
        (compare in (None, "mlx-lm"), f"--compare {compare}: only mlx-lm is supported"),
        (backend in ("mlx", *PACKAGE_BACKENDS), f"--backend {backend}: choose mlx, coreml or coreai"),
        (not (compare and backend != "mlx"), f"--compare mlx-lm times MLX models: drop it with --backend {backend}"),
    ]
    for ok, message in checks:
        if not ok:
            raise OpenELMError(message)
    if backend == "mlx":
        for spec in models:
            check_spec(spec)


def add_arguments(parser):
    parser.add_argument(
        "--models",
        default="270M",
        help="comma-separated sizes (270M,450M,1.1B,3B: random "
        "weights of the real shapes) or checkpoint folders / Hub repos; .mlpackage paths "
        "with --backend coreml, bundle folders (export-coreai) with --backend coreai",
    )
    parser.add_argument(
        "--precisions",
        default=None,
        help="comma-separated, from bf16,fp16,fp32,q8,q4 (default: fp32,q8,q4 on a CPU, fp16,q8,q4 on a GPU)",
    )
    gpu, cpu = GPU_DEFAULTS, CPU_DEFAULTS
    for flags, key, text in (
        (("-p", "--prompt-tokens"), "prompt_tokens", "prompt length"),
        (("-g", "--generation-tokens"), "generation_tokens", "tokens generated"),
        (("--trials",), "trials", "timed trials per configuration"),
    ):
        parser.add_argument(*flags, type=int, help=f"{text} (default: {gpu[key]} on a GPU, {cpu[key]} on a CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed trials first")
    parser.add_argument(
        "--compare",
        choices=["mlx-lm"],
        default=None,
        help="also time mlx-lm's OpenELM on the same weights, interleaved, and report ratios",
    )
    parser.add_argument(
        "--backend",
        choices=["mlx", *PACKAGE_BACKENDS],
        default="mlx",
        help="mlx; coreml times an exported .mlpackage with Core ML (macOS only); coreai times an exported "
        "bundle with Apple's Core AI runtime (on Linux its reference runtime: not device speed)",
    )
    parser.add_argument("--seed", type=int, default=0, help=f"seed of the random weights and prompt (0 to {MAX_SEED})")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for results.json/.csv/.md and chart.png (default: openelm-bench-DATE-TIME)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite results already in --out")
    parser.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="K",
        help="time speculative decoding with prompt lookup (up to K drafted tokens) against plain decoding, "
        "on free-generation, copying and short-prompt tasks, instead of prompt and generation speed",
    )
    parser.add_argument("--draft-model", metavar="M", help="the same, drafted by model M (a size, a folder or a repo)")
    parser.add_argument("--num-draft", type=int, metavar="K", help="tokens the draft model proposes (default: 4)")


def main(args) -> int:
    out = args.out or Path(datetime.now().strftime("openelm-bench-%Y%m%d-%H%M%S"))
    # before a long run, not after it: results that would be replaced, a folder that cannot be written
    outputs.check_outputs([out / name for name in FILES], args.force, room=RESULTS_BYTES)
    results = run_benchmark(
        models=[m for m in args.models.split(",") if m],
        precisions=args.precisions.split(",") if args.precisions else None,
        prompt_tokens=args.prompt_tokens,
        generation_tokens=args.generation_tokens,
        trials=args.trials,
        warmup=args.warmup,
        compare=args.compare,
        backend=args.backend,
        seed=args.seed,
        prompt_lookup=args.prompt_lookup,
        draft_model=args.draft_model,
        num_draft=args.num_draft,
    )
    errors = [c["error"] for c in results["configurations"] + results["speculation"]]
    if not results["interrupted"] and all(errors):  # nothing measured: nothing worth writing
        raise OpenELMError(f"no configuration could be timed: {'; '.join(dict.fromkeys(errors))}")
    print(markdown(results))
    written = write_results(results, out, force=args.force)
    print(f"\nwrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    if results["interrupted"]:  # what was gathered is written; the status says what stopped it
        return 143 if results["interrupted_by"] == "SIGTERM" else 130
    return 0
