"""Token-level runner of an exported package: Core ML itself (macOS 15+) or the numpy MIL
executor (anywhere, slow, for checking). Feeds long prompts as successive prefill blocks and
keeps the cache position, the only thing besides tokens that the package's functions take."""

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from openelm_mlx.errors import OpenELMError

BACKENDS = ("coreml", "mil-reference")


@dataclass
class PackageInfo:
    """What coreml_export recorded in the package's metadata."""

    context: int
    prefill_length: int
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    compression: str
    block_size: int  # int4 only, else 0
    source_model: str
    chat_template: str
    config: dict


def package_info(package) -> PackageInfo:
    import coremltools as ct

    package = Path(package)
    if not (package / "Manifest.json").is_file():
        raise OpenELMError(f"{package} is not a Core ML package (no Manifest.json): pass the .mlpackage folder")
    try:
        meta = dict(ct.models.MLModel(str(package), skip_model_load=True).get_spec().description.metadata.userDefined)
        return PackageInfo(
            context=int(meta["openelm.context_length"]),
            prefill_length=int(meta["openelm.prefill_length"]),
            vocab_size=int(meta["openelm.vocab_size"]),
            bos_token_id=int(meta["openelm.bos_token_id"]),
            eos_token_id=int(meta["openelm.eos_token_id"]),
            compression=meta["openelm.compression"],
            block_size=int(meta["openelm.block_size"] or 0),
            source_model=meta["openelm.source_model"],
            chat_template=meta["openelm.chat_template"],
            config=json.loads(meta["openelm.config"]),
        )
    except (KeyError, ValueError) as e:
        raise OpenELMError(f"{package} has no openelm metadata ({e}): export it with `openelm export-coreml`") from None
    except Exception as e:  # a spec that protobuf cannot parse
        raise OpenELMError(f"{package} cannot be read ({type(e).__name__}: {e}): re-export it") from None


def package_tokenizer(package, tokenizer=None):
    """The tokenizer written beside the package by export-coreml (OUT.tokenizer.model), or `tokenizer`."""
    from openelm_mlx.tokenizer import find_tokenizer

    from .coreml_export import tokenizer_path

    beside = tokenizer_path(package)
    return find_tokenizer(None, tokenizer or (beside if beside.is_file() else None))


class CoreMLRunner:
    """`prefill(tokens)` then `decode(token)` repeatedly; each returns float32 logits [vocab] for
    the next token. `reset()` starts a new sequence (fresh, zeroed KV-cache states)."""

    def __init__(self, package, backend: str = "coreml"):
        if backend not in BACKENDS:
            raise OpenELMError(f"unknown backend '{backend}': choose one of {', '.join(BACKENDS)}")
        self.package = Path(package)
        self.backend = backend
        self.info = package_info(package)
        self.executor = None  # the MIL executor of the mil-reference backend
        if backend == "coreml":
            if sys.platform != "darwin":
                raise OpenELMError(
                    "the coreml backend needs macOS 15+ (Core ML); use --backend mil-reference elsewhere"
                )
            import coremltools as ct

            self._models = {
                f: ct.models.MLModel(str(self.package), function_name=f, compute_units=ct.ComputeUnit.CPU_AND_GPU)
                for f in ("prefill", "decode")
            }
        else:
            from .mil_executor import MILExecutor

            self.executor = MILExecutor(self.package)
        self.reset()

    def reset(self):
        self.position = 0
        if self.backend == "coreml":
            self._state = self._models["prefill"].make_state()  # one state serves both functions
        else:
            self._state = self.executor.make_state("prefill")

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
        if self.backend == "coreml":
            out = self._models[function].predict(inputs, state=self._state)
        else:
            out = self.executor.run(function, inputs, self._state)
        self.position += len(tokens)
        return np.asarray(out["logits"], np.float32).reshape(-1)
