"""Run an exported package token by token, whatever runs it: Core ML (macOS 15+), the numpy MIL
executor (anywhere), or Apple's Core AI runtime (Linux, macOS 27). Long prompts become successive
prefill calls; the cache position is the only thing besides tokens that a package takes."""

from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import mlx.core as mx
import numpy as np

from openelm_mlx.errors import OpenELMError

from .package import PackageInfo, package_tokenizer

# backend -> the package it runs, and what runs it
BACKENDS = {
    "coreml": (".mlpackage", "Core ML itself (macOS 15+)"),
    "mil-reference": (".mlpackage", "the numpy MIL executor, anywhere (slow, for checking)"),
    "coreai": (".aimodel", "Apple's Core AI runtime (Linux: the reference runtime in coreai-core; macOS 27)"),
}


class PackageRunner:
    """`prefill(tokens)` then `decode(token)` repeatedly; each returns float32 logits [vocab] for
    the next token. `reset()` starts a new sequence with zeroed KV-cache states. A backend provides
    `_reset_states()` and `_run(function, inputs) -> logits`."""

    def __init__(self, package, info: PackageInfo):
        self.package = Path(package)
        self.info = info
        self.position = 0

    def reset(self):
        self.position = 0
        self._reset_states()

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Append `tokens` (blocks of up to prefill_length) to the cache; logits after the last."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise OpenELMError("prefill needs at least one token")
        self._check_room(len(tokens))
        block = self.info.prefill_length
        for start in range(0, len(tokens), block):
            logits = self._call("prefill", tokens[start : start + block])
        return logits

    def decode(self, token: int) -> np.ndarray:
        """Append one token; logits for the token after it."""
        self._check_room(1)
        return self._call("decode", [int(token)])

    def _check_room(self, n: int):
        if self.position + n > self.info.context:
            raise OpenELMError(
                f"{self.position + n} tokens do not fit in the package's context of {self.info.context} "
                f"({self.position} already in the cache, {n} more): shorten the prompt or the generation, "
                "or re-export with a larger --context"
            )

    def _call(self, function: str, tokens: Sequence[int]) -> np.ndarray:
        if any(not 0 <= t < self.info.vocab_size for t in tokens):
            raise OpenELMError(f"token ids must be in 0..{self.info.vocab_size - 1}, got {max(tokens)}")
        inputs = {"input_ids": np.array([tokens], np.int32), "position": np.array([self.position], np.int32)}
        logits = self._run(function, inputs)
        self.position += len(tokens)
        return np.asarray(logits, np.float32).reshape(-1)

    def _reset_states(self):
        raise NotImplementedError

    def _run(self, function: str, inputs: dict) -> np.ndarray:
        raise NotImplementedError


def open_runner(package, backend: str) -> PackageRunner:
    if backend not in BACKENDS:
        raise OpenELMError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")
    suffix = BACKENDS[backend][0]
    if Path(package).suffix != suffix:
        raise OpenELMError(f"--backend {backend} runs {suffix} packages, got '{package}'")
    if backend == "coreai":
        from .coreai.runtime import CoreAIRunner

        return CoreAIRunner(package)
    from .coreml.runtime import CoreMLRunner

    return CoreMLRunner(package, backend)


class PackageModel:
    """An exported package behind the MLX model's call signature, so that sampling, stop strings and
    statistics are the same code for every backend. The package keeps its own KV cache (states),
    so generation passes no MLX cache."""

    def __init__(self, runner: PackageRunner):
        self.runner = runner
        self.config = SimpleNamespace(max_context_length=runner.info.context)

    def make_cache(self):
        return []

    def __call__(self, tokens, cache=None):
        ids = tokens[0].tolist()
        logits = self.runner.prefill(ids) if len(ids) > 1 else self.runner.decode(ids[0])
        return mx.array(logits)[None, None]  # [1, 1, vocab]: the last position is all that is used


def load_package(package, backend: str, tokenizer=None):
    """(PackageModel, Tokenizer) of an exported package for `openelm generate --backend ...`."""
    if package is None:
        raise OpenELMError(
            f"--backend {backend} needs --model OUT{BACKENDS.get(backend, ('',))[0]} (an exported package)"
        )
    return PackageModel(open_runner(package, backend)), package_tokenizer(package, tokenizer)
