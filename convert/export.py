"""The export flow both exporters share, written once (`export-coreml`, `export-coreai`):

1. the exporter checks its own arguments (options, target, the output's name): nothing is read yet;
2. the optional extra it needs is there, or its install hint is the error (package.installed;
   imported at step 6, package.require: coremltools takes ~4 s, a mistake in the input is said first);
3. every place it writes is checked before any work (outputs.check_output);
4. the model is described: loaded, checked, calibrated, compressed (package.describe);
5. the tokenizer files are built: an unusable tokenizer is refused before anything is written;
6. the places are staged; the format's `write` builds the program and fills them;
7. they are moved into place together, or nothing is (outputs.staged_outputs);
8. the summary: sizes, KV-cache memory, seconds.

export_package runs steps 2 to 8; a Format holds what each exporter does its own way."""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

from openelm_mlx import outputs
from openelm_mlx.hf_tokenizer import hf_tokenizer_files
from openelm_mlx.progress import progress_bar, ticking, within
from openelm_mlx.tokenizer import Tokenizer, is_instruct_model

from .package import PackageDescription, describe, installed, require


@dataclass
class Format:
    """What one exporter does its own way."""

    command: str  # "export-coreml": the progress bar's label
    extra: Tuple[str, str]  # the module it needs, and the pip extra that installs it
    compressions: Tuple[str, ...]
    # write(description, tokenizer, tokenizer files, staged places, progress bar): build the
    # program and write the package and the tokenizer files into the staged places (two bar steps).
    write: Callable[[PackageDescription, Tokenizer, Dict[str, bytes], List[Path], object], None]


def export_package(
    fmt: Format,
    model_source,
    places: List[Path],
    context,
    compress: str,
    block_size: int,
    compute_precision: str,
    target: str,
    force: bool,
    tokenizer,
    progress: bool,
) -> dict:
    """Export `model_source` into `places` (the package first, then anything written beside it)
    with `fmt`'s steps; returns the summary of the package (export_summary)."""
    installed(*fmt.extra)
    start = time.perf_counter()
    for place in places:
        outputs.check_output(place, force)
    bar = progress_bar(total=3, show=progress, desc=fmt.command, unit="step")
    with bar, ticking(bar):  # each step is one long call or several: the clock shows it is alive
        bar.set_postfix_str("load, calibrate, compress")
        desc, folder, tok = describe(
            model_source,
            context,
            compress,
            block_size,
            compute_precision,
            fmt.compressions,
            tokenizer,
            target,
            lambda text: within(bar, text),
        )
        files = tokenizer_files(tok, is_instruct_model(desc.source, folder), desc.context)  # may refuse: first
        bar.update()
        require(*fmt.extra)  # imported once the input has passed its checks
        with outputs.staged_outputs(places, force, reads=[folder, tok.path]) as staged:
            fmt.write(desc, tok, files, staged, bar)
    return export_summary(desc, places[0], time.perf_counter() - start)


def tokenizer_files(tok: Tokenizer, instruct: bool, context: int) -> Dict[str, bytes]:
    """The tokenizer folder both exports ship (Core ML: OUT.tokenizer/, Core AI: the bundle's
    tokenizer/): tokenizer.json and tokenizer_config.json (+ chat_template.jinja for an Instruct
    model) for the Swift runners, and tokenizer.model for our own loading (sentencepiece)."""
    return hf_tokenizer_files(tok, instruct, context) | {"tokenizer.model": tok.data}


def write_files(folder: Path, files: Dict[str, bytes]):
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)


def package_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def kv_bytes(desc: PackageDescription) -> dict:
    """KV-cache memory at the full context: both packages keep one pair padded to the largest
    layer's kv heads, against what per-layer states would hold."""
    itemsize = 2 if desc.target == "ios" else np.dtype(desc.compute_dtype).itemsize  # iOS caches: float16
    per_head = 2 * desc.context * desc.config.head_dim * itemsize  # K and V
    heads = [layer.kv_heads for layer in desc.layers]
    return {"kv_bytes": len(heads) * max(heads) * per_head, "kv_bytes_unpadded": sum(heads) * per_head}


def export_summary(desc: PackageDescription, output: Path, seconds: float) -> dict:
    size, n_params = package_size(output), desc.config.num_parameters()
    return {
        "output": str(output),
        "target": desc.target,
        "compression": desc.compression,
        "compute_precision": desc.compute_precision,
        "context": desc.context,
        "prefill_length": desc.prefill_length,
        "ffn_scale_exponents": [layer.ffn_scale_exponent for layer in desc.layers],
        "bytes": size,
        "parameters": n_params,
        "bytes_per_parameter": size / n_params,
        **kv_bytes(desc),
        "seconds": seconds,
    }
