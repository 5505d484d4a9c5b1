"""The contract every exported-package runner keeps, whatever runs the package (Core ML, the numpy
MIL executor, Apple's Core AI runtime): a KV cache inside the package, filled by `prefill` and
`decode` calls at a position. Long prompts become successive prefill calls of up to prefill_length
tokens; how tokens and position are passed is the backend's (`_inputs`). Backends subclass it:
coreml/swift_transformers.py, and coreai/runtime.py's CoreAIEngine, whose engine twins replace
prefill and decode with the Swift engines' own steps; runner.py chooses one."""

from pathlib import Path
from typing import List, Sequence

import numpy as np

from openelm_mlx.errors import OpenELMError

from .package_input import PackageInfo


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

    def rewind(self, n: int):
        """Keep the first n tokens of the cache: the next call writes from position n. The slots past
        n keep stale keys and values, which no call reads before it writes them (every graph attends
        only up to its own last position), so nothing is zeroed: Apple's engines rewind so for
        their prefix cache (reset(to:): CoreAISequentialEngine.swift:415-445,
        CoreAIStaticShapeEngine.swift:583-600)."""
        if not 0 <= n <= self.position:
            raise OpenELMError(f"cannot rewind to token {n}: the cache holds {self.position}")
        self.position = n

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
        logits = self._run(function, self._inputs(tokens))
        self.position += len(tokens)
        return np.asarray(logits, np.float32).reshape(-1)

    def _inputs(self, tokens: List[int]) -> dict:
        """The inputs of one call, in the package's contract (coreml/swift_transformers.py); the Core
        AI engines drive their functions themselves (prefill and decode of coreai/*_engine.py)."""
        raise NotImplementedError

    def _reset_states(self):
        raise NotImplementedError

    def _run(self, function: str, inputs: dict) -> np.ndarray:
        raise NotImplementedError
