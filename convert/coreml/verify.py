"""`openelm verify-coreml`: run a saved Core ML package and compare it with the MLX model (see
convert/verify.py). Core ML exists on macOS only, so everywhere the package is also run by the
numpy MIL executor (executor.py), which reads the program and weights from disk. Both are driven
by the Python twin of swift-transformers' runner (swift_transformers.py), as an app would."""

import sys

import numpy as np

from ..package import installed
from ..verify import add_verify_arguments, check_verify_options, print_report, verify_package
from .swift_transformers import CoreMLRunner


def verify_coreml(package, model, steps: int = 16, prompt=None, tokenizer=None):
    check_verify_options(steps)
    installed("coremltools", "coreml")  # imported once the package's files pass their checks

    reference = CoreMLRunner(package, "mil-reference")  # loads and checks the package first
    runners = [("mil-reference", lambda: reference)]
    skipped = []
    if sys.platform == "darwin":
        runners.append(("coreml", lambda: CoreMLRunner(package, "coreml")))
    else:
        skipped.append("coreml (Core ML runs on macOS 15+ only)")
    return verify_package(
        package, model, reference.info, stored_weights(reference), runners, skipped, steps, prompt, tokenizer
    )


def stored_weights(runner: CoreMLRunner):
    """The reader of the package's named weights, decompressed to float32, from the saved program
    (a mil-reference runner's executor)."""

    def read(names):
        consts = runner.executor.constants("main")
        wanted = {name.replace(".", "_"): name for name in names}  # graph.weight's op names
        return {wanted[key]: value.astype(np.float32) for key, value in consts.items() if key in wanted}

    return read


def add_arguments(parser):
    add_verify_arguments(parser, ".mlpackage", "export-coreml")


def main(args) -> int:
    return print_report(verify_coreml(args.package, args.model, args.steps, args.prompt, args.tokenizer), args.json)
