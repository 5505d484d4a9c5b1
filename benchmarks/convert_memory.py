"""Peak resident memory of `openelm convert --bits 4` on a synthetic checkpoint of a real shape.

    python -m openelm_mlx.benchmarks.convert_memory --size 1.1B

Writes a float32 Hugging Face-layout checkpoint (random weights) to a temporary folder, converts
it in a child process, and reports the child's peak RSS against the input's size. Target: the
peak stays below half of the input, since conversion streams tensor by tensor.

Both steps run in child processes of a parent that holds no weights: a child's peak RSS counts
what its parent held when it was started (Linux keeps the high-water mark across fork and exec),
so writing the checkpoint in this process would be measured as the conversion's memory."""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openelm_mlx.config import OpenELMConfig

WRITE = """
import sys
from openelm_mlx.benchmarks.synthetic import write_checkpoint
from openelm_mlx.config import OpenELMConfig
write_checkpoint(sys.argv[1], OpenELMConfig.preset(sys.argv[2]), shards=int(sys.argv[3]))
"""


def peak_rss(command) -> int:
    """Run `command`; its own peak resident memory in bytes."""
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed")
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1.1B", help="preset: 270M, 450M, 1.1B or 3B")
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args(argv)
    config = OpenELMConfig.preset(args.size)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        src, out = Path(tmp) / "hf", Path(tmp) / "mlx"
        # float32 random weights in ~1 GB shards, as a Hub repo would hold them
        shards = max(1, round(config.num_parameters() * 4 / 1e9))
        peak_rss([sys.executable, "-c", WRITE, str(src), args.size, str(shards)])
        input_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        start = time.perf_counter()
        peak = peak_rss(
            [sys.executable, "-m", "openelm_mlx", "convert", str(src), "-o", str(out), "--bits", str(args.bits)]
        )
        seconds = time.perf_counter() - start
        output_bytes = sum(f.stat().st_size for f in out.iterdir())
    print(
        f"{args.size} float32 -> {args.bits}-bit: input {input_bytes / 1e9:.2f} GB, output {output_bytes / 1e9:.2f} GB, "
        f"{seconds:.0f} s, peak RSS {peak / 1e9:.2f} GB = {peak / input_bytes:.2f} of the input "
        f"({'below' if peak < input_bytes / 2 else 'ABOVE'} the 0.5 target)"
    )


if __name__ == "__main__":
    main()
