"""A Python twin of Apple's sequential LLM engine (apple/coreai-models
`swift/Sources/CoreAILanguageModels/InferenceEngines/CoreAISequentialEngine.swift`, "Sequential"
below), driving a macOS bundle's `main` through Apple's runtime the way the Swift does, step for
step, behind our PackageRunner (prefill, decode, reset). Line numbers are of CAM 86b363dca67c."""

import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from openelm_mlx.errors import OpenELMError

from ..package_input import PackageInfo
from .bundle import Bundle
from .runtime import CoreAIEngine

CHUNK_THRESHOLD = 1024  # ModelConfig.swift:128-138: prompts above it are chunked; COREAI_CHUNK_THRESHOLD overrides
MAX_CHUNK = 512  # ModelConfig.swift:140-143: chunk = min(512, threshold)
INITIAL_CAPACITY = 256  # StateHandlerFactory.swift:152: KV buffers start at min(256, max context)


def env_chunk_threshold() -> int:
    """COREAI_CHUNK_THRESHOLD when a positive integer, else 1024 (ModelConfig.swift:130-137)."""
    value = os.environ.get("COREAI_CHUNK_THRESHOLD", "")
    return int(value) if value.isdigit() and int(value) > 0 else CHUNK_THRESHOLD


class GrowingState:
    """The KV states as GrowingNDArrayState keeps them (StateHandler+NDArray.swift:64-123): with
    exactly 2 states both are KV (StateHandlerFactory.swift:52-55); dynamic dimensions start at
    `capacity` and double (capped at max) when a call needs more. A static dimension (ours: T = the
    context) is never resized: resolvingDynamicDimensions only replaces -1 (:92-93, :113-114), so
    the buffers are full size from the start and growing only copies them whole (copyCache :148-183
    with old length = new length), which the twin skips: the values are the same."""

    def __init__(self, specs: Dict[str, tuple], capacity: int, max_capacity: int):
        from coreai.runtime import NDArray

        self.specs, self.max_capacity = specs, max_capacity
        self.capacity = min(capacity, max_capacity)  # :87
        # Swift does not zero these at init (reset() does, :138-142); Linux storage is not zeroed
        # either, so the twin zeroes them: the graph never reads past P or another layer's heads.
        self.arrays = {name: NDArray(np.zeros(self._shape(shape), dtype)) for name, (shape, dtype) in specs.items()}

    def _shape(self, shape) -> List[int]:
        return [self.capacity if d < 0 else d for d in shape]

    def ensure_capacity(self, needed: int):
        """:99-123. A call past max_capacity fails here in Swift; PackageRunner._check_room has
        already refused it with our message, so this raise is the Swift's, kept for fidelity."""
        from coreai.runtime import NDArray

        if needed <= self.capacity:
            return
        if needed > self.max_capacity:
            raise OpenELMError(f"context length {needed} exceeds the maximum {self.max_capacity}")
        capacity = max(self.capacity, 1)
        while capacity < needed:
            capacity = min(capacity * 2, self.max_capacity)
        self.capacity = capacity
        for name, (shape, dtype) in self.specs.items():
            seq = next((i for i, d in enumerate(shape) if d < 0), None)  # :85: the dynamic dimension
            if seq is None:  # static: the Swift's copy into a buffer of the same shape changes nothing
                continue
            old = self.arrays[name].numpy()
            new = np.zeros(self._shape(shape), dtype)
            index = (slice(None),) * seq + (slice(0, old.shape[seq]),)  # copyCache: the old buffer's length
            new[index] = old[index]
            self.arrays[name] = NDArray(new)

    def reset(self):
        from coreai.runtime import NDArray

        self.arrays = {name: NDArray(np.zeros_like(a.numpy())) for name, a in self.arrays.items()}


class SequentialEngine(CoreAIEngine):
    """`chunk_threshold`: prompts longer than it are run in chunks of min(512, it); default
    COREAI_CHUNK_THRESHOLD or 1024, as the Swift reads it."""

    def __init__(self, bundle: Bundle, info: PackageInfo, chunk_threshold: Optional[int] = None):
        function = bundle.main_functions[0]  # config.function: role "main" (CoreAIRunner.swift:73-88)
        super().__init__(bundle, info, [function])
        self.function = function
        desc = self.functions[function].desc
        self._check(desc)
        # Bound by index, not by name (Sequential:126-129)
        self.input_ids_name, self.position_ids_name = desc.input_names
        self.logits_name = desc.output_names[0]
        self.kv = GrowingState(
            {n: (list(desc.state_descriptor(n).shape), desc.state_descriptor(n).dtype) for n in desc.state_names},
            INITIAL_CAPACITY,
            bundle.max_context_length,  # maxContextLength from metadata (StateHandlerFactory.swift:150-156)
        )
        self.chunk_threshold = chunk_threshold or env_chunk_threshold()
        self.chunk_size = min(MAX_CHUNK, self.chunk_threshold)
        # The load's warmup(queryLength: 1) (ModelResources.swift:168) is a no-op for this engine
        # (InferenceEngine.swift:203-208; only the pipelined and static-shape engines override it).

    def _check(self, desc):
        """The checks the Swift makes at load (Sequential:110-150), one line each."""
        fail = [
            (len(desc.input_names) != 2, f"expected 2 inputs, got {len(desc.input_names)}: {desc.input_names}"),
            (len(desc.output_names) < 1, "expected at least 1 output, got none"),
            (
                not 2 <= len(desc.state_names) <= 4,
                f"expected 2-4 states (KV cache + optional persistent states), got {len(desc.state_names)}",
            ),
        ]
        for bad, why in fail:
            if bad:
                raise OpenELMError(f"{self.bundle.path}: function {self.function}: {why}: re-export the bundle")
        logits = desc.output_descriptor(desc.output_names[0])
        if logits.dtype != "float16":
            raise OpenELMError(f"{self.bundle.path}: only float16 logits are supported, got {logits.dtype}")
        if logits.shape[-1] != self.bundle.vocab_size:  # the runner sizes its logits buffer by vocab_size
            raise OpenELMError(
                f"{self.bundle.path}: language.vocab_size {self.bundle.vocab_size} is not the logits' "
                f"last dimension {logits.shape[-1]}: re-export the bundle"
            )

    def reset(self):
        """internalReset(to: 0) (Sequential:433-440): nothing processed, KV states zeroed."""
        self.position = 0
        self.kv.reset()

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """The uncached prompt tokens (Sequential:624-642): one call, or chunks above the threshold
        (selectPrefillStrategy :211-216, processChunkedPrompt :285-320); the last row's logits."""
        tokens = self._checked(tokens)
        size = self.chunk_size if len(tokens) > self.chunk_threshold else len(tokens)
        for start in range(0, len(tokens), size):
            logits = self._process(tokens[start : start + size])
        return logits[-1]  # lastTokenLogits

    def decode(self, token: int) -> np.ndarray:
        """The sampled token fed back: a batch of one (Sequential:626-634 on the next turn)."""
        return self._process(self._checked([token]))[-1]

    def _process(self, tokens: List[int]) -> np.ndarray:
        """processTokenBatch (Sequential:221-281): capacity for everything so far, input_ids = the
        new tokens, position_ids = 0..P-1 over everything so far, float32 logits [S, vocab]."""
        self.kv.ensure_capacity(self.position + len(tokens))  # :227
        total = self.position + len(tokens)  # :247-250
        inputs = {
            self.input_ids_name: np.array([tokens], np.int32),
            self.position_ids_name: np.arange(total, dtype=np.int32)[None],
        }
        logits = self.run(self.function, inputs, self.kv.arrays)[self.logits_name]  # :260-267
        self.position = total  # :273 processedTokenCount += batchSize
        return np.asarray(logits, np.float32).reshape(len(tokens), -1)
