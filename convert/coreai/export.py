"""`openelm export-coreai`: a Core AI LanguageBundle (OS 27) that Apple's stock LLM runners load
(`CoreAILanguageModel(resourcesAt:)`), built with coreai.authoring (no PyTorch).

The shared export flow (convert/export.py: describe the model, build its tokenizer files, stage the
output, summary) with this format's steps: build the target's functions into one module (graph.py
for macOS, ios_graph.py for iOS), then save the model with its asset metadata, the tokenizer and
metadata.json into the staged bundle folder (bundle.py)."""

import time
from functools import partial
from pathlib import Path
from typing import Optional

from openelm_mlx.errors import OpenELMError
from openelm_mlx.units import size_text

from ..compression import IOS_PRESET
from ..export import Format, export_package, write_files
from ..export_cli import add_export_arguments, export_from_args
from ..package import COMPUTE_DTYPES, PackageDescription, check_export_options
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
    Returns a summary (export.export_summary: sizes, KV memory, seconds)."""
    if target not in TARGETS:
        raise OpenELMError(f"unknown target '{target}': choose {' or '.join(TARGETS)}")
    check_export_options(context, block_size)
    output = bundle_output(output)
    fmt = Format(
        "export-coreai", ("coreai.authoring", "coreai"), COMPRESSIONS, partial(write, output.name, static_shapes)
    )
    return export_package(
        fmt,
        model_source,
        [output],
        context,
        compress,
        block_size,
        compute_precision,
        target,
        force,
        tokenizer,
        progress,
    )


def bundle_output(output) -> Path:
    """A bundle is a folder of any name; an .aimodel name is the file inside one, which the stock
    runners refuse to be handed (ModelBundle.swift:148-151), so it is refused here before any work."""
    output = Path(output)
    if output.suffix.lower() in (".aimodel", ".aimodelc"):
        raise OpenELMError(
            f"-o {output} names a model file, but export-coreai writes a bundle folder: "
            f"use -o {output.with_suffix('')} (it will hold {output.stem}.aimodel, metadata.json and tokenizer/)"
        )
    return output


def write(name: str, static_shapes, desc: PackageDescription, tok, files: dict, staged: list, bar):
    """The bundle folder `name` (bundle.py's layout, staged under another name): the model,
    tokenizer/ and metadata.json."""
    (bundle,) = staged
    bar.set_postfix_str(f"build the {desc.target} program")
    program = build_program(desc, static_shapes)
    bar.update()
    bar.set_postfix_str("write")
    bundle.mkdir()
    save(program, desc, tok, bundle / f"{name}.aimodel")
    write_files(bundle / "tokenizer", files)
    write_metadata(bundle, bundle_metadata(name, desc.source, desc.config.vocab_size, desc.context))
    bar.update()


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


def summary_line(s: dict) -> str:
    return (
        f"wrote {s['output']}/ ({s['target']}: {size_text(s['bytes'])}, {s['bytes_per_parameter']:.3f} "
        f"bytes/parameter, {s['compression']}, {s['compute_precision']} compute; KV cache at {s['context']} tokens "
        f"{size_text(s['kv_bytes'])}, {size_text(s['kv_bytes_unpadded'])} unpadded) in {s['seconds']:.1f} s"
    )


def add_arguments(parser):
    add_export_arguments(parser, COMPRESSIONS, output_help="OUT, the bundle folder (any name; not OUT.aimodel)")
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
