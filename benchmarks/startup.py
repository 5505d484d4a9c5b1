"""Start-up: the whole `openelm generate` process, from start to exit, against mlx-lm's
`python -m mlx_lm generate` doing the same (the shipped demo model, a fixed prompt, 20 greedy
tokens), with `python -c "import mlx.core"` as the floor no MLX program gets under.

    python -m openelm_mlx.benchmarks.startup --trials 5 --out startup.json

Trials interleave the commands and alternate who goes first; the figure is the median of the
per-trial ratios ours / mlx-lm of wall time (lower is better), which cancels most of the load
other processes put on the machine. CPU time (user + sys of the child) is recorded beside it.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from openelm_mlx.generate import FALLBACK_PROMPT
from openelm_mlx.loader import DEMO_MODEL

from .machine import machine_info

MAX_TOKENS = 20
TARGET_RATIO = 0.35  # issue 10: our start-to-exit time at most 0.35x mlx-lm's
IMPORTTIME_TOP = 15


def commands(model: Path, prompt: str, max_tokens: int) -> dict:
    python = sys.executable
    same = ["--model", str(model), "--prompt", prompt, "--max-tokens", str(max_tokens), "--temp", "0"]
    return {
        "openelm-mlx": [python, "-m", "openelm_mlx", "generate", *same],
        # the demo model has no chat template; mlx-lm would otherwise look for one
        "mlx-lm": [python, "-m", "mlx_lm", "generate", *same, "--ignore-chat-template"],
        "floor": [python, "-c", "import mlx.core"],
    }


def child_env() -> dict:
    # offline, as the demo model needs no network: nothing may wait on the Hub
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run_once(cmd) -> dict:
    """Wall and CPU seconds of one process from start to exit, and what it printed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "stdout": done.stdout}


def spread(values) -> dict:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def import_profile(cmd, top: int = IMPORTTIME_TOP) -> dict:
    """`python -X importtime` of cmd: the modules with the most cumulative and self time (ms)."""
    done = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True, env=child_env())
    rows = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "self [us]" not in line:
            self_us, cumulative_us, name = (part.strip() for part in line[len("import time:") :].split("|"))
            rows.append({"module": name, "self_ms": int(self_us) / 1e3, "cumulative_ms": int(cumulative_us) / 1e3})
    top_level = [r for r in rows if not r["module"].startswith(" ")]  # imported directly, not by another module
    return {
        "total_ms": sum(r["self_ms"] for r in rows),
        "top_level_by_cumulative": sorted(top_level, key=lambda r: -r["cumulative_ms"])[:top],
        "by_cumulative": sorted(
            ({**r, "module": r["module"].strip()} for r in rows), key=lambda r: -r["cumulative_ms"]
        )[:top],
        "by_self": sorted(({**r, "module": r["module"].strip()} for r in rows), key=lambda r: -r["self_ms"])[:top],
    }


def run(trials: int = 5, warmup: int = 1, model: Path = DEMO_MODEL, profile: bool = True) -> dict:
    cmds = commands(model, FALLBACK_PROMPT, MAX_TOKENS)
    names = list(cmds)
    results = {
        "schema": "openelm-startup/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "trials": trials,
            "warmup": warmup,
            "prompt": FALLBACK_PROMPT,
            "max_tokens": MAX_TOKENS,
            "model": str(model),
        },
        "commands": cmds,
        "environment": machine_info(),
        "trials": [],
    }
    for i in range(warmup + trials):
        # alternate who goes first; the floor runs between or after them
        order = names if i % 2 == 0 else [names[1], names[0], names[2]]
        trial = {"order": order, **{name: run_once(cmds[name]) for name in order}}
        if i < warmup:
            texts = {name: trial[name]["stdout"].strip() for name in names[:2]}
            results["same_text"] = bool(texts["openelm-mlx"]) and texts["openelm-mlx"] in texts["mlx-lm"]
            results["outputs"] = texts
            continue
        for name in names:
            del trial[name]["stdout"]
        results["trials"].append(trial)
        print(
            f"trial {i - warmup + 1}/{trials}: "
            + ", ".join(f"{n} {trial[n]['wall_s']:.2f} s" for n in names)
            + f"; load {os.getloadavg()[0]:.1f}",
            file=sys.stderr,
            flush=True,
        )
    summarize(results)
    results["environment"]["load_average_end"] = list(os.getloadavg())
    if profile:
        results["import_profile"] = import_profile(cmds["openelm-mlx"])
    return results


def summarize(results: dict):
    trials = results["trials"]
    out = {}
    for kind in ("wall_s", "cpu_s"):
        for name in ("openelm-mlx", "mlx-lm", "floor"):
            out[f"{name} {kind}"] = spread([t[name][kind] for t in trials])
        out[f"ratio {kind}"] = spread([t["openelm-mlx"][kind] / t["mlx-lm"][kind] for t in trials])
        # above the floor: what each program adds to importing MLX
        out[f"ratio above floor {kind}"] = spread(
            [(t["openelm-mlx"][kind] - t["floor"][kind]) / (t["mlx-lm"][kind] - t["floor"][kind]) for t in trials]
        )
    out["target_ratio"] = TARGET_RATIO
    out["meets_target"] = out["ratio wall_s"]["median"] <= TARGET_RATIO
    results["summary"] = out


def markdown(results: dict) -> str:
    s, env = results["summary"], results["environment"]
    load = env["load_average"], env.get("load_average_end")
    lines = [
        f"Start-up, `generate` of {results['settings']['max_tokens']} tokens with the demo model, "
        f"{results['settings']['trials']} interleaved trials ({results['created']})",
        f"- {env['chip']}, {env['cpu_count']} CPUs; MLX {env['mlx']}, mlx-lm {env['mlx_lm']}; BLAS: {env['blas']['name']}",
        f"- load average (1, 5, 15 min) {' / '.join(f'{x:.1f}' for x in load[0])} at start, "
        f"{' / '.join(f'{x:.1f}' for x in load[1])} at the end; same text: {results.get('same_text')}",
        "",
        "| figure | openelm-mlx | mlx-lm | import mlx.core | ratio (median of per-trial, min–max) | above the floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, label in (("wall_s", "wall s"), ("cpu_s", "CPU s (user+sys)")):
        r, f = s[f"ratio {kind}"], s[f"ratio above floor {kind}"]
        lines.append(
            f"| {label} | {s[f'openelm-mlx {kind}']['median']:.2f} | {s[f'mlx-lm {kind}']['median']:.2f} "
            f"| {s[f'floor {kind}']['median']:.2f} | {r['median']:.3f} ({r['min']:.2f}–{r['max']:.2f}) "
            f"| {f['median']:.3f} |"
        )
    lines.append(f"\nTarget: wall ratio ≤ {s['target_ratio']}: {'met' if s['meets_target'] else 'not met'}.")
    if "import_profile" in results:
        p = results["import_profile"]
        lines += [
            f"\n`python -X importtime -m openelm_mlx generate ...`: {p['total_ms']:.0f} ms of imports; "
            "the modules with the most cumulative time (a module's includes what it imports):",
            "",
            "| module | cumulative ms | self ms |",
            "|---|---:|---:|",
        ]
        lines += [f"| {r['module']} | {r['cumulative_ms']:.0f} | {r['self_ms']:.0f} |" for r in p["by_cumulative"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (file cache, .pyc)")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL, help="model folder (default: the demo model)")
    parser.add_argument("--no-profile", action="store_true", help="skip the -X importtime run")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.warmup < 1:
        parser.error("--trials and --warmup must be at least 1 (the warm-up checks both print the same text)")
    if args.out and args.out.exists() and not args.force:
        parser.error(f"{args.out} exists: pass --force to overwrite it")
    results = run(args.trials, args.warmup, args.model, not args.no_profile)
    print(markdown(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
