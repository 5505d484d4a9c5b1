"""`openelm generate`: stream a completion to stdout, then one line of statistics to stderr."""

import sys

from openelm_mlx.errors import OpenELMError
from openelm_mlx.generate import stream_generate
from openelm_mlx.loader import DTYPES, load
from openelm_mlx.tokenizer import chat_prompt

DEFAULT_PROMPT = "Once upon a time"


def add_model_arguments(parser):
    parser.add_argument(
        "--model", help="model folder or Hugging Face repo id (default: the demo model shipped with openelm-mlx)"
    )
    parser.add_argument(
        "--tokenizer",
        help="tokenizer.model file, folder or repo id (default: the model folder, then $OPENELM_TOKENIZER)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="activation dtype (auto: float32 on a CPU, float16 on a GPU, bfloat16 for 3B)",
    )


def add_sampling_arguments(parser, max_tokens=256):
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy and deterministic")
    parser.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0 or 1: off)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p times the top probability")
    parser.add_argument("--repetition-penalty", type=float, help="e.g. 1.2, as Apple's model cards recommend")
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")


def sampling_options(args) -> dict:
    return dict(
        max_tokens=args.max_tokens,
        temp=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
    )


def load_for_cli(args):
    if getattr(args, "backend", "mlx") != "mlx":
        from openelm_mlx.convert.runner import load_package

        return load_package(args.model, args.backend, args.tokenizer)
    if args.model is None:
        print(
            "openelm: no --model given, using the small demo model shipped with openelm-mlx "
            "(a few million parameters, for trying the toolkit offline; pass --model for a real OpenELM)",
            file=sys.stderr,
        )
    return load(args.model, tokenizer=args.tokenizer, dtype=args.dtype)


def add_arguments(parser):
    parser.add_argument("prompt_text", nargs="?", metavar="PROMPT", help="the prompt (or --prompt, or stdin)")
    parser.add_argument("--prompt", "-p", help="the prompt")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the Instruct chat template")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument(
        "--truncate", action="store_true", help="cut the prompt's start to fit the context instead of failing"
    )
    parser.add_argument(
        "--backend",
        default="mlx",
        choices=["mlx", "coreml", "mil-reference", "coreai"],
        help="mlx; coreml runs an exported .mlpackage with Core ML (macOS 15+); mil-reference runs it with "
        "the numpy MIL executor anywhere (slow, for checking); coreai runs an exported .aimodel with Apple's "
        "Core AI runtime (Linux: the reference runtime, not device speed; macOS 27)",
    )


def read_prompt(args) -> str:
    prompt = args.prompt if args.prompt is not None else args.prompt_text
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if not prompt:
        print(f"openelm: no prompt given, continuing {DEFAULT_PROMPT!r}", file=sys.stderr)
        prompt = DEFAULT_PROMPT
    return prompt


def main(args):
    prompt = read_prompt(args)
    if args.system and not args.chat:
        raise OpenELMError("--system needs --chat")
    model, tokenizer = load_for_cli(args)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = chat_prompt(messages + [{"role": "user", "content": prompt}])
    stats = None
    for chunk in stream_generate(model, tokenizer, prompt, truncate=args.truncate, **sampling_options(args)):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        stats = chunk.stats
    sys.stdout.write("\n")
    print(stats.summary(), file=sys.stderr)
