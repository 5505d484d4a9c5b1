"""`openelm export-coreai`: one Core AI model (OS 27) with `prefill` and `decode` over one copy of
the weights and per-layer KV-cache states, built with coreai.authoring (no PyTorch).

The steps, one function each: describe the model (package.describe: load, check, calibrate,
compress), build both functions into one module (graph.py), save it with the openelm.* metadata
beside the output and move it into place (package.staged_package)."""

import time
from typing import Optional

from openelm_mlx.progress import progress_bar
from openelm_mlx.tokenizer import find_tokenizer

from ..package import (
    COMPUTE_DTYPES,
    FUNCTIONS,
    PackageDescription,
    add_export_arguments,
    check_export_options,
    check_output,
    describe,
    export_from_args,
    export_summary,
    require,
    staged_package,
)

COMPRESSIONS = ("none", "int8", "int4", "palettize4")


def export_coreai(
    model_source,
    output,
    context: Optional[int] = None,
    prefill_length: int = 128,
    compress: str = "none",
    block_size: int = 32,
    compute_precision: str = "float16",
    force: bool = False,
    tokenizer=None,
    progress: bool = False,
) -> dict:
    """Export `model_source` (anything openelm_mlx.load accepts) to OUTPUT.aimodel and its tokenizer
    to OUTPUT.tokenizer.model. Returns a summary (sizes, seconds)."""
    check_export_options(context, prefill_length, block_size)
    require("coreai.authoring", "coreai")
    start = time.perf_counter()
    output = check_output(output, ".aimodel", force)
    bar = progress_bar(total=3, show=progress, desc="export-coreai", unit="step")
    with bar:
        bar.set_postfix_str("load, calibrate, compress")
        desc, folder = describe(
            model_source, context, prefill_length, compress, block_size, compute_precision, COMPRESSIONS, tokenizer
        )
        tok = find_tokenizer(folder, tokenizer)
        bar.update()
        with staged_package(output, tok, force, reads=[folder, tok.path]) as staged:
            bar.set_postfix_str("build prefill and decode")
            program = build_program(desc)
            bar.update()
            bar.set_postfix_str("write")
            save(program, desc.metadata(tok), staged)
            bar.update()
    return export_summary(desc, output, time.perf_counter() - start)


def build_program(desc: PackageDescription):
    """Both functions in one module: constants with the same bytes are stored once."""
    from coreai.authoring import AIProgram, Module

    from .graph import build_function

    module = Module.create()
    with module:  # leaving the block runs coreai's pre-compilation rewrite
        for name, seq_len in zip(FUNCTIONS, (None, 1)):
            build_function(desc, name, seq_len)
    return AIProgram(module)


def save(program, metadata: dict, path):
    from coreai.runtime import AIModelAssetMetadata

    asset_metadata = AIModelAssetMetadata()
    asset_metadata.model_description = "OpenELM causal LM: prefill and decode with per-layer KV-cache states"
    for key, value in metadata.items():
        asset_metadata.set_custom(key, value)
    program.save_asset(path, metadata=asset_metadata)


def add_arguments(parser):
    add_export_arguments(parser, ".aimodel", COMPRESSIONS)
    parser.add_argument(
        "--compute-precision",
        choices=list(COMPUTE_DTYPES),
        default="float16",
        help="matmuls, attention, KV cache and logits (default float16, for devices; float32 for checking large "
        "models with Apple's Linux runtime, where float16 runs ~300x slower). Residual stream, norms and RoPE "
        "are float32 either way",
    )


def main(args):
    export_from_args(export_coreai, args, compute_precision=args.compute_precision)
