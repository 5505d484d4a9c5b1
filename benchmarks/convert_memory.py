"""Peak resident memory of `openelm convert --bits 4` on a synthetic checkpoint of a real shape.

    python -m openelm_mlx.benchmarks.convert_memory --size 1.1B

Writes a float32 Hugging Face-layout checkpoint (random weights) to a temporary folder, converts
it in a child process, and reports the child's peak RSS against the input's size. Target: the
peak stays below half of the input, since conversion streams tensor by tensor."""

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openelm_mlx.benchmarks.synthetic import write_checkpoint
from openelm_mlx.config import OpenELMConfig


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1.1B", help="preset: 270M, 450M, 1.1B or 3B")
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args(argv)
    config = OpenELMConfig.preset(args.size)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        src, out = Path(tmp) / "hf", Path(tmp) / "mlx"
        # float32 random weights in ~1 GB shards, as a Hub repo would hold them
        write_checkpoint(src, config, shards=max(1, round(config.num_parameters() * 4 / 1e9)))
        input_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "openelm_mlx", "convert", str(src), "-o", str(out), "--bits", str(args.bits)],
            check=True,
        )
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        output_bytes = sum(f.stat().st_size for f in out.iterdir())
    print(
        f"{args.size} float32 -> {args.bits}-bit: input {input_bytes / 1e9:.2f} GB, output {output_bytes / 1e9:.2f} GB, "
        f"{seconds:.0f} s, peak RSS {peak / 1e9:.2f} GB = {peak / input_bytes:.2f} of the input "
        f"({'below' if peak < input_bytes / 2 else 'ABOVE'} the 0.5 target)"
    )


if __name__ == "__main__":
    main()
