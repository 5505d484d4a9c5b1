"""The Core AI LanguageBundle folder that Apple's stock LLM runners load
(`CoreAILanguageModel(resourcesAt:)`, llm-runner): written by export-coreai, read back here the way
the Swift loader reads it, so that a bundle the stock runner would refuse is refused here too.

    OUT/metadata.json     metadata_version "0.2", kind "llm", name, assets.main, the language block
    OUT/<name>.aimodel    the model (convert/coreai/export.py)
    OUT/tokenizer/        the tokenizer files (tokenizer.model, and the Hugging Face ones if present)

Layout and keys: Apple's `export/bundle.py:21-74` (writer), `Bundle/ModelBundle.swift:141-198` and
`Bundle/LanguageBundle.swift:35-54`, `Bundle/LanguageConfig.swift:60-69` (reader)."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

from openelm_mlx.errors import OpenELMError
from openelm_mlx.files import read_json

from ..package_input import check_files

METADATA_VERSION = "0.2"  # ModelBundle.swift:178-181 refuses anything else (absent = "0.1")
LANGUAGE_KINDS = ("llm", "vlm")  # LanguageBundle.swift:36-38
# The static-shape contract's output and states (CoreAIStaticShapeEngine.swift:19-21)
LOGITS, KEY_CACHE, VALUE_CACHE = "out_logits", "key_cache", "value_cache"


def bundle_metadata(name: str, tokenizer_id: str, vocab_size: int, context: int) -> dict:
    """metadata.json as Apple's bundle.py:47-69 writes it; function_map role "main" names the
    function the runner calls (CoreAIRunner.swift:73-88), "main" for iOS too, as bundle.py:59
    writes it (the static engine finds its functions by name)."""
    return {
        "metadata_version": METADATA_VERSION,
        "kind": "llm",
        "name": name,
        "assets": {"main": f"{name}.aimodel"},
        "language": {
            "tokenizer": tokenizer_id,
            "vocab_size": vocab_size,
            "max_context_length": context,
            "embedded_tokenizer": True,
            "function_map": {"main": ["main"]},
        },
        "source": {"model_definition": "openelm-mlx", "hf_model_id": tokenizer_id},
    }


@dataclass
class Bundle:
    """A LanguageBundle as the Swift loader sees it."""

    path: Path
    name: str
    asset: Path  # the .aimodel, inside the bundle
    tokenizer_id: str
    vocab_size: int
    max_context_length: int
    embedded_tokenizer: bool
    function_map: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def tokenizer_folder(self) -> Path:
        return self.path / "tokenizer"

    @property
    def main_functions(self) -> List[str]:
        """The functions of role "main" (CoreAIRunner.swift:73-88: default ["main"])."""
        return self.function_map.get("main") or ["main"]


def _field(meta: dict, key: str, kind, where: str = ""):
    value = meta.get(key) if isinstance(meta, dict) else None
    # JSON booleans are not integers to Swift's decoder
    if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        name = f"{where}{key}"
        problem = "is missing" if value is None else f"must be {kind.__name__ if kind is not dict else 'an object'}"
        raise OpenELMError(f"{name} {problem}")
    return value


def read_bundle(path) -> Bundle:
    """metadata.json read as Swift does, each missing or wrong piece one line naming it."""
    path = Path(path)
    if path.suffix.lower() in (".aimodel", ".aimodelc"):  # ModelBundle.swift:148-151
        raise OpenELMError(
            f"{path} is the model inside a bundle: give the bundle folder that holds it and metadata.json"
        )
    if not os.path.lexists(path / "metadata.json"):  # anything else there: read_json names it
        raise OpenELMError(
            f"{path} is not a Core AI bundle (no metadata.json): export one with `openelm export-coreai`"
        )
    check_files(path)  # a FIFO or a device anywhere in the bundle: refused before anything reads
    meta = read_json(path / "metadata.json")
    try:
        return _parse(path, meta)
    except OpenELMError as e:
        raise OpenELMError(f"{path}/metadata.json: {e}: re-export the bundle") from None


def _parse(path: Path, meta) -> Bundle:
    if not isinstance(meta, dict):
        raise OpenELMError("not a JSON object")
    version = meta.get("metadata_version", "0.1")
    if version != METADATA_VERSION:
        raise OpenELMError(f"metadata_version {version!r} is not supported (Apple's runners read {METADATA_VERSION!r})")
    kind = _field(meta, "kind", str)
    if kind not in LANGUAGE_KINDS:
        raise OpenELMError(f"kind {kind!r} is not a language model ({' or '.join(LANGUAGE_KINDS)})")
    name = _field(meta, "name", str)
    main = _field(_field(meta, "assets", dict), "main", str, "assets.")
    asset = (path / main).resolve()
    if not asset.is_relative_to(path.resolve()):
        raise OpenELMError(f"assets.main {main!r} points outside the bundle")
    if not asset.is_dir():
        raise OpenELMError(f"assets.main {main!r} does not exist in the bundle")
    language = _field(meta, "language", dict)
    function_map = language.get("function_map") or {}
    if not isinstance(function_map, dict) or not all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in function_map.values()
    ):
        raise OpenELMError("language.function_map must map roles to lists of function names")
    embedded = language.get("embedded_tokenizer", True)
    if not isinstance(embedded, bool):
        raise OpenELMError("language.embedded_tokenizer must be true or false")
    return Bundle(
        path,
        name,
        asset,
        _field(language, "tokenizer", str, "language."),
        _field(language, "vocab_size", int, "language."),
        _field(language, "max_context_length", int, "language."),
        embedded,
        function_map,
    )


def engine_kind(function_names: List[str]) -> str:
    """Which stock engine drives a model (ModelStructure.swift:240-268, EngineFactory.swift:138-149):
    a function starting `extend` and one named `load_embeddings`: the static-shape engine;
    otherwise the dynamic one (this project's twin of it: the sequential engine)."""
    if any(n.startswith("extend") for n in function_names) and "load_embeddings" in function_names:
        return "static"
    return "sequential"


def check_static_functions(bundle: Bundle, function_names: List[str]):
    """The static-shape engine needs an extend function at the full context
    (CoreAIStaticShapeEngine.swift:94-105): extend_<max_context_length>_<q>."""
    prefix = f"extend_{bundle.max_context_length}_"
    if not any(n.startswith(prefix) for n in function_names):
        raise OpenELMError(
            f"{bundle.path}: no {prefix}* function for language.max_context_length {bundle.max_context_length} "
            f"(functions: {', '.join(function_names)}): re-export the bundle"
        )


def write_metadata(folder: Path, metadata: dict):
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
