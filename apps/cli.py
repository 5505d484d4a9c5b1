"""`openelm <subcommand>`: one dispatcher; each subcommand module has add_arguments() and main()."""

import argparse
import importlib
import logging
import sys

from openelm_mlx.errors import OpenELMError

# subcommand -> (module, one-line help); modules are imported only when chosen.
SUBCOMMANDS = {
    "generate": ("openelm_mlx.apps.generate", "generate text from a prompt"),
    "chat": ("openelm_mlx.apps.chat", "chat with an Instruct model"),
    "convert": ("openelm_mlx.convert.hf_to_mlx", "convert a Hugging Face checkpoint to MLX (optionally 4/8-bit)"),
    "export-coreml": (
        "openelm_mlx.convert.coreml.export",
        "export a stateful Core ML package for iOS 18/macOS 15 apps",
    ),
    "verify-coreml": ("openelm_mlx.convert.coreml.verify", "check a Core ML package against the MLX model"),
    "export-coreai": ("openelm_mlx.convert.coreai.export", "export a stateful Core AI model for OS 27 apps"),
    "verify-coreai": ("openelm_mlx.convert.coreai.verify", "run a Core AI model with Apple's runtime against MLX"),
    "train": ("openelm_mlx.apps.train", "train a small OpenELM on a text corpus"),
    "eval": ("openelm_mlx.apps.eval", "measure perplexity"),
    "bench": ("openelm_mlx.benchmarks.bench", "benchmark prompt and generation speed"),
}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="openelm", description="OpenELM on Apple Silicon with MLX and Core ML")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = (argv if argv is not None else sys.argv[1:])[:1]
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if chosen == [name]:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(run=module.main)
    args = parser.parse_args(argv)
    # coremltools warns on import that Core ML's runtime is missing, which on Linux is expected.
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    try:
        code = args.run(args)
    except OpenELMError as e:
        print(f"openelm {args.command}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
