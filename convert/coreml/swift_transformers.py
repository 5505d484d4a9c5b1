"""A Python twin of swift-transformers' Core ML generation (huggingface/swift-transformers 1.3.3,
`Sources/Models/LanguageModel.swift`, `Sources/Generation/Generation.swift`), so that what an app
does with an exported package is run and checked here: by Core ML itself (macOS 15+) or by the
numpy MIL executor (anywhere, slow), behind the shared PackageRunner."""

import os
import sys
from pathlib import Path
from typing import Callable, List, Sequence

import numpy as np

from openelm_mlx.errors import OpenELMError
from openelm_mlx.files import read_json

from ..package import require
from ..package_input import PackageInfo, check_files, check_graph, tokenizer_folder
from ..package_runner import PackageRunner
from .executor import MILExecutor


def package_info(package) -> PackageInfo:
    """The openelm.* metadata of a .mlpackage, every file of it a regular one (check_files) and
    Manifest.json strict JSON before coremltools reads anything, held to the KV-cache states of
    the spec (keyCache: [layers, 1, kv heads, context, head dim]) and to the logits' width."""
    package = Path(package)
    if not os.path.lexists(package / "Manifest.json"):
        raise OpenELMError(f"{package} is not a Core ML package (no Manifest.json): pass the .mlpackage folder")
    for folder in (package, tokenizer_folder(package)):  # the tokenizer beside it too: before any slow import
        check_files(folder)
    if not isinstance(read_json(package / "Manifest.json", fix="re-export it"), dict):
        raise OpenELMError(f"{package}/Manifest.json is not a JSON object: re-export it")
    ct = require("coremltools", "coreml")
    try:
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    except Exception as e:  # a spec that protobuf cannot parse
        raise OpenELMError(f"{package} cannot be read ({type(e).__name__}: {e}): re-export it") from None
    info = PackageInfo.from_metadata(dict(spec.description.metadata.userDefined), package, "export-coreml")
    contexts = [list(s.type.stateType.arrayType.shape)[-2:-1] for s in spec.description.state]
    check_graph(info, package, "export-coreml", [c[0] for c in contexts if c], logits_sizes(spec))
    return info


def logits_sizes(spec) -> List[int]:
    """The last dimension of `logits` as the program's op declares it ([1, q, vocab]; the spec's
    output description carries no shape for a ranged input): what swift-transformers' scores are
    indexed by. None found: a program without that output, which _run refuses by name."""
    function = spec.mlProgram.functions.get("main") if spec.HasField("mlProgram") else None
    block = function.block_specializations.get(function.opset) if function is not None else None
    if block is None or "logits" not in block.outputs:
        return []
    return [
        dims[-1].constant.size
        for op in block.operations
        for output in op.outputs
        if output.name == "logits" and (dims := output.type.tensorType.dimensions) and dims[-1].HasField("constant")
    ]


def swift_inputs(input_ids: Sequence[int], token_count: int) -> dict:
    """What LanguageModelWithStatefulKVCache.predictNextTokenScores sends: `inputIds` [1, q] (all
    prompt ids in the first call after resetState, then the last id only: LanguageModel.swift:524-529)
    and `causalMask`, zeros float16 [1, 1, 1, tokenCount + 1], tokenCount = tokens so far counting
    inputIds (LanguageModel.swift:516,543-547)."""
    return {
        "inputIds": np.array([list(input_ids)], np.int32),
        "causalMask": np.zeros((1, 1, 1, token_count + 1), np.float16),
    }


class CoreMLRunner(PackageRunner):
    """LanguageModelWithStatefulKVCache (LanguageModel.swift:485-563) as a PackageRunner:
    `reset()` is resetState() (a fresh zero state, :506-509), `prefill(tokens)` one call with all
    of them (the context is the package's prefill length), `decode(token)` one call with one token;
    each returns the last row of `logits` [1, q, vocab] as float32 (:554-561)."""

    def __init__(self, package, backend: str = "coreml"):
        super().__init__(package, package_info(package))
        self.backend = backend
        self.executor = None  # the MIL executor of the mil-reference backend
        if backend == "coreml":
            if sys.platform != "darwin":
                raise OpenELMError(
                    "the coreml backend needs macOS 15+ (Core ML); use --backend mil-reference elsewhere"
                )
            import coremltools as ct

            # loadCompiled's default compute units (LanguageModel.swift:164)
            self._model = ct.models.MLModel(str(self.package), compute_units=ct.ComputeUnit.CPU_AND_GPU)
        else:
            self.executor = MILExecutor(self.package)
        self.reset()

    def _reset_states(self):
        if self.backend == "coreml":
            self._state = self._model.make_state()
        else:
            self._state = self.executor.make_state("main")

    def _inputs(self, tokens: List[int]) -> dict:
        return swift_inputs(tokens, self.position + len(tokens))

    def _run(self, function: str, inputs: dict) -> np.ndarray:
        if self.backend == "coreml":
            logits = self._model.predict(inputs, state=self._state)["logits"]
        else:
            logits = self.executor.run("main", inputs, self._state)["logits"]
        if logits.ndim != 3 or logits.shape[1] != inputs["inputIds"].shape[1]:
            raise OpenELMError(
                f"{self.package}: logits of shape {logits.shape}, swift-transformers needs [1, q, vocab]"
            )
        if logits.shape[-1] != self.info.vocab_size:
            raise OpenELMError(
                f"{self.package}: logits of {logits.shape[-1]} tokens, its metadata says vocab_size "
                f"{self.info.vocab_size}: re-export it"
            )
        return logits[0, -1]


def greedy(scores: np.ndarray) -> int:
    """selectNextTokenUsingGreedyDecoding: the argmax (Generation.swift:90-91)."""
    return int(np.argmax(scores))


def sampler(temperature: float = 1.0, top_k: int = 50, seed=None) -> Callable[[np.ndarray], int]:
    """doSample: the temperature and top-k warpers (Generation.swift:126-138; TopKLogitsWarper.swift
    keeps scores >= the k-th largest), then selectNextTokenUsingSampling: softmax and the first
    index whose cumulative probability reaches a uniform draw (Decoders.swift:23-55). Top-p, min-p
    and the repetition penalty are not mirrored."""
    rng = np.random.default_rng(seed)

    def select(scores: np.ndarray) -> int:
        scores = np.asarray(scores, np.float32)
        if temperature > 0 and temperature != 1.0:
            scores = scores / np.float32(temperature)
        if 0 < top_k < scores.size:
            scores = np.where(scores >= np.sort(scores)[-top_k], scores, -np.inf)
        probs = np.exp(scores - scores.max())
        cdf = np.cumsum(probs / probs.sum())
        return int(min(np.searchsorted(cdf, rng.random()), cdf.size - 1))

    return select


def generate(
    runner: PackageRunner,
    tokens: Sequence[int],
    max_new_tokens: int,
    eos_token_id: int,
    select: Callable[[np.ndarray], int] = greedy,
) -> List[int]:
    """TextGenerationModel.generate (LanguageModelTypes.swift:106-117) and Generation.generate
    (Generation.swift:65-109, 185-186) over `runner`: the prompt and the new tokens, without eos.
    `select` picks a token from float32 scores on the CPU (greedy, or a sampler)."""
    runner.reset()  # resetState() before each sequence (LanguageModelTypes.swift:108)
    output = [int(t) for t in tokens]
    max_length = len(output) + max_new_tokens  # maxLength = maxNewTokens + tokens.count (Generation.swift:185)
    scores = None
    while len(output) < max_length:  # Generation.swift:80
        # prefilling: every token in one call, then extending: the last one (LanguageModel.swift:524-529)
        scores = runner.prefill(output) if scores is None else runner.decode(output[-1])
        token = select(scores)
        if token == eos_token_id:  # Generation.swift:98-100: eos ends the loop and is not appended
            break
        output.append(token)  # Generation.swift:102
    return output
