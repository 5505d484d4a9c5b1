"""Open an exported package with the backend that runs it: Core ML (macOS 15+), the numpy MIL
executor (anywhere), or Apple's Core AI runtime (Linux, macOS 27); each is a PackageRunner
(package_runner.py). PackageModel puts a runner behind the MLX model's call signature."""

from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx

from openelm_mlx.errors import OpenELMError
from openelm_mlx.units import peak_rss_bytes

from .coreai.bundle import Bundle, engine_kind, read_bundle
from .coreai.runtime import read_model
from .coreai.sequential_engine import SequentialEngine
from .coreai.static_engine import StaticShapeEngine
from .coreml.swift_transformers import CoreMLRunner
from .package_input import PackageInfo, package_tokenizer
from .package_runner import PackageRunner

# backend -> the package it runs, and what runs it
BACKENDS = {
    "coreml": (".mlpackage", "Core ML itself (macOS 15+)"),
    "mil-reference": (".mlpackage", "the numpy MIL executor, anywhere (slow, for checking)"),
    "coreai": (
        "",
        "Apple's Core AI runtime (Linux: the reference runtime in coreai-core; macOS 27)",
    ),  # a bundle folder
}


def open_runner(package, backend: str) -> PackageRunner:
    if backend not in BACKENDS:
        raise OpenELMError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")
    if backend == "coreai":
        return open_bundle(package)
    suffix = BACKENDS[backend][0]
    if Path(package).suffix != suffix:
        raise OpenELMError(f"--backend {backend} runs {suffix} packages, got '{package}'")
    return CoreMLRunner(package, backend)


def open_bundle(bundle, chunk_threshold=None) -> PackageRunner:
    """A Core AI bundle behind the engine twin that the stock runner would pick; its model read
    (every field against the program, main.mlirb hashed) once."""
    bundle = read_bundle(bundle)
    return start_engine(bundle, *read_model(bundle), chunk_threshold)


def start_engine(bundle: Bundle, info: PackageInfo, graph: dict, chunk_threshold=None) -> PackageRunner:
    """The engine twin for a bundle whose model is read (runtime.read_model): chosen by its
    functions as EngineFactory.swift does (bundle.engine_kind)."""
    if engine_kind(list(graph)) == "static":
        return StaticShapeEngine(bundle, info, list(graph))
    return SequentialEngine(bundle, info, chunk_threshold)


class PackageModel:
    """An exported package behind the MLX model's call signature, so that sampling, stop strings and
    statistics are the same code for every backend. The package keeps its own KV cache (states),
    so generation passes no MLX cache."""

    def __init__(self, runner: PackageRunner):
        self.runner = runner
        self.config = SimpleNamespace(max_context_length=runner.info.context)

    def make_cache(self):
        return []

    def peak_memory(self):
        """The runtime allocates outside MLX's counters: the process's peak RSS is what is known."""
        return peak_rss_bytes(), "process"

    def __call__(self, tokens, cache=None):
        ids = tokens[0].tolist()
        logits = self.runner.prefill(ids) if len(ids) > 1 else self.runner.decode(ids[0])
        return mx.array(logits)[None, None]  # [1, 1, vocab]: the last position is all that is used


def load_package(package, backend: str, tokenizer=None):
    """(PackageModel, Tokenizer) of an exported package for `openelm generate --backend ...`."""
    if package is None:
        what = "OUT (an exported bundle folder)" if backend == "coreai" else f"OUT{BACKENDS.get(backend, ('',))[0]}"
        raise OpenELMError(f"--backend {backend} needs --model {what}")
    runner = open_runner(package, backend)
    beside = runner.bundle.tokenizer_folder / "tokenizer.model" if backend == "coreai" else None
    return PackageModel(runner), package_tokenizer(package, runner.info, tokenizer, beside)
