"""`openelm verify-coreai`: run a saved Core AI bundle with Apple's own runtime, driven by the twin
of the engine the stock runner would pick, and compare it with the MLX model (see
convert/verify.py): on Linux the reference runtime bundled with coreai-core, on macOS 27 the OS
framework. The weights are read back from the model's main.mlirb (weights.py)."""

from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..compression import BITS
from ..package import require
from ..package_input import PackageInfo
from ..runner import start_engine
from ..verify import add_verify_arguments, check_verify_options, logits_rtol, print_report, verify_package
from .bundle import Bundle, engine_kind, read_bundle
from .runtime import read_model
from .weights import package_weights


def verify_coreai(bundle, model, steps: int = 16, prompt=None, tokenizer=None, chunk_threshold: Optional[int] = None):
    """`chunk_threshold`: the engine's (default COREAI_CHUNK_THRESHOLD or 1024, as in Swift)."""
    check_verify_options(steps)
    require("coreai.runtime", "coreai")

    bundle = read_bundle(bundle)
    info, graph = read_model(bundle)  # main.mlirb hashed once, for the engine too
    return verify_package(
        bundle.path,
        model,
        info,
        stored_weights(bundle, info, list(graph)),
        [("coreai", lambda: start_engine(bundle, info, graph, chunk_threshold))],
        [],
        steps,
        prompt,
        tokenizer,
        rtol=logits_rtol("coreai", info.compute_precision),
        beside=bundle.tokenizer_folder / "tokenizer.model",
    )


def stored_weights(
    bundle: Bundle, info: PackageInfo, names: List[str]
) -> Callable[[Sequence[str]], Dict[str, np.ndarray]]:
    """The reader of the bundle's named weights, decompressed to float32, from its main.mlirb
    (`names`: its functions, as runtime.read_model found them)."""
    bits, functions = BITS.get(info.compression, 0), (None,)  # None: the first function (macOS: main)
    if engine_kind(names) == "static":  # the table is load_embeddings' output, the rest in any extend
        functions = ("load_embeddings", min(n for n in names if n.startswith(f"extend_{bundle.max_context_length}_")))
    return lambda wanted: package_weights(bundle.asset, wanted, bits, functions)


def add_arguments(parser):
    add_verify_arguments(parser, "bundle folder", "export-coreai")


def main(args) -> int:
    return print_report(verify_coreai(args.package, args.model, args.steps, args.prompt, args.tokenizer), args.json)
