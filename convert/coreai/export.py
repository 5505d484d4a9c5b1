"""`openelm export-coreai`: a Core AI LanguageBundle (OS 27) that Apple's stock LLM runners load
(`CoreAILanguageModel(resourcesAt:)`), built with coreai.authoring (no PyTorch).

The steps, one function each: describe the model (package.describe: load, check, calibrate,
compress), build the target's functions into one module (graph.py for macOS, ios_graph.py for
iOS), save the model with its asset metadata, the tokenizer and metadata.json into a staged
folder (bundle.py) and move it into place (outputs.staged_output)."""

import time
from pathlib import Path
from typing import Optional

import numpy as np

from openelm_mlx import outputs
from openelm_mlx.errors import OpenELMError
from openelm_mlx.progress import progress_bar, ticking, within
from openelm_mlx.tokenizer import find_tokenizer, is_instruct_model

from ..compression import IOS_PRESET
from ..package import (
    COMPUTE_DTYPES,
    PackageDescription,
    add_export_arguments,
    check_export_options,
    describe,
    export_from_args,
    package_size,
    require,
    tokenizer_files,
    write_files,
)
from .bundle import bundle_metadata, write_metadata

COMPRESSIONS = ("none", "int8", "int4", "palettize4", IOS_PRESET)
TARGETS = ("macos", "ios")
AUTHOR = "Apple (OpenELM); exported by openelm-mlx"
LICENSE = "apple-sample-code-license (the OpenELM weights' license; see the source model)"


def export_coreai(
    model_source,
    output,
    target: str = "macos",
    context: Optional[int] = None,
    compress: str = "none",
    block_size: int = 32,
    compute_precision: str = "float16",
    force: bool = False,
    tokenizer=None,
    progress: bool = False,
    static_shapes=None,
) -> dict:
    """Export `model_source` (anything openelm_mlx.load accepts) to the bundle folder OUTPUT.
    `static_shapes` (iOS): an ios_graph.StaticShapes ladder instead of Apple's (tests use small ones).
    Returns a summary (sizes, KV memory, seconds)."""
    if target not in TARGETS:
        raise OpenELMError(f"unknown target '{target}': choose {' or '.join(TARGETS)}")
    check_export_options(context, block_size)
    require("coreai.authoring", "coreai")
    start = time.perf_counter()
    output = check_bundle_output(output, force)
    bar = progress_bar(total=3, show=progress, desc="export-coreai", unit="step")
    with bar, ticking(bar):  # each step is one long call or several: the clock shows it is alive
        bar.set_postfix_str("load, calibrate, compress")
        desc, folder = describe(
            model_source,
            context,
            compress,
            block_size,
            compute_precision,
            COMPRESSIONS,
            tokenizer,
            target,
            lambda text: within(bar, text),
        )
        tok = find_tokenizer(folder, tokenizer)
        files = tokenizer_files(tok, is_instruct_model(desc.source, folder), desc.context)  # may refuse: first
        bar.update()
        with outputs.staged_output(output, force, reads=[folder, tok.path]) as staged:
            bar.set_postfix_str(f"build the {target} program")
            program = build_program(desc, static_shapes)
            bar.update()
            bar.set_postfix_str("write")
            staged.mkdir()
            save(program, desc, tok, staged / f"{output.name}.aimodel")
            write_files(staged / "tokenizer", files)
            write_metadata(staged, bundle_metadata(output.name, desc.source, desc.config.vocab_size, desc.context))
            bar.update()
    return export_summary(desc, output, time.perf_counter() - start)


def check_bundle_output(output, force: bool) -> Path:
    """A bundle is a folder of any name; an .aimodel name is the file inside one, which the stock
    runners refuse to be handed (ModelBundle.swift:148-151), so it is refused here before any work."""
    output = Path(output)
    if output.suffix.lower() in (".aimodel", ".aimodelc"):
        raise OpenELMError(
            f"-o {output} names a model file, but export-coreai writes a bundle folder: "
            f"use -o {output.with_suffix('')} (it will hold {output.stem}.aimodel, metadata.json and tokenizer/)"
        )
    outputs.check_output(output, force)
    return output


def build_program(desc: PackageDescription, static_shapes=None):
    """The AIProgram of desc.target's contract."""
    from coreai.authoring import AIProgram, Module

    module = Module.create()
    with module:  # leaving the block runs coreai's pre-compilation rewrite
        if desc.target == "macos":
            from .graph import build_main

            build_main(desc)
        else:
            from .ios_graph import StaticShapes, build_functions

            build_functions(desc, static_shapes or StaticShapes.ladder(desc.context))
    return AIProgram(module)


def save(program, desc: PackageDescription, tok, path: Path):
    """The model with Apple's asset metadata (export/metadata.py:189-224: author, license,
    description, creation date) and our openelm.* facts (PackageInfo reads them back)."""
    from coreai.runtime import AIModelAssetMetadata

    meta = AIModelAssetMetadata()
    meta.author = AUTHOR
    meta.license = LICENSE
    meta.model_description = (
        f"OpenELM causal language model ({desc.source}, {desc.compression}, {desc.compute_precision} compute) "
        "for Apple's LLM runners: "
        + (
            "static shapes (load_embeddings, gather_embeddings_<q>, extend_<ctx>_<q>, prompt_opt_<ctx>_<q>), "
            "states key_cache/value_cache, float16 logits"
            if desc.target == "ios"
            else "function main, states keyCache/valueCache, float16 logits"
        )
    )
    meta.creation_date = int(time.time())
    for key, value in desc.metadata(tok).items():
        meta.set_custom(key, value)
    program.save_asset(path, metadata=meta)


def kv_bytes(desc: PackageDescription) -> dict:
    """KV-cache memory at the full context: the shared pair padded to the largest layer's heads,
    against what per-layer states would hold."""
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
        "ffn_scale_exponents": [layer.ffn_scale_exponent for layer in desc.layers],
        "bytes": size,
        "parameters": n_params,
        "bytes_per_parameter": size / n_params,
        **kv_bytes(desc),
        "seconds": seconds,
    }


def summary_line(s: dict) -> str:
    return (
        f"wrote {s['output']}/ ({s['target']}: {s['bytes'] / 2**20:.1f} MiB, {s['bytes_per_parameter']:.3f} "
        f"bytes/parameter, {s['compression']}, {s['compute_precision']} compute; KV cache at {s['context']} tokens "
        f"{s['kv_bytes'] / 2**20:.1f} MiB, {s['kv_bytes_unpadded'] / 2**20:.1f} MiB unpadded) in {s['seconds']:.1f} s"
    )


def add_arguments(parser):
    add_export_arguments(parser, "", COMPRESSIONS, output_help="OUT, the bundle folder (any name; not OUT.aimodel)")
    parser.add_argument(
        "--target",
        choices=TARGETS,
        default="macos",
        help="macos (default): one dynamic function `main` for the GPU engines; ios: static shapes for the "
        "Neural Engine",
    )
    parser.add_argument(
        "--compute-precision",
        choices=list(COMPUTE_DTYPES),
        default="float16",
        help="matmuls, attention and KV cache (default float16, for devices; float32 for checking large models "
        "with Apple's Linux runtime, where float16 runs ~300x slower). Residual stream, norms and RoPE are float32 "
        "either way; logits are float16 (the stock engines read float16)",
    )


def main(args):
    export_from_args(export_coreai, args, summary_line, target=args.target, compute_precision=args.compute_precision)
