"""The machine a benchmark ran on: chip, memory, OS, MLX build, BLAS, memory bandwidth."""

import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

# Memory bandwidth in GB/s (Apple's and press announcements, /work/shared/reference/performance.md).
# The M3 Max comes in two bandwidths, told apart by its GPU core count.
APPLE_BANDWIDTH_GBS = {
    "M1": 68,
    "M1 Pro": 200,
    "M1 Max": 400,
    "M1 Ultra": 800,
    "M2": 100,
    "M2 Pro": 200,
    "M2 Max": 400,
    "M2 Ultra": 800,
    "M3": 100,
    "M3 Pro": 150,
    "M3 Max": 400,
    "M3 Ultra": 819,
    "M4": 120,
    "M4 Pro": 273,
    "M4 Max": 546,
    "M5": 153,
}
M3_MAX_30_CORE_GBS = 300


def _run(cmd) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def chip_name() -> str:
    if sys.platform == "darwin":
        return _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> Optional[str]:
    """The GPU MLX runs on: Apple's is the chip itself; elsewhere ask nvidia-smi (mlx[cuda])."""
    if mx.default_device() == mx.cpu:
        return None
    if sys.platform == "darwin":
        return chip_name()
    names = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]).splitlines()
    return names[0] if names else "unknown GPU"


def memory_bytes() -> Optional[int]:
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "hw.memsize"])
        return int(out) if out.isdigit() else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def _gpu_cores() -> Optional[int]:
    match = re.search(r'"sppci_cores"\s*:\s*"?(\d+)', _run(["system_profiler", "SPDisplaysDataType", "-json"]))
    return int(match.group(1)) if match else None


def apple_bandwidth(chip: str) -> Optional[Tuple[float, str]]:
    """(GB/s, where the figure comes from) for an Apple chip name such as 'Apple M2 Max'."""
    match = re.match(r"Apple (M\d+(?: Pro| Max| Ultra)?)\b", chip)
    if not match or match.group(1) not in APPLE_BANDWIDTH_GBS:
        return None
    name = match.group(1)
    if name == "M3 Max" and _gpu_cores() == 30:
        return M3_MAX_30_CORE_GBS, "Apple's specification (M3 Max, 30-core GPU)"
    return APPLE_BANDWIDTH_GBS[name], f"Apple's specification ({name})"


def measure_bandwidth(gib: float = 0.5, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: the best of a few sums over a buffer larger than any cache.
    On a CPU numpy's vectorised sum streams faster than MLX's CPU reduction; on a GPU MLX's does."""
    n = int(gib * 2**30) // 4
    best = float("inf")
    if mx.default_device() == mx.cpu:
        buffer = np.ones(n, dtype=np.float32)
        buffer.sum()
        for _ in range(repeats):
            start = time.perf_counter()
            buffer.sum()
            best = min(best, time.perf_counter() - start)
    else:
        buffer = mx.ones((n,), dtype=mx.float32)
        mx.eval(buffer.sum())
        for _ in range(repeats):
            start = time.perf_counter()
            mx.eval(buffer.sum())
            best = min(best, time.perf_counter() - start)
    return n * 4 / best / 1e9


def blas() -> dict:
    """The BLAS libraries mapped into this process, and which one wins (a preload does)."""
    if sys.platform == "darwin":
        return {"name": "Accelerate", "libraries": []}
    try:
        mapped = {
            line.split()[-1]
            for line in Path("/proc/self/maps").read_text().splitlines()
            if line.split()[-1].startswith("/")
        }
    except OSError:
        mapped = set()
    libraries = sorted(p for p in mapped if re.search(r"blas|mkl", Path(p).name, re.I))
    real = {os.path.realpath(p) for p in mapped}
    preloaded = [
        p
        for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
        if re.search(r"blas|mkl", p, re.I) and os.path.realpath(p) in real
    ]
    if preloaded:
        version = re.search(r"openblas\w*-r([\d.]+)\.so", " ".join(libraries))
        kind = "OpenBLAS" + (f" {version.group(1)}" if version else "") if "openblas" in preloaded[0] else "BLAS"
        return {"name": f"{kind} (LD_PRELOAD={preloaded[0]})", "libraries": libraries}
    if any("mlx_cpu.libs" in p for p in libraries):
        return {
            "name": "reference BLAS bundled with the mlx-cpu wheel (slow; see LD_PRELOAD in the README)",
            "libraries": libraries,
        }
    return {"name": ", ".join(Path(p).name for p in libraries) or "unknown", "libraries": libraries}


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict:
    """Everything needed to compare this run with others."""
    chip = chip_name()
    known = apple_bandwidth(chip)
    bandwidth, source = known or (round(measure_bandwidth(), 1), "measured by a 0.5 GiB stream read")
    return {
        "chip": chip,
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory_bytes(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": _version("mlx-lm"),
        "openelm_mlx": _version("openelm-mlx"),
        "device": str(mx.default_device()),
        "gpu": gpu_name(),
        "blas": blas(),
        "memory_bandwidth_gbs": bandwidth,
        "memory_bandwidth_source": source,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
