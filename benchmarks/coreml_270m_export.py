"""Core ML export of the OpenELM-270M shape (random weights): export time, peak memory, package
size and bytes per parameter, for a --compress choice (default int4, the iOS target).

    python -m openelm_mlx.benchmarks.coreml_270m_export [--compress int4] [--context 2048]

The export runs in a child process so its peak RSS is measured alone (without the checkpoint
generation). Results go to benchmarks/results/coreml_270m_export.json.
"""

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from openelm_mlx.benchmarks.synthetic import train_tokenizer, write_checkpoint
from openelm_mlx.config import OpenELMConfig

RESULTS = Path(__file__).parent / "results" / "coreml_270m_export.json"
TARGET_BYTES_PER_PARAMETER = {"int4": 0.6}


def write_270m_checkpoint(folder: Path) -> int:
    """A 270M-shaped Hugging Face checkpoint with float16 random weights and a tokenizer."""
    config = OpenELMConfig.preset("270M")
    write_checkpoint(folder, config, tokenizer=train_tokenizer(folder, config.vocab_size), dtype=mx.float16)
    return config.num_parameters()


def run(compress: str = "int4", context: int = 2048) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_params = write_270m_checkpoint(tmp / "OpenELM-270M-random")
        out = tmp / f"OpenELM-270M-{compress}.mlpackage"
        code = (
            "import json, sys; from openelm_mlx.convert.coreml.export import export_coreml; "
            f"print(json.dumps(export_coreml({str(tmp / 'OpenELM-270M-random')!r}, {str(out)!r}, "
            f"context={context}, compress={compress!r})))"
        )
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode:
            sys.exit(f"export failed:\n{proc.stderr[-4000:]}")
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    result = {
        "model": "OpenELM-270M shape, random weights",
        "parameters": n_params,
        "compression": compress,
        "context": context,
        "package_bytes": summary["bytes"],
        "package_mib": round(summary["bytes"] / 2**20, 1),
        "bytes_per_parameter": round(summary["bytes_per_parameter"], 4),
        "export_seconds": round(summary["seconds"], 1),
        "process_seconds": round(wall, 1),
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "machine": f"{platform.system()} {platform.machine()}, {platform.processor() or 'cpu'}",
        "python": platform.python_version(),
    }
    target = TARGET_BYTES_PER_PARAMETER.get(compress)
    if target is not None:
        result["target_bytes_per_parameter"] = target
        result["meets_target"] = summary["bytes_per_parameter"] <= target
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compress", default="int4", choices=["none", "int8", "int4", "palettize4", "palettize6"])
    parser.add_argument("--context", type=int, default=2048)
    args = parser.parse_args(argv)
    result = run(args.compress, args.context)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result.get("meets_target", True) else 1


if __name__ == "__main__":
    sys.exit(main())
