"""`openelm verify-coreai`: run a saved Core AI bundle with Apple's own runtime, driven by the twin
of the engine the stock runner would pick, and compare it with the MLX model (see
convert/verify.py): on Linux the reference runtime bundled with coreai-core, on macOS 27 the OS
framework. The weights are read back from the model's main.mlirb (weights.py)."""

from typing import Optional

from ..compression import BITS
from ..package import require
from ..runner import start_engine
from ..verify import FLOAT16_SUM_RTOL, add_verify_arguments, check_verify_options, print_report, verify_package
from .bundle import engine_kind, read_bundle
from .runtime import read_model
from .weights import package_weights


def verify_coreai(bundle, model, steps: int = 16, prompt=None, tokenizer=None, chunk_threshold: Optional[int] = None):
    """`chunk_threshold`: the engine's (default COREAI_CHUNK_THRESHOLD or 1024, as in Swift)."""
    check_verify_options(steps)
    require("coreai.runtime", "coreai")

    bundle = read_bundle(bundle)
    info, graph = read_model(bundle)  # main.mlirb hashed once, for the engine too
    bits, names, functions = BITS.get(info.compression, 0), list(graph), (None,)  # None: the first (macOS: main)
    if engine_kind(names) == "static":  # the table is load_embeddings' output, the rest in any extend
        functions = ("load_embeddings", min(n for n in names if n.startswith(f"extend_{bundle.max_context_length}_")))
    return verify_package(
        bundle.path,
        model,
        info,
        lambda names: package_weights(bundle.asset, names, bits, functions),
        [("coreai", lambda: start_engine(bundle, info, graph, chunk_threshold))],
        [],
        steps,
        prompt,
        tokenizer,
        rtol=FLOAT16_SUM_RTOL if info.compute_precision == "float16" else None,
        beside=bundle.tokenizer_folder / "tokenizer.model",
    )


def add_arguments(parser):
    add_verify_arguments(parser, "bundle folder", "export-coreai")


def main(args) -> int:
    return print_report(verify_coreai(args.package, args.model, args.steps, args.prompt, args.tokenizer), args.json)
