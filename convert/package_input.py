"""An exported package read back as input: its `openelm.*` metadata (PackageInfo, every field
checked before anything sizes a buffer or indexes the vocabulary by it), the metadata held to the
program (check_graph), every file of the package a regular one (check_files), and the tokenizer a
package runs with, held to its vocabulary (package_tokenizer). The runners (coreml/
swift_transformers.py, coreai/runtime.py) and verify read packages through these; docs/packages.md
lists which check guards each field and file."""

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from openelm_mlx.config import OpenELMConfig
from openelm_mlx.errors import OpenELMError
from openelm_mlx.files import each, field_problem, integer, obj, one_of, parse_json, read_json, regular_file, text
from openelm_mlx.tokenizer import MAX_TOKENIZER_BYTES, Tokenizer, find_tokenizer

from .compression import IOS_PRESET
from .package import COMPUTE_DTYPES

# What each openelm.* key may hold (all are strings in the package; numbers and lists are decoded
# first): a package is input, and a field that would size a buffer or index the vocabulary is
# checked before anything uses it. Exponents: FFN scales 2**-k, 0 for most models, under 20 measured.
PACKAGE_FIELDS = {
    "openelm.context_length": integer(1, 1 << 31),
    "openelm.prefill_length": integer(1, 1 << 31),
    "openelm.vocab_size": integer(1, 1 << 20),  # config.json's vocab_size range
    "openelm.bos_token_id": integer(0, 1 << 20),
    "openelm.eos_token_id": integer(0, 1 << 20),
    "openelm.compression": one_of("none", "int8", "int4", "palettize4", "palettize6", IOS_PRESET),
    "openelm.block_size": integer(0, 1 << 16),
    "openelm.compute_precision": one_of(*COMPUTE_DTYPES),
    "openelm.ffn_scale_exponents": each(integer(0, 64)),
    "openelm.source_model": text,
    "openelm.chat_template": text,
    "openelm.config": obj,
    "openelm.target": one_of("macos", "ios"),
}
NUMERIC = {"openelm.context_length", "openelm.prefill_length", "openelm.vocab_size", "openelm.bos_token_id"}
NUMERIC |= {"openelm.eos_token_id", "openelm.block_size"}
DECODED = {"openelm.ffn_scale_exponents", "openelm.config"}  # JSON inside the string


@dataclass
class PackageInfo:
    """The openelm.* metadata of an exported package, read back (PackageDescription.metadata)."""

    context: int
    prefill_length: int
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    compression: str
    block_size: int  # int8 and int4 (compression.BLOCKWISE), else 0
    compute_precision: str
    ffn_scale_exponents: List[int]
    source_model: str
    chat_template: str
    config: dict
    target: str = "macos"  # absent before iOS bundles existed, and in Core ML packages

    @classmethod
    def from_metadata(cls, meta, package, command: str) -> "PackageInfo":
        """Each field decoded and held to PACKAGE_FIELDS, then to the others (prefill within the
        context, special ids within the vocabulary, the config's own sizes): one line naming the
        field, else a PackageInfo every runner can trust."""

        def fail(why):
            raise OpenELMError(f"{package}: {why}: re-export it with `openelm {command}`") from None

        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            fail("its metadata is not a map of strings")
        values = {"openelm.target": "macos", "openelm.block_size": "0"}
        for key in PACKAGE_FIELDS:
            if key not in meta and key not in values:
                fail(f"metadata key '{key}' is missing (not an openelm package?)")
            raw = meta.get(key, values.get(key))
            if key in NUMERIC:
                raw = raw or ("0" if key == "openelm.block_size" else "")  # "" when not int4
                raw = int(raw) if re.fullmatch(r"-?\d{1,20}", raw) else raw
            elif key in DECODED:
                raw = parse_json(
                    raw.encode(), f"{package}: metadata key '{key}'", f"re-export it with `openelm {command}`"
                )
            values[key] = raw
        problem = field_problem(values, PACKAGE_FIELDS)
        if problem:
            fail(f"metadata {problem}")
        info = cls(*(values[key] for key in PACKAGE_FIELDS))
        try:
            config = OpenELMConfig.from_dict(info.config, "metadata key 'openelm.config'")
        except OpenELMError as e:
            fail(str(e))
        for bad, why in (
            (info.prefill_length > info.context, f"prefill_length {info.prefill_length} exceeds the context"),
            (max(info.bos_token_id, info.eos_token_id) >= info.vocab_size, "a special token id is past the vocabulary"),
            (config.vocab_size != info.vocab_size, f"the config's vocab_size is {config.vocab_size}"),
            (
                info.context > config.max_context_length,
                f"the config's max_context_length is {config.max_context_length}",
            ),
            (
                len(info.ffn_scale_exponents) != config.num_transformer_layers,
                f"{len(info.ffn_scale_exponents)} FFN scale exponents for {config.num_transformer_layers} layers",
            ),
        ):
            if bad:
                fail(
                    f"its metadata disagrees with itself ({why}; context {info.context}, vocab_size {info.vocab_size})"
                )
        return info


def check_graph(info: PackageInfo, package, command: str, contexts, vocab_sizes):
    """The metadata against the program, as each package reader finds it: `contexts`, the KV
    caches' lengths (the largest must be the context every runner sizes its checks by), and
    `vocab_sizes`, the logits' last dimensions (each must be the vocabulary a runner indexes).
    None found: a program without that contract, which the runner's own checks refuse by name."""
    contexts, vocab_sizes = [c for c in contexts if c], [v for v in vocab_sizes if v]
    for what, found, claimed in (
        ("KV-cache length", contexts, info.context),
        ("logits size", vocab_sizes, info.vocab_size),
    ):
        if found and (max(found) != claimed or (what == "logits size" and min(found) != claimed)):
            raise OpenELMError(
                f"{package}: its metadata says {claimed} ({'context' if 'KV' in what else 'vocab_size'}) but the "
                f"program's {what} is {max(found)}: re-export it with `openelm {command}`"
            )


def check_files(folder: Path):
    """Every entry of a package folder a folder or a regular file (links followed): a FIFO would
    hang a reader, a device never ends; refused by stat, nothing opened."""
    for parent, folders, files in os.walk(folder):
        for name in files + [f for f in folders if os.path.islink(os.path.join(parent, f))]:
            regular_file(Path(parent) / name)


def check_tokenizer(tokenizer: Tokenizer, info: PackageInfo, package):
    """The tokenizer a package is run with must have the package's vocabulary: a larger one feeds
    ids past the embedding, a smaller one cannot decode what the package samples."""
    if tokenizer.vocab_size != info.vocab_size:
        raise OpenELMError(
            f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but {package} has a vocabulary of "
            f"{info.vocab_size}: re-export the package, or pass its tokenizer with --tokenizer"
        )


def check_tokenizer_folder(folder: Path, info: PackageInfo, package):
    """The Hugging Face files the Swift runners read from a package's tokenizer folder: strict
    JSON objects, tokenizer.json's vocabulary the package's size."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = folder / name
        if not os.path.lexists(path):
            continue
        data = read_json(path, MAX_TOKENIZER_BYTES, "re-export the package")
        vocab = data.get("model", {}).get("vocab") if name == "tokenizer.json" and isinstance(data, dict) else None
        if not isinstance(data, dict) or (name == "tokenizer.json" and not isinstance(vocab, (dict, list))):
            raise OpenELMError(f"{path} is not a Hugging Face tokenizer file: re-export the package")
        if vocab is not None and len(vocab) != info.vocab_size:
            raise OpenELMError(
                f"{path} has {len(vocab)} pieces but {package} has a vocabulary of {info.vocab_size}: re-export the package"
            )


def tokenizer_folder(package) -> Path:
    """OUT.mlpackage -> OUT.tokenizer/, the tokenizer folder written beside a Core ML package: not
    OUT/ (a Core AI bundle's name) nor OUT.tokenizer.model (older exports'), so they never collide."""
    package = Path(package)
    return package.with_name(package.stem + ".tokenizer")


def tokenizer_path(package) -> Path:
    """The sentencepiece model written beside a package: OUT.tokenizer/tokenizer.model beside
    OUT.mlpackage, OUT.tokenizer.model beside OUT.aimodel."""
    package = Path(package)
    if package.suffix == ".mlpackage":
        return tokenizer_folder(package) / "tokenizer.model"
    return package.with_name(package.stem + ".tokenizer.model")


def package_tokenizer(package, info: PackageInfo, tokenizer=None, beside: Optional[Path] = None) -> Tokenizer:
    """The tokenizer a package runs with: `tokenizer` (--tokenizer), else the one the exporter
    wrote (`beside`, default tokenizer_path(package)) with the folder it is in, each checked
    against the package's vocabulary."""
    beside = Path(beside or tokenizer_path(package))
    if tokenizer is None and beside.parent.name.endswith("tokenizer"):
        check_tokenizer_folder(beside.parent, info, package)
    found = find_tokenizer(None, tokenizer or (beside if os.path.lexists(beside) else None))
    check_tokenizer(found, info, package)
    return found
