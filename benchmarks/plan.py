"""The benchmark loop shared by `openelm bench`'s backends (bench.py for MLX models,
package_bench.py for exported packages): one entry per configuration, failures recorded."""

import time
from dataclasses import dataclass
from typing import Callable, List, Optional

from tqdm import tqdm

from openelm_mlx.errors import OpenELMError, Terminated
from openelm_mlx.outputs import SIGNALS
from openelm_mlx.progress import announce, progress_bar, within

from . import timing
from .subjects import describe

OURS, MLX_LM = "openelm_mlx", "mlx_lm"
# Like llama-bench's, a warm-up prefills the whole prompt (first-call allocations, compiled
# kernels for that shape) but decodes only a few tokens: every decode step has the same shapes.
WARMUP_DECODE_TOKENS = 4


def summarize(entry: dict, bandwidth_gbs: float):
    """Median and spread per implementation, roofline, and paired ratios ours / mlx-lm."""

    impls = {name: r for name, r in entry["implementations"].items() if r.get("trials")}
    for result in impls.values():
        result["summary"] = timing.summarize(result["trials"])
        decode = result["summary"]["decode_tps"]["median"]
        result["achieved_gbs"] = decode * entry["decode_bytes_per_token"] / 1e9
        result["roofline"] = timing.roofline(decode, entry["decode_bytes_per_token"], bandwidth_gbs)
    if OURS in impls and MLX_LM in impls:
        entry["ratios"] = timing.paired_ratios(impls[OURS]["trials"], impls[MLX_LM]["trials"])


@dataclass
class Trials:
    """The plan's progress: a bar over every trial (warm-ups included; a trial is one
    implementation's prefill and decode), where the current trial is (`at`: a prefill layer, a
    decode token), and a line with the plan and how long it will take: after the first
    configuration when there are several (its building, logits check and warm-up included: a
    bare bench's estimate from its first trial alone said 2 min and took 5), else after the first
    timed trial."""

    bar: tqdm
    plan: str
    announced: bool = False

    def at(self, text: str):
        within(self.bar, text)

    def inside(self, trial: str) -> Callable[[str], None]:
        """at() for the steps of one trial: 'trial 2/3: decode 7/32'."""
        return lambda step: self.at(f"{trial}: {step}")

    def done(self, seconds: float, timed: bool):
        self.bar.update()
        if timed and not self.announced:  # a warm-up decodes only a few tokens: not the measure
            self.announce(seconds, self.bar.total, "trial")

    def announce(self, seconds: float, units: int, unit: str):
        self.announced = True
        announce(self.bar, self.plan, seconds, units, unit)


def run_plan(
    results: dict,
    configs: List[dict],
    run_one: Callable,
    progress: bool,
    key: str = "configurations",
    finish: Optional[Callable] = None,
):
    """run_one(entry, config, trials) for each configuration, `trials` the plan's Trials (each
    counted with trials.done); entries go to results[key], and finish(entry) summarizes each
    (trials and all). A failure is recorded in its entry and the next configuration runs; Ctrl-C
    stops and keeps what was gathered. A config's "fields" replace the timing entries' role and
    implementations (speculation.py has others)."""
    settings = results["settings"]
    bandwidth = results["environment"]["memory_bandwidth_gbs"]
    if finish is None:

        def finish(entry):
            if "decode_bytes_per_token" in entry:
                summarize(entry, bandwidth)

    per_config = settings["warmup"] + settings["trials"]
    total = sum(len(config.get("implementations", [None])) * per_config for config in configs)
    bar = progress_bar(total=total, show=progress, desc="openelm bench", unit="trial")
    plan = f"bench: {len(configs)} configurations x {per_config} trials ({settings['warmup']} warm-up)"
    trials, start = Trials(bar, plan, announced=len(configs) > 1), time.perf_counter()
    try:
        for config in configs:
            label, origin = describe(config["spec"])
            bar.set_description_str(f"bench {label} {config['precision']}", refresh=False)
            entry = {
                "model": label,
                "source": origin,
                "precision": config["precision"],
                **config.get("fields", {"role": config.get("role", "benchmark"), "implementations": {}}),
                "error": None,
            }
            results[key].append(entry)
            counted = bar.n + len(config.get("implementations", [None])) * per_config
            try:
                run_one(entry, config, trials)
            except KeyboardInterrupt:
                entry["error"] = "interrupted"
                raise
            except Exception as e:  # a failed configuration is reported, the others still run
                entry["error"] = str(e) if isinstance(e, OpenELMError) else f"{type(e).__name__}: {e}"
            finally:
                finish(entry)
            bar.update(counted - bar.n)  # the trials a failed configuration did not run
            if len(results[key]) == 1 and len(configs) > 1:
                trials.announce(time.perf_counter() - start, len(configs), "configuration")
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (errors.Terminated, a KeyboardInterrupt)
        results["interrupted"] = True
        results["interrupted_by"] = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
        SIGNALS.clear()  # handled: what was gathered is written, and the status says what stopped it
    finally:
        bar.close()
