"""`openelm generate`: stream a completion to stdout, then one line of statistics to stderr."""

import logging
import sys
from dataclasses import asdict

from openelm_mlx.checkpoint import resolve_source
from openelm_mlx.errors import OpenELMError
from openelm_mlx.files import json_text
from openelm_mlx.generate import DEFAULT_NUM_DRAFT, FALLBACK_PROMPT, GenerationOptions, stream_generate
from openelm_mlx.loader import DEMO_MODEL, DTYPES, load, load_folder
from openelm_mlx.options import check_speculation
from openelm_mlx.tokenizer import chat_prompt, is_instruct_model

log = logging.getLogger(__name__)
DEMO_NOTICE = (
    "no --model given, using the small demo model shipped with openelm-mlx (context 256 tokens, for trying the "
    "toolkit offline; `openelm models` lists the real ones to pass with --model)"
)


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


def add_sampling_arguments(parser):
    parser.add_argument(
        "--max-tokens",
        type=int,
        help="tokens to generate (default: 256, or what remains of the model's context if less)",
    )
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy and deterministic")
    parser.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0 or 1: off)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p times the top probability")
    parser.add_argument("--seed", type=int, help="random seed for sampling (default: MLX's own)")
    parser.add_argument("--stop", action="append", help="stop at this string (repeatable)")
    parser.add_argument(
        "--repetition-penalty", type=float, help="e.g. 1.2, as Apple's model cards recommend (default: off)"
    )
    parser.add_argument(
        "--prompt-lookup",
        type=int,
        metavar="K",
        help="speculative decoding without a second model: draft up to K tokens by finding the last tokens "
        "earlier in the text (lossless; pays off when the output copies or repeats)",
    )
    parser.add_argument(
        "--draft-model",
        help="speculative decoding with a smaller OpenELM that shares the tokenizer (folder or repo id; lossless)",
    )
    parser.add_argument(
        "--num-draft", type=int, help=f"tokens the draft model proposes per step (default: {DEFAULT_NUM_DRAFT})"
    )


def generation_options(args) -> GenerationOptions:
    """The options of generate and chat (chat has no --truncate: its session makes room itself)."""
    return GenerationOptions(
        max_tokens=args.max_tokens,
        temp=args.temp,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop or (),
        truncate=vars(args).get("truncate", False),
        prompt_lookup=args.prompt_lookup,
        num_draft=args.num_draft,
    )


def load_for_cli(args, options: GenerationOptions, chat: bool, check=None):
    """(model, tokenizer, draft model or None) for generate and chat, the options checked: which go
    together before any model is read, their ranges once the model is (GenerationOptions.check), and
    check(model, tokenizer) if given (chat's room for a message). Notices come after (generate:
    tell_choices), so that a run that fails says only why."""
    check_speculation(options.prompt_lookup, args.draft_model, options.num_draft)
    if getattr(args, "backend", "mlx") != "mlx":
        if args.prompt_lookup is not None or args.draft_model:
            raise OpenELMError("--prompt-lookup and --draft-model need --backend mlx")
        from openelm_mlx.convert.runner import load_package

        model, tokenizer = load_package(args.model, args.backend, args.tokenizer)
        options.check(tokenizer.vocab_size, model.config.max_context_length)
        return model, tokenizer, None
    folder = resolve_source(DEMO_MODEL if args.model is None else args.model)
    model, tokenizer = load_folder(folder, tokenizer=args.tokenizer, dtype=args.dtype)
    draft = None
    if args.draft_model:
        try:
            draft, draft_tokenizer = load(args.draft_model, tokenizer=args.tokenizer, dtype=args.dtype)
        except OpenELMError as e:  # its own words speak of "the model": say which one
            raise OpenELMError(f"--draft-model {args.draft_model}: {e}") from None
        if draft_tokenizer.sp.serialized_model_proto() != tokenizer.sp.serialized_model_proto():
            raise OpenELMError(
                f"the draft model's tokenizer ({draft_tokenizer.path}) differs from the model's ({tokenizer.path}): "
                "a draft model must share the model's tokenizer"
            )
    options.check(tokenizer.vocab_size, model.config.max_context_length, draft)
    if check is not None:
        check(model, tokenizer)
    if chat and not is_instruct_model(args.model or folder, folder):
        log.warning("this does not look like an Instruct model; chat replies may not follow")
    return model, tokenizer, draft


def add_arguments(parser):
    parser.add_argument("prompt_text", nargs="?", metavar="PROMPT", help="the prompt (or --prompt, or stdin)")
    parser.add_argument("--prompt", "-p", help="the prompt (default: standard input, else 'Once upon a time')")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the Instruct chat template")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument(
        "--truncate", action="store_true", help="cut the prompt's start to fit the context instead of failing"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout once done instead of streaming: text, tokens (the ids generated, "
        "EOS left out) and stats (the figures of the stderr line, memory in bytes)",
    )
    parser.add_argument(
        "--backend",
        default="mlx",
        choices=["mlx", "coreml", "mil-reference", "coreai"],
        help="mlx; coreml runs an exported .mlpackage with Core ML (macOS 15+); mil-reference runs it with "
        "the numpy MIL executor anywhere (slow, for checking); coreai runs an exported bundle folder with Apple's "
        "Core AI runtime (Linux: the reference runtime, not device speed; macOS 27)",
    )


def utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OpenELMError(f"{where} is not valid UTF-8 (byte {e.start}): give the text in UTF-8") from None


def read_prompt(args):
    if args.prompt is not None and args.prompt_text is not None:
        raise OpenELMError("give the prompt once: as an argument or with --prompt, not both")
    prompt = args.prompt if args.prompt is not None else args.prompt_text
    if prompt is not None:
        # Python hands undecodable argument bytes over as lone surrogates; they get their bytes back.
        prompt = utf8(prompt.encode("utf-8", "surrogateescape"), "the prompt")
    elif not sys.stdin.isatty():
        prompt = utf8(sys.stdin.buffer.read(), "the prompt on standard input")
    return prompt or None  # None: FALLBACK_PROMPT, said once the options are checked


def tell_choices(args, fallback: bool, stats):
    """The notices of a run that has passed every check: what it chose for the user."""
    if fallback:
        log.info(f"no prompt given, continuing {FALLBACK_PROMPT!r}")
    if args.model is None:
        log.info(DEMO_NOTICE)
    if stats.prompt_dropped:
        log.info(f"--truncate dropped the prompt's first {stats.prompt_dropped} tokens, kept {stats.prompt_tokens}")


def main(args):
    prompt = read_prompt(args)
    if args.system and not args.chat:
        raise OpenELMError("--system needs --chat")
    options = generation_options(args)
    model, tokenizer, draft = load_for_cli(args, options, chat=args.chat)
    fallback, prompt = prompt is None, prompt or FALLBACK_PROMPT
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = chat_prompt(messages + [{"role": "user", "content": prompt}])
    stats, text, tokens = None, [], []
    for chunk in stream_generate(model, tokenizer, prompt, options, draft_model=draft):
        if stats is None:  # the prompt fitted: every check has passed
            tell_choices(args, fallback, chunk.stats)
        if args.json:
            text.append(chunk.text)
            tokens += [] if chunk.token is None else [chunk.token]
        else:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        stats = chunk.stats
    if args.json:
        print(json_text({"text": "".join(text), "tokens": tokens, "stats": asdict(stats)}))
    else:
        sys.stdout.write("\n")
    print(stats.summary(), file=sys.stderr)
