"""`openelm export-coreml`: a stateful Core ML package (iOS18/macOS15) in the contract of
swift-transformers' `LanguageModel` (apple-runners.md section 5), with the tokenizer folder beside it.

The steps, one function each: describe the model (package.describe: load, check, calibrate,
compress), build and convert the MIL program (graph.py), describe its inputs, outputs and
metadata, write it and the tokenizer folder beside the output and move both into place."""

import contextlib
import io
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from openelm_mlx import __version__, outputs
from openelm_mlx.errors import OpenELMError
from openelm_mlx.progress import progress_bar, ticking, within
from openelm_mlx.tokenizer import Tokenizer, find_tokenizer, is_instruct_model

from ..package import (
    PackageDescription,
    add_export_arguments,
    check_export_options,
    describe,
    export_from_args,
    export_summary,
    require,
    tokenizer_files,
    tokenizer_folder,
    write_files,
)

COMPRESSIONS = ("none", "int8", "int4", "palettize4", "palettize6")
# swift-transformers' stateful LanguageModel needs a ranged query length, max - min > 1
# (LanguageModel.swift:501-503), max read as the NSRange's length (:110-114): inputIds is ranged
# 1..context, so 4 holds whether Core ML's length counts the upper bound or the span.
MIN_CONTEXT = 4
DESCRIPTIONS = {
    "inputIds": "token ids, int32 [1, q], q = 1..context: the whole prompt after resetState, then one token",
    "causalMask": "float16 [1, 1, 1, T + 1], T = tokens so far counting inputIds: only its length is read "
    "(the graph masks causally by itself)",
    "logits": "float16 [1, q, vocab]: next-token logits after each input token",
    "keyCache": "float16 [layers, 1, kv_max, context, head_dim]: keys after RoPE; layer i uses its first kv_i heads",
    "valueCache": "float16 [layers, 1, kv_max, context, head_dim]: values; layer i uses its first kv_i heads",
}


def export_coreml(
    model_source,
    output,
    context: Optional[int] = None,
    compress: str = "none",
    block_size: int = 32,
    force: bool = False,
    tokenizer=None,
    progress: bool = False,
) -> dict:
    """Export `model_source` (anything openelm_mlx.load accepts) to OUTPUT.mlpackage and its
    tokenizer to the folder OUTPUT.tokenizer/. Returns a summary (sizes, seconds)."""
    check_export_options(context, block_size)
    if context is not None and context < MIN_CONTEXT:
        raise OpenELMError(f"--context {context} is too small: swift-transformers needs at least {MIN_CONTEXT}")
    require("coremltools", "coreml")
    start = time.perf_counter()
    output = Path(output)
    if output.suffix != ".mlpackage":
        raise OpenELMError(f"output '{output}' must end in .mlpackage")
    for path in (output, tokenizer_folder(output)):
        outputs.check_output(path, force)
    steps = ["describe", "build, convert", "write"]
    bar = progress_bar(total=len(steps), show=progress, desc="export-coreml", unit="step")
    with bar, ticking(bar):  # coremltools' conversion is one long call: the clock shows it is alive
        bar.set_postfix_str("load, calibrate, compress")
        desc, folder = describe(
            model_source,
            context,
            compress,
            block_size,
            "float16",
            COMPRESSIONS,
            tokenizer,
            on_step=lambda text: within(bar, text),
        )
        tok = find_tokenizer(folder, tokenizer)
        files = tokenizer_files(tok, is_instruct_model(desc.source, folder), desc.context)  # may refuse: first
        bar.update()
        places = [output, tokenizer_folder(output)]
        with outputs.staged_outputs(places, force, reads=[folder, tok.path]) as (package, beside):
            write_package(desc, metadata(desc, tok), package, bar)
            write_files(beside, files)
    return export_summary(desc, output, time.perf_counter() - start)


def metadata(desc: PackageDescription, tok: Tokenizer) -> Dict[str, str]:
    """Our openelm.* keys, and the co.huggingface.exporters.* ones swift-transformers reads: `name`
    is the Hub id it fetches a tokenizer for when the app passes none (LanguageModel.swift:227-238).
    OpenELM repos ship no tokenizer, so apps pass the OUT.tokenizer/ folder (docs/swift-transformers.md);
    the name still says which model this is."""
    return desc.metadata(tok) | {
        "co.huggingface.exporters.name": desc.source,
        "co.huggingface.exporters.task": "text-generation",
        "co.huggingface.exporters.architecture": "OpenELMForCausalLM",
    }


def write_package(desc: PackageDescription, meta: dict, path: Path, bar):
    import coremltools as ct

    from .graph import build_program

    bar.set_postfix_str("build, convert")
    query = ct.RangeDim(1, desc.context, default=1)
    inputs = [
        ct.TensorType(name="inputIds", shape=(1, query), dtype=np.int32),
        ct.TensorType(
            name="causalMask", shape=(1, 1, 1, ct.RangeDim(1, desc.context + 1, default=2)), dtype=np.float16
        ),
    ]
    # FLOAT32 means "keep the dtypes the program states": weights and matmuls are already float16,
    # and the float16 pass must not cast the float32 residual stream and norms down.
    with quiet():
        package = ct.convert(
            build_program(desc),
            convert_to="mlprogram",
            minimum_deployment_target=ct.target.iOS18,
            compute_precision=ct.precision.FLOAT32,
            inputs=inputs,
            skip_model_load=True,
        )
    bar.update()
    bar.set_postfix_str("write")
    spec = package.get_spec()
    for feature in list(spec.description.input) + list(spec.description.output) + list(spec.description.state):
        feature.shortDescription = DESCRIPTIONS[feature.name]
    spec.description.metadata.shortDescription = (
        "OpenELM causal LM, stateful KV cache (swift-transformers LanguageModel)"
    )
    spec.description.metadata.versionString = __version__
    spec.description.metadata.userDefined.update(meta)
    with quiet():
        ct.models.MLModel(spec, weights_dir=package.weights_dir, skip_model_load=True).save(str(path))
    bar.update()


@contextlib.contextmanager
def quiet():
    """coremltools prints a progress bar per pass pipeline and warnings about Core ML's runtime
    missing on Linux: keep them from the terminal (errors still raise); our bar has the steps."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


def add_arguments(parser):
    add_export_arguments(
        parser,
        ".mlpackage",
        COMPRESSIONS,
        output_help="OUT.mlpackage (the tokenizer goes to OUT.tokenizer/)",
    )


def summary_line(s: dict) -> str:
    return (
        f"wrote {s['output']} ({s['bytes'] / 2**20:.1f} MiB, {s['bytes_per_parameter']:.3f} bytes/parameter, "
        f"{s['compression']}, {s['compute_precision']} compute) and {s['tokenizer']} in {s['seconds']:.1f} s"
    )


def main(args):
    export_from_args(export_coreml, args, summary_line)
