"""The export commands' shared options and main (`openelm export-coreml`, `openelm export-coreai`):
each command adds its own options and summary line."""

from .package import IOS_CONTEXT


def export_from_args(export, args, summary_line, **extra):
    """The export commands' main: `export` (export_coreml or export_coreai) with the shared
    options (add_export_arguments) and `extra` ones, then summary_line(its summary)."""
    summary = export(
        args.model,
        args.output,
        context=args.context,
        compress=args.compress,
        block_size=args.block_size,
        force=args.force,
        tokenizer=args.tokenizer,
        progress=True,
        **extra,
    )
    print(summary_line(summary))


def add_export_arguments(parser, compressions, output_help: str):
    """The exporters' shared options. No --prefill-length: swift-transformers sends the whole prompt
    in one call, and Apple's engines choose how many tokens each call takes."""
    parser.add_argument("model", help="model folder or Hugging Face repo id (MLX folders may be quantized)")
    parser.add_argument("-o", "--output", required=True, help=output_help)
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        help="KV-cache length in tokens (default: the model's max_context_length; for --target ios "
        f"{IOS_CONTEXT} at most)",
    )
    parser.add_argument("--compress", choices=compressions, default="none", help="weight compression (none: 16-bit)")
    parser.add_argument("--block-size", type=int, default=32, help="int8 and int4 block size along the input axis")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model if the model folder has none")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
