"""Core AI bundles of the OpenELM-270M shape (random weights), for either target, proven by
Apple's runtime:

- macos (context 2048): int4 with float16 compute (what ships to Macs), then float32-compute
  bundles, uncompressed and int4, verified;
- ios (context 1024: ctx 256, 512, 1024 x q 8, 16, 64): Apple's iOS preset (4-bit LUT per 32
  output channels, embedding int8 per tensor) and int4 with float16 compute, then the preset in
  float32 compute, verified.

Each export: size, bytes per parameter (target <= 0.6 for the first), functions and states, KV-cache
memory padded to the largest layer's heads against unpadded, export time and peak memory. Each
verification drives the engine twin the stock runner would pick through Apple's reference runtime
on Linux (float16 runs there ~300x slower; the graph code is the same) over a prompt and 16 greedy
decode steps against MLX: max |logits difference| per step, greedy agreement, time.

    python -m openelm_mlx.benchmarks.coreai_270m [--target macos|ios] [--context N]

Each export and verification runs in a child process, so its peak RSS is its own. Results go to
benchmarks/results/coreai_270m.json (macos) or coreai_ios_270m.json (ios)."""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .coreml_270m_export import write_270m_checkpoint
from .machine import machine_info

RESULTS = {
    target: Path(__file__).parent / "results" / name
    for target, name in (("macos", "coreai_270m.json"), ("ios", "coreai_ios_270m.json"))
}
CONTEXT = {"macos": 2048, "ios": 1024}
# (compression, compute precision, verified) per export; the first is what ships.
EXPORTS = {
    "macos": (("int4", "float16", False), ("none", "float32", True), ("int4", "float32", True)),
    "ios": (("ios-preset", "float16", False), ("int4", "float16", False), ("ios-preset", "float32", True)),
}
TARGET_BYTES_PER_PARAMETER = 0.6
STEPS = 16
# Child processes print one JSON line: the step's own result and the child's peak RSS.
PEAK = "import resource; peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024"
EXPORT = """
import json; from openelm_mlx.convert.coreai.export import export_coreai
from openelm_mlx.convert.coreai.bundle import read_bundle; from openelm_mlx.convert.coreai.runtime import read_graph
s = export_coreai({source!r}, {output!r}, target={target!r}, context={context}, compress={compress!r},
    compute_precision={precision!r})
{peak}
graph = read_graph(read_bundle({output!r}))
states = sorted({{name for function in graph.values() for name in function["states"]}})
print(json.dumps(dict(s, functions=len(graph), states=states, peak_rss_bytes=peak)))
"""
VERIFY = """
import json, time; from openelm_mlx.convert.coreai.verify import verify_coreai
start = time.perf_counter(); r = verify_coreai({output!r}, {source!r}, steps={steps}); seconds = time.perf_counter() - start
(b,) = r.backends
{peak}; print(json.dumps(dict(ok=r.ok, weight_problems=r.weight_problems[:3], weight_max_rel_error=r.weight_max_rel_error,
    tolerance=b.tolerance, greedy_agreement=b.agreement, problem=b.problem, steps=[dict(name=s.name,
    max_abs_diff=s.max_abs_diff, token=s.package_token, mlx_token=s.reference_token) for s in b.steps], seconds=seconds,
    peak_rss_bytes=peak)))
"""


def child(code: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"child failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), process_seconds=time.perf_counter() - start)


def export_entry(s: dict) -> dict:
    return {
        "compression": s["compression"],
        "compute_precision": s["compute_precision"],
        "context": s["context"],
        "functions": s["functions"],
        "states": s["states"],
        "bytes": s["bytes"],
        "mib": round(s["bytes"] / 2**20, 1),
        "bytes_per_parameter": round(s["bytes_per_parameter"], 4),
        "kv_mib": round(s["kv_bytes"] / 2**20, 1),
        "kv_mib_unpadded": round(s["kv_bytes_unpadded"] / 2**20, 1),
        "export_seconds": round(s["seconds"], 1),
        "export_peak_rss_gib": round(s["peak_rss_bytes"] / 2**30, 2),
    }


def verify_entry(v: dict) -> dict:
    return {
        "runtime": "Apple's reference runtime on Linux (coreai-core), not device speed",
        **{key: v[key] for key in ("ok", "problem", "weight_problems", "steps", "tolerance", "greedy_agreement")},
        "max_abs_logit_diff": max(s["max_abs_diff"] for s in v["steps"]),
        "weight_max_rel_error": v["weight_max_rel_error"],
        "seconds": round(v["seconds"], 1),
        "peak_rss_gib": round(v["peak_rss_bytes"] / 2**30, 2),
    }


def run(target: str, context: int) -> dict:
    load_start = os.getloadavg()
    exports = []
    with tempfile.TemporaryDirectory() as tmp:
        source = str(Path(tmp) / "OpenELM-270M-random")
        n_params = write_270m_checkpoint(Path(source))
        for compress, precision, verify in EXPORTS[target]:
            output = str(Path(tmp) / f"OpenELM-270M-{target}-{compress}-{precision}")  # a bundle folder
            settings = dict(target=target, context=context, compress=compress, precision=precision)
            entry = export_entry(child(EXPORT.format(source=source, output=output, **settings, peak=PEAK)))
            if verify:
                entry["verify"] = verify_entry(
                    child(VERIFY.format(output=output, source=source, steps=STEPS, peak=PEAK))
                )
            exports.append(entry)
            shutil.rmtree(output)  # one model on disk at a time
    machine = machine_info()
    return {
        "model": "OpenELM-270M shape, random weights",
        "target": target,
        "parameters": n_params,
        "target_bytes_per_parameter": TARGET_BYTES_PER_PARAMETER,
        "meets_target": exports[0]["bytes_per_parameter"] <= TARGET_BYTES_PER_PARAMETER,
        "all_verified": all(
            e["verify"]["ok"] and e["verify"]["greedy_agreement"] == 1.0 for e in exports if "verify" in e
        ),
        "exports": exports,
        "machine": {
            "system": f"{platform.system()} {platform.machine()}",
            "chip": machine["chip"],
            "cpu_count": machine["cpu_count"],
            "blas_of_mlx": machine["blas"]["name"],
            "python": platform.python_version(),
            "load_average_start": list(load_start),
            "load_average_end": list(os.getloadavg()),
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=tuple(EXPORTS), default="macos", help="the bundles' target (default macos)")
    parser.add_argument("--context", type=int, default=None, help="KV-cache length (default: 2048 macos, 1024 ios)")
    args = parser.parse_args(argv)
    result = run(args.target, args.context or CONTEXT[args.target])
    RESULTS[args.target].parent.mkdir(parents=True, exist_ok=True)
    RESULTS[args.target].write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["meets_target"] and result["all_verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
