"""`openelm verify-coreai`: run a saved Core AI bundle with Apple's own runtime, driven by the twin
of the engine the stock runner would pick, and compare it with the MLX model (see
convert/verify.py): on Linux the reference runtime bundled with coreai-core, on macOS 27 the OS
framework. The weights are read back from the model's main.mlirb (weights.py)."""

from typing import Callable, Dict, Optional, Sequence

import numpy as np

from ..compression import BITS
from ..package import PackageInfo, require
from ..runner import open_bundle
from ..verify import add_verify_arguments, check_verify_options, logits_rtol, print_report, verify_package
from .bundle import Bundle, check_static_functions, engine_kind, read_bundle
from .runtime import function_names, package_info
from .weights import package_weights


def verify_coreai(bundle, model, steps: int = 16, prompt=None, tokenizer=None, chunk_threshold: Optional[int] = None):
    """`chunk_threshold`: the engine's (default COREAI_CHUNK_THRESHOLD or 1024, as in Swift)."""
    check_verify_options(steps)
    require("coreai.runtime", "coreai")

    bundle = read_bundle(bundle)
    info = package_info(bundle)
    return verify_package(
        bundle.path,
        model,
        info,
        stored_weights(bundle, info),
        [("coreai", lambda: open_bundle(bundle.path, chunk_threshold))],
        [],
        steps,
        prompt,
        tokenizer,
        rtol=logits_rtol("coreai", info.compute_precision),
        beside=bundle.tokenizer_folder / "tokenizer.model",
    )


def stored_weights(bundle: Bundle, info: PackageInfo) -> Callable[[Sequence[str]], Dict[str, np.ndarray]]:
    """The reader of the bundle's named weights, decompressed to float32, from its main.mlirb."""
    bits = BITS.get(info.compression, 0)
    names, functions = function_names(bundle), (None,)  # None: the first function (macOS: main)
    if engine_kind(names) == "static":  # the table is load_embeddings' output, the rest in any extend
        check_static_functions(bundle, names)
        functions = ("load_embeddings", min(n for n in names if n.startswith(f"extend_{bundle.max_context_length}_")))
    return lambda wanted: package_weights(bundle.asset, wanted, bits, functions)


def add_arguments(parser):
    add_verify_arguments(parser, "bundle folder", "export-coreai")


def main(args) -> int:
    return print_report(verify_coreai(args.package, args.model, args.steps, args.prompt, args.tokenizer))
