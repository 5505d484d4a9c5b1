"""`openelm verify-coreai`: run a saved Core AI model with Apple's own runtime and compare it with
the MLX model (see convert/verify.py): on Linux the reference runtime bundled with coreai-core, on
macOS 27 the OS framework. The weights are read back from main.mlirb (weights.py)."""

from ..compression import BITS
from ..package import require
from ..verify import (
    FLOAT16_SUM_RTOL,
    add_verify_arguments,
    check_package_path,
    check_verify_options,
    print_report,
    verify_package,
)
from .runtime import CoreAIRunner, package_info
from .weights import package_weights


def verify_coreai(package, model, steps: int = 16, prompt=None, tokenizer=None):
    check_verify_options(steps)
    require("coreai.runtime", "coreai")

    package = check_package_path(package, ".aimodel")
    info = package_info(package)
    bits = BITS.get(info.compression, 0)
    return verify_package(
        package,
        model,
        info,
        lambda names: package_weights(package, names, bits),
        [("coreai", lambda: CoreAIRunner(package))],
        [],
        steps,
        prompt,
        tokenizer,
        rtol=FLOAT16_SUM_RTOL if info.compute_precision == "float16" else None,
    )


def add_arguments(parser):
    add_verify_arguments(parser, ".aimodel", "export-coreai")


def main(args) -> int:
    return print_report(verify_coreai(args.package, args.model, args.steps, args.prompt, args.tokenizer))
