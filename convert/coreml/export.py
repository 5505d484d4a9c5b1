"""`openelm export-coreml`: one stateful, multifunction Core ML package (iOS18/macOS15) for apps.

The steps, one function each: describe the model (package.describe: load, check, calibrate,
compress), build and convert each function's MIL program (graph.py), assemble the two functions
into one package that stores the weights once and describe its inputs, outputs and metadata, write
it beside the output and move it into place (package.staged_package)."""

import contextlib
import io
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np

from openelm_mlx import __version__
from openelm_mlx.progress import progress_bar
from openelm_mlx.tokenizer import find_tokenizer

from ..package import (
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

COMPRESSIONS = ("none", "int8", "int4", "palettize4", "palettize6")
DESCRIPTIONS = {
    "input_ids": "token ids, int32 [1, S]: S = 1..prefill_length for prefill, 1 for decode",
    "position": "int32 [1]: cache position of input_ids[0, 0] (= tokens already in the cache)",
    "logits": "float16 [1, vocab]: next-token logits after the last input token",
}


def export_coreml(
    model_source,
    output,
    context: Optional[int] = None,
    prefill_length: int = 128,
    compress: str = "none",
    block_size: int = 32,
    force: bool = False,
    tokenizer=None,
    progress: bool = False,
) -> dict:
    """Export `model_source` (anything openelm_mlx.load accepts) to OUTPUT.mlpackage and its
    tokenizer to OUTPUT.tokenizer.model. Returns a summary (sizes, seconds)."""
    check_export_options(context, prefill_length, block_size)
    require("coremltools", "coreml")
    start = time.perf_counter()
    output = check_output(output, ".mlpackage", force)
    steps = ["describe", "build prefill", "build decode", "assemble", "write"]
    bar = progress_bar(total=len(steps), show=progress, desc="export-coreml", unit="step")
    with bar:
        bar.set_postfix_str("load, calibrate, compress")
        desc, folder = describe(
            model_source, context, prefill_length, compress, block_size, "float16", COMPRESSIONS, tokenizer
        )
        tok = find_tokenizer(folder, tokenizer)
        bar.update()
        with staged_package(output, tok, force, reads=[folder, tok.path]) as staged:
            write_package(desc, desc.metadata(tok), staged, bar)
    return export_summary(desc, output, time.perf_counter() - start)


def write_package(desc: PackageDescription, metadata: dict, path: Path, bar):
    """Both functions converted, assembled into one package at `path` (weights deduplicated); the
    single-function packages go to a scratch folder beside it."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f"{path.name}.parts-") as tmp:
        _write_package(desc, metadata, path, Path(tmp), bar)


def _write_package(desc: PackageDescription, metadata: dict, path: Path, tmp: Path, bar):
    import coremltools as ct

    from .graph import build_function

    for name, seq_len in zip(FUNCTIONS, (None, 1)):
        bar.set_postfix_str(f"{name}: build, convert")
        with quiet():
            _convert(build_function(desc, seq_len), desc.prefill_length if seq_len is None else 1).save(
                str(tmp / f"{name}.mlpackage")
            )
        bar.update()
    bar.set_postfix_str("two functions, one copy of the weights")
    multi = ct.utils.MultiFunctionDescriptor()
    for name in FUNCTIONS:
        multi.add_function(str(tmp / f"{name}.mlpackage"), src_function_name="main", target_function_name=name)
    multi.default_function_name = "decode"
    with quiet():
        ct.utils.save_multifunction(multi, str(tmp / "multi.mlpackage"))
    package = ct.models.MLModel(str(tmp / "multi.mlpackage"), skip_model_load=True)
    spec = package.get_spec()
    _describe(spec, metadata)
    bar.update()
    bar.set_postfix_str("write")
    with quiet():
        ct.models.MLModel(spec, weights_dir=package.weights_dir, skip_model_load=True).save(str(path))
    bar.update()


@contextlib.contextmanager
def quiet():
    """coremltools prints a progress bar per pass pipeline and warnings about Core ML's runtime
    missing on Linux: keep them from the terminal (errors still raise); our bar has the steps."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


def _convert(prog, max_len: int):
    import coremltools as ct

    length = ct.RangeDim(1, max_len, default=max_len) if max_len > 1 else 1
    inputs = [
        ct.TensorType(name="input_ids", shape=(1, length), dtype=np.int32),
        ct.TensorType(name="position", shape=(1,), dtype=np.int32),
    ]
    # FLOAT32 means "keep the dtypes the program states": weights and matmuls are already float16,
    # and the float16 pass must not cast the float32 residual stream and norms down.
    return ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32,
        inputs=inputs,
        skip_model_load=True,
    )


def _describe(spec, metadata: dict):
    for function in spec.description.functions:
        for feature in list(function.input) + list(function.output):
            feature.shortDescription = DESCRIPTIONS[feature.name]
        for feature in function.state:
            kind, _, layer = feature.name.split("_")
            feature.shortDescription = (
                f"layer {layer} {'keys (after RoPE)' if kind == 'k' else 'values'}, "
                "float16 [1, kv_heads, context, head_dim]; make one with make_state()"
            )
    spec.description.metadata.shortDescription = "OpenELM causal LM: prefill and decode with a stateful KV cache"
    spec.description.metadata.versionString = __version__
    spec.description.metadata.userDefined.update(metadata)


def add_arguments(parser):
    add_export_arguments(parser, ".mlpackage", COMPRESSIONS)


def main(args):
    export_from_args(export_coreml, args)
