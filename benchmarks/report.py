"""Benchmark results as a Markdown table, results.json (every trial), results.csv and chart.png."""

import csv
import io
import json
import logging
from pathlib import Path
from typing import List

from openelm_mlx import outputs
from openelm_mlx.units import size_text

from .spec_report import SPECULATION_CSV_FIELDS, settings_line, speculation_lines, speculation_rows

log = logging.getLogger(__name__)
FILES = ("results.json", "results.csv", "results.md", "chart.png")
RESULTS_BYTES = 65536  # about what results take: bench writes and removes this much before the run
NAMES = {"openelm_mlx": "openelm-mlx", "mlx_lm": "mlx-lm", "coreml": "Core ML", "coreai": "Core AI"}
CSV_FIELDS = [
    "model",
    "precision",
    "role",
    "implementation",
    "activation_dtype",
    "parameters",
    "weight_bytes",
    "decode_bytes_per_token",
    "trials",
    "prefill_tps_median",
    "prefill_tps_stdev",
    "decode_tps_median",
    "decode_tps_stdev",
    "ttft_s_median",
    "itl_median_s_median",
    "itl_p90_s_median",
    "peak_memory_bytes_median",
    "achieved_gbs",
    "roofline",
    "prefill_tps_ratio",
    "decode_tps_ratio",
    "error",
]


def rows(results: dict) -> List[dict]:
    """One row per configuration and implementation (a failed configuration: one row, its error)."""
    out = []
    for c in results["configurations"]:
        base = {
            k: c.get(k)
            for k in (
                "model",
                "precision",
                "role",
                "activation_dtype",
                "parameters",
                "weight_bytes",
                "decode_bytes_per_token",
                "error",
            )
        }
        impls = {n: r for n, r in c["implementations"].items() if "summary" in r}
        if not impls:
            out.append({**base, "implementation": None})
        for name, r in impls.items():
            s = r["summary"]
            row = {
                **base,
                "implementation": name,
                "trials": s["decode_tps"]["n"],
                "achieved_gbs": r["achieved_gbs"],
                "roofline": r["roofline"],
            }
            for metric in ("prefill_tps", "decode_tps"):
                row[f"{metric}_median"] = s[metric]["median"]
                row[f"{metric}_stdev"] = s[metric]["stdev"]
            for metric in ("ttft_s", "itl_median_s", "itl_p90_s", "peak_memory_bytes"):
                row[f"{metric}_median"] = s[metric]["median"]
            if name == "openelm_mlx" and "ratios" in c:
                row["prefill_tps_ratio"] = c["ratios"]["prefill_tps_ratio"]["median"]
                row["decode_tps_ratio"] = c["ratios"]["decode_tps_ratio"]["median"]
            out.append(row)
    return out


def _pm(stats: dict, digits: int = 1) -> str:
    return f"{stats['median']:.{digits}f} ± {stats['stdev']:.{digits}f}"


def _precision(c: dict) -> str:
    note = "" if c["role"] == "benchmark" else f"; {c['role']}"
    return f"{c['precision']} ({c['activation_dtype']} activations{note})"


def _loads(values) -> str:
    return " / ".join(f"{x:.1f}" for x in values) if values else "?"


def markdown(results: dict) -> str:
    s, env = results["settings"], results["environment"]
    speculation = s.get("speculation")
    if speculation:
        setting = settings_line(s)
    else:
        setting = (
            f"- Settings: prompt {s['prompt_tokens']} tokens (pp{s['prompt_tokens']}), {s['generation_tokens']} "
            f"generated (tg{s['generation_tokens']}), {s['trials']} trials after {s['warmup']} warm-up (whole prompt, ≤ 4 decode steps), "
            f"backend {s['backend']}, seed {s['seed']}; figures are the median ± sample stdev over trials."
        )
    lines = [
        f"## openelm bench: {env.get('gpu') or env['chip']}, {env['device']}",
        "",
        setting,
        f"- Machine: {env['cpu_count']} CPU cores, {size_text(env['memory_bytes']) if env['memory_bytes'] else '?'} memory, {env['os']}; "
        f"MLX {env['mlx']} on {env['device']}, mlx-lm {env['mlx_lm']}; BLAS: {env['blas']['name']}; "
        f"memory bandwidth {env['memory_bandwidth_gbs']} GB/s ({env['memory_bandwidth_source']}); "
        f"load average (1, 5, 15 min) {_loads(env.get('load_average'))} at start, "
        f"{_loads(env.get('load_average_end'))} at the end.",
    ]
    sources = {}
    for c in results["configurations"] + results.get("speculation", []):
        if not c.get("error"):
            sources.setdefault(c["source"], []).append(c["model"])
    lines += [f"- Weights of {', '.join(dict.fromkeys(models))}: {src}." for src, models in sources.items()]
    runtimes = {c["runtime"] for c in results["configurations"] if c.get("runtime")}  # package backends
    lines += [f"- Packages run by {runtime}." for runtime in sorted(runtimes)]
    if results["interrupted"]:
        lines.append("- **Interrupted**: only the configurations gathered so far are shown.")
    if speculation:
        return "\n".join(lines + speculation_lines(results))
    lines += [
        "",
        "| model | precision | implementation | prompt tok/s | generation tok/s | TTFT ms | inter-token ms (median / p90) "
        "| peak memory MB | weights MB | roofline |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results["configurations"]:
        for name, r in c["implementations"].items():
            if "summary" not in r:
                continue
            m = r["summary"]
            lines.append(
                f"| {c['model']} | {_precision(c)} | {NAMES[name]} "
                f"| {_pm(m['prefill_tps'])} | {_pm(m['decode_tps'], 2)} | {m['ttft_s']['median'] * 1e3:.0f} "
                f"| {m['itl_median_s']['median'] * 1e3:.1f} / {m['itl_p90_s']['median'] * 1e3:.1f} "
                f"| {m['peak_memory_bytes']['median'] / 1e6:,.0f} | {c['weight_bytes'] / 1e6:,.0f} "
                f"| {r['roofline'] * 100:.1f}% |"
            )
    ratios = [c for c in results["configurations"] if "ratios" in c]
    if ratios:
        lines += [
            "",
            "openelm-mlx / mlx-lm, same weights, interleaved trials (median of per-trial ratios, "
            "min–max; ≥ 1.0: openelm-mlx is faster):",
            "",
            "| model | precision | prompt tok/s ratio | generation tok/s ratio |",
            "|---|---|---:|---:|",
        ]
        for c in ratios:
            p, d = c["ratios"]["prefill_tps_ratio"], c["ratios"]["decode_tps_ratio"]
            lines.append(
                f"| {c['model']} | {c['precision']} | {p['median']:.3f} ({p['min']:.2f}–{p['max']:.2f}) "
                f"| {d['median']:.3f} ({d['min']:.2f}–{d['max']:.2f}) |"
            )
    best = results.get("best_vs_mlx_lm_default") or []
    if best:
        lines += [
            "",
            "openelm-mlx's fastest setting against mlx-lm's default conversion (float16 weights and "
            "activations), ratio of medians:",
            "",
            "| model | openelm-mlx setting | vs mlx-lm | prompt tok/s ratio | generation tok/s ratio |",
            "|---|---|---|---:|---:|",
        ]
        for b in best:
            lines.append(
                f"| {b['model']} | {b['openelm_mlx_precision']} | {b['mlx_lm_precision']} "
                f"| {b['prefill_tps_ratio']:.2f} | {b['decode_tps_ratio']:.2f} |"
            )
    failed = [c for c in results["configurations"] if c.get("error")]
    if failed:
        lines += ["", "Failed or interrupted configurations:", ""]
        lines += [f"- {c['model']} {c['precision']}: {c['error']}" for c in failed]
    lines += [
        "",
        "Roofline: generation tok/s ÷ (memory bandwidth ÷ bytes read per token), bytes per token = "
        "weight bytes + KV cache at the mean decode length. Prompt tok/s: prefill alone (logits of the "
        "last position); TTFT adds sampling the first token.",
    ]
    return "\n".join(lines)


def to_csv(results: dict) -> str:
    buffer = io.StringIO()
    speculation = results["settings"].get("speculation")
    fields = SPECULATION_CSV_FIELDS if speculation else CSV_FIELDS
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(speculation_rows(results) if speculation else rows(results))
    return buffer.getvalue()


def chart(results: dict, path) -> bool:
    """Prompt and generation tok/s by model and precision, one bar per implementation, as a PNG
    written to `path` (a file name or a binary file); False if there is nothing to draw."""
    data = [r for r in rows(results) if r["implementation"]]
    if not data:  # before importing matplotlib (~1 s): a run stopped in its first trial ends at once
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("chart.png skipped: matplotlib is missing (pip install 'openelm-mlx[bench]')")
        return False

    def label(r):
        return f"{r['model']}\n{r['precision']}" + (
            "" if r["role"] == "benchmark" else "\n" + r["role"].replace(" conversion", "")
        )

    labels = list(dict.fromkeys(label(r) for r in data))
    impls = list(dict.fromkeys(r["implementation"] for r in data))
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.3 * len(labels)), 8))
    width = 0.8 / len(impls)
    for ax, metric, title in zip(axes, ("prefill_tps", "decode_tps"), ("prompt (prefill) tok/s", "generation tok/s")):
        for j, impl in enumerate(impls):
            values = {label(r): r for r in data if r["implementation"] == impl}
            xs = [i + (j - (len(impls) - 1) / 2) * width for i, lab in enumerate(labels) if lab in values]
            rs = [values[lab] for lab in labels if lab in values]
            ax.bar(
                xs,
                [r[f"{metric}_median"] for r in rs],
                width,
                yerr=[r[f"{metric}_stdev"] for r in rs],
                label=NAMES[impl],
                capsize=2,
            )
        ax.set_xticks(range(len(labels)), labels)
        ax.set_title(title)
        ax.set_ylabel("tokens / s (median over trials)")
        ax.legend()
    env, s = results["environment"], results["settings"]
    fig.suptitle(
        f"OpenELM, {env.get('gpu') or env['chip']} ({env['device']}), pp{s['prompt_tokens']} / tg{s['generation_tokens']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return True


def write_results(results: dict, out: Path, force: bool = False) -> List[Path]:
    """results.json, results.csv, results.md and chart.png in `out`, placed together or not at
    all, never over a file that appeared during the run unless `force` (outputs.staged_outputs)."""
    files = {
        "results.json": json.dumps(results, indent=1).encode(),
        "results.csv": to_csv(results).encode(),
        "results.md": (markdown(results) + "\n").encode(),
    }
    png = io.BytesIO()
    if chart(results, png):
        files["chart.png"] = png.getvalue()
    paths = [out / name for name in files]
    with outputs.staged_outputs(paths, force) as temps:
        for tmp, data in zip(temps, files.values()):
            tmp.write_bytes(data)
    return paths
