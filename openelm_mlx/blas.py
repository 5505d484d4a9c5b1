"""Which BLAS MLX's CPU matrix products call, and whether it is a fast one.

The mlx[cpu] wheel bundles a reference BLAS (~6 GFLOP/s here); a user may preload OpenBLAS, or an
MLX build may link another. cpu_layers.swap() asks, to give quantized layers the dequantize-then-BLAS
path, and float layers their split and layout, only where each pays off
(benchmarks/results/linux-cpu-*-2026-11-30).
"""

import ctypes
import os
import sys
from functools import lru_cache

FAST_BLAS = ("openblas", "mkl", "blis", "accelerate", "veclib", "armpl")  # in the library's path


def sgemm_library() -> str:
    """The file whose cblas_sgemm MLX's CPU matmuls call ('' if not found): one in the process's
    global scope (LD_PRELOAD) wins over libmlx's own dependency, as in the dynamic linker."""
    if sys.platform == "darwin":
        return "Accelerate"

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p)] + [("s", ctypes.c_void_p)] * 2

    with open("/proc/self/maps") as maps:
        libmlx = next((line.split()[-1] for line in maps if line.rstrip().endswith("/libmlx.so")), None)
    for scope in (None, libmlx):
        try:
            address = ctypes.cast(ctypes.CDLL(scope, os.RTLD_NOLOAD | os.RTLD_LAZY).cblas_sgemm, ctypes.c_void_p)
            info = DlInfo()
            if ctypes.CDLL(None).dladdr(address, ctypes.byref(info)):
                return os.path.realpath(info.fname.decode())
        except (OSError, AttributeError):  # not in this scope, or no libmlx.so (another build)
            continue
    return ""


def is_fast(library: str) -> bool:
    return any(name in library.lower() for name in FAST_BLAS)


@lru_cache(maxsize=None)
def fast_blas() -> bool:
    """Whether MLX's CPU matmuls use a fast BLAS (looked up once per process)."""
    return is_fast(sgemm_library())
