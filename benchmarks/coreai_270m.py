"""Core AI macOS bundles of the OpenELM-270M shape (random weights), proven by Apple's runtime:

1. int4, float16 compute (what ships to devices): size, bytes per parameter (target <= 0.6),
   export time and peak memory, KV-cache memory padded to 5 heads per layer against unpadded;
2. float32-compute bundles, uncompressed and int4, driven by the sequential-engine twin through
   Apple's reference runtime on Linux (float16 runs there ~300x slower; the graph code is the same)
   over a prompt and 16 greedy decode steps against MLX: max |logits difference| per step, greedy
   agreement, verify time, and the states the stock engines see (2: keyCache, valueCache).

    python -m openelm_mlx.benchmarks.coreai_270m [--context 2048]

Each export and verification runs in a child process, so its peak RSS is its own. Results go to
benchmarks/results/coreai_270m.json."""

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

RESULTS = Path(__file__).parent / "results" / "coreai_270m.json"
TARGET_BYTES_PER_PARAMETER = 0.6
STEPS = 16
# Child processes print one JSON line: the step's own result and the child's peak RSS.
PEAK = "import resource; peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024"
EXPORT = """
import json, time; from openelm_mlx.convert.coreai.export import export_coreai
s = export_coreai({source!r}, {output!r}, context={context}, compress={compress!r}, compute_precision={precision!r})
{peak}; print(json.dumps(dict(s, peak_rss_bytes=peak)))
"""
VERIFY = """
import json, time; from openelm_mlx.convert.coreai.verify import verify_coreai
start = time.perf_counter(); r = verify_coreai({output!r}, {source!r}, steps={steps}); seconds = time.perf_counter() - start
(b,) = r.backends
from openelm_mlx.convert.runner import open_bundle; states = open_bundle({output!r}).functions["main"].desc.state_names
{peak}; print(json.dumps(dict(ok=r.ok, states=list(states), weight_max_rel_error=r.weight_max_rel_error, tolerance=b.tolerance,
    greedy_agreement=b.agreement, steps=[dict(name=s.name, max_abs_diff=s.max_abs_diff, token=s.package_token,
    mlx_token=s.reference_token) for s in b.steps], seconds=seconds, peak_rss_bytes=peak)))
"""


def child(code: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"child failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), process_seconds=time.perf_counter() - start)


def run(context: int) -> dict:
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        source = str(Path(tmp) / "OpenELM-270M-random")
        n_params = write_270m_checkpoint(Path(source))
        exports = []
        for compress, precision, verify in (
            ("int4", "float16", False),
            ("none", "float32", True),
            ("int4", "float32", True),
        ):
            output = str(Path(tmp) / f"OpenELM-270M-{compress}-{precision}")  # a bundle folder
            summary = child(
                EXPORT.format(
                    source=source, output=output, context=context, compress=compress, precision=precision, peak=PEAK
                )
            )
            entry = {
                "compression": compress,
                "compute_precision": precision,
                "context": context,
                "bytes": summary["bytes"],
                "mib": round(summary["bytes"] / 2**20, 1),
                "bytes_per_parameter": round(summary["bytes_per_parameter"], 4),
                "export_seconds": round(summary["seconds"], 1),
                "export_peak_rss_gib": round(summary["peak_rss_bytes"] / 2**30, 2),
                "kv_mib": round(summary["kv_bytes"] / 2**20, 1),
                "kv_mib_unpadded": round(summary["kv_bytes_unpadded"] / 2**20, 1),
            }
            if verify:
                result = child(VERIFY.format(output=output, source=source, steps=STEPS, peak=PEAK))
                entry["verify"] = {
                    "runtime": "Apple's reference runtime on Linux (coreai-core), not device speed",
                    "ok": result["ok"],
                    "states": result["states"],
                    "steps": result["steps"],
                    "max_abs_logit_diff": max(s["max_abs_diff"] for s in result["steps"]),
                    "tolerance": result["tolerance"],
                    "greedy_agreement": result["greedy_agreement"],
                    "weight_max_rel_error": result["weight_max_rel_error"],
                    "seconds": round(result["seconds"], 1),
                    "peak_rss_gib": round(result["peak_rss_bytes"] / 2**30, 2),
                }
            exports.append(entry)
            shutil.rmtree(output)  # one model on disk at a time
    machine = machine_info()
    return {
        "model": "OpenELM-270M shape, random weights",
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
    parser.add_argument("--context", type=int, default=2048, help="KV-cache length of every export (default 2048)")
    args = parser.parse_args(argv)
    result = run(args.context)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["meets_target"] and result["all_verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
