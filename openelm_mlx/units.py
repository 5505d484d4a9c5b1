"""Figures as people read them: one formatter for every size the commands print."""

import math
import resource
import sys

UNITS = ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB"))  # decimal, as disk and memory sizes are sold


def size_text(n_bytes: float) -> str:
    """'1.42 GB', '37.5 MB', '812 KB', '96 B': three significant figures in the largest unit
    that keeps the number at 1 or more, so a small model is not '0.000 GB'."""
    rounded = float(f"{n_bytes:.3g}")  # first, so that 999.96 MB reads '1.00 GB', not '1000 MB'
    for scale, unit in UNITS:
        if rounded >= scale:
            value = rounded / scale
            return f"{value:.{max(0, 2 - math.floor(math.log10(value) + 1e-9))}f} {unit}"
    return f"{int(n_bytes)} B"


def count_text(n: int) -> str:
    """A parameter count as model names say it: '272M', '1.08B', '3.04B', '4.1M'."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            value = n / scale
            return f"{value:.3g}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)


def peak_rss_bytes() -> int:
    """The most memory this process has held in RAM so far (its peak resident set), everything
    counted: Python, MLX, a package runtime's native allocations, which MLX's counters miss."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else 1024 * maxrss  # bytes on macOS, kilobytes on Linux
