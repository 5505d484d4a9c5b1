"""Core AI iOS (static-shape) bundles of the OpenELM-270M shape (random weights):

1. Apple's iOS preset (4-bit LUT per 32 output channels, embedding int8 per tensor) and int4,
   float16 compute, at the iOS default context 1024 (ctx 256, 512, 1024 x q 8, 16, 64): size,
   bytes per parameter, function count, export time and peak memory;
2. the iOS preset in float32 compute driven by the StaticShapeEngine twin through Apple's
   reference runtime on Linux (float16 runs there ~300x slower) against MLX: greedy agreement,
   max |logits difference|, verify time.

    python -m openelm_mlx.benchmarks.coreai_ios_270m

Each export and verification runs in a child process (coreai_270m.child), so its peak RSS is
its own. Results go to benchmarks/results/coreai_ios_270m.json."""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .coreai_270m import PEAK, child
from .coreml_270m_export import write_270m_checkpoint

RESULTS = Path(__file__).parent / "results" / "coreai_ios_270m.json"
CONTEXT, STEPS = 1024, 16
EXPORT = """
import json; from openelm_mlx.convert.coreai.export import export_coreai
s = export_coreai({source!r}, {output!r}, target="ios", context={context}, compress={compress!r},
    compute_precision={precision!r})
from openelm_mlx.convert.coreai.bundle import read_bundle; from openelm_mlx.convert.coreai.runtime import function_names
{peak}; print(json.dumps(dict(s, functions=len(function_names(read_bundle({output!r}))), peak_rss_bytes=peak)))
"""
VERIFY = """
import json, time; from openelm_mlx.convert.coreai.verify import verify_coreai
start = time.perf_counter(); r = verify_coreai({output!r}, {source!r}, steps={steps}); seconds = time.perf_counter() - start
(b,) = r.backends
{peak}; print(json.dumps(dict(ok=r.ok, weight_problems=r.weight_problems[:3], weight_max_rel_error=r.weight_max_rel_error,
    tolerance=b.tolerance, greedy_agreement=b.agreement, max_abs_diff=max(s.max_abs_diff for s in b.steps),
    steps=len(b.steps), problem=b.problem, seconds=seconds, peak_rss_bytes=peak)))
"""


def run() -> dict:
    load_start = os.getloadavg()
    exports = []
    with tempfile.TemporaryDirectory() as tmp:
        source = str(Path(tmp) / "OpenELM-270M-random")
        n_params = write_270m_checkpoint(Path(source))
        for compress, precision, verify in (
            ("ios-preset", "float16", False),
            ("int4", "float16", False),
            ("ios-preset", "float32", True),
        ):
            output = str(Path(tmp) / f"OpenELM-270M-ios-{compress}-{precision}")
            s = child(
                EXPORT.format(
                    source=source, output=output, context=CONTEXT, compress=compress, precision=precision, peak=PEAK
                )
            )
            entry = {
                "compression": compress,
                "compute_precision": precision,
                "context": CONTEXT,
                "functions": s["functions"],
                "mib": round(s["bytes"] / 2**20, 1),
                "bytes_per_parameter": round(s["bytes_per_parameter"], 4),
                "kv_mib": round(s["kv_bytes"] / 2**20, 1),
                "kv_mib_unpadded": round(s["kv_bytes_unpadded"] / 2**20, 1),
                "export_seconds": round(s["seconds"], 1),
                "export_peak_rss_gib": round(s["peak_rss_bytes"] / 2**30, 2),
            }
            if verify:
                v = child(VERIFY.format(output=output, source=source, steps=STEPS, peak=PEAK))
                entry["verify"] = dict(
                    v, seconds=round(v["seconds"], 1), peak_rss_gib=round(v.pop("peak_rss_bytes") / 2**30, 2)
                )
            exports.append(entry)
            shutil.rmtree(output)
    return {
        "model": "OpenELM-270M shape, random weights",
        "parameters": n_params,
        "target": "ios (static shapes)",
        "exports": exports,
        "machine": "2-core Linux x86-64 VM shared with other jobs, Apple's reference runtime (coreai-core)",
        "load_average_start": list(load_start),
        "load_average_end": list(os.getloadavg()),
    }


def main(argv=None):
    result = run()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if all(e["verify"]["ok"] for e in result["exports"] if "verify" in e) else 1


if __name__ == "__main__":
    sys.exit(main())
