"""Every command's numeric and choice options, each range written once in one table per command,
checked before any work: 0, negative, NaN, infinite and huge values get one line naming the option
and the value (exit 1, as every error in a well-formed command line). A value that means "the
default" is None, never 0. The command-line parsers take their choices from here too."""

import math
from typing import Dict

from .config import GROUP_SIZES
from .errors import OpenELMError
from .files import Rule, integer, one_of, optional, rule, shown

# The largest integer MLX's random seed takes (a uint64), and so every --seed.
MAX_SEED = 2**64 - 1
# Counts of steps, trials and tokens: far beyond any real run, small enough to stay exact.
MAX_COUNT = 1 << 31
# The longest context a config.json may declare (config.FIELD_RULES): no run of tokens is longer.
MAX_CONTEXT = 1 << 20
# Tokens drafted per step in speculative decoding (--prompt-lookup, --num-draft): each costs about
# a one-token forward pass when rejected, so more is never worth it.
MAX_DRAFT = 64
QUANT_BITS = (4, 8)  # `openelm convert --bits`: what mlx-lm's converter offers too
DEFAULT_GROUP_SIZE = 64  # `openelm convert --group-size`: mlx-lm's default


def count(low: int = 1, high: int = MAX_COUNT, why: str = "") -> Rule:
    return integer(low, high, why)


def real(low: float, high: float = math.inf, above: bool = False, why: str = "") -> Rule:
    """A finite number in [low, high] ((low, high] when `above`); NaN and infinities (argparse's
    float() takes 'nan' and 'inf') are named as such."""
    if high == math.inf:
        span = f"{'>' if above else '>='} {low:g}"
    else:
        span = f"in {'(' if above else '['}{low:g}, {high:g}]"

    def check(v):
        finite = type(v) is not float or math.isfinite(v)
        if finite and type(v) in (int, float) and (low < v if above else low <= v) and v <= high:
            return None
        return f"must be {'' if finite else 'finite and '}{span}{why}, got {shown(v)}"

    return check


SEED = count(0, MAX_SEED)
DRAFT_TOKENS = count(1, MAX_DRAFT)
PROBABILITY = real(0, 1)


def generation_rules(vocab_size: int, context: int) -> Dict[str, Rule]:
    """`openelm generate` and `chat` (GenerationOptions' fields): sampling, speculation, length.
    --top-k and --max-tokens are bounded by the model (a reply needs a token of prompt)."""
    return {
        "max_tokens": optional(
            rule(
                lambda v: type(v) is int and 1 <= v < context,
                f"must be at least 1 and below the model's context: from 1 to {context - 1}",
            )
        ),
        "temp": real(0, why=" (0 is greedy)"),
        "top_p": PROBABILITY,
        "top_k": rule(
            lambda v: type(v) is int and 0 <= v < vocab_size,
            f"must be >= 0 (0 turns it off) and below the vocabulary size {vocab_size}",
        ),
        "min_p": PROBABILITY,
        "repetition_penalty": optional(real(0, above=True, why=" (1 turns it off)")),
        "seed": optional(SEED),
        "prompt_lookup": optional(DRAFT_TOKENS),
        "num_draft": optional(DRAFT_TOKENS),
    }


# `openelm bench`: -p, -g, --trials, --warmup, --seed and the speculation options.
BENCH_RULES = {
    "prompt_tokens": count(1, MAX_CONTEXT),
    "generation_tokens": count(1, MAX_CONTEXT),
    "trials": count(1, 10_000),
    "warmup": count(0, 10_000),
    "seed": SEED,
    "prompt_lookup": optional(DRAFT_TOKENS),
    "num_draft": optional(DRAFT_TOKENS),
}
# `openelm bench --prompt-lookup/--draft-model`: decode tok/s is timed after the first token.
BENCH_SPECULATION_RULES = {
    "generation_tokens": count(2, MAX_CONTEXT, " with speculation (decode tok/s is timed after the first token)")
}

# `openelm train`: far beyond the demo recipe, within what MLX and sentencepiece take (a
# byte-fallback tokenizer holds 256 byte pieces and unk, bos, eos).
TRAIN_RULES = {
    "layers": count(1, 1024),
    "model_dim": count(1, 65536),
    "head_dim": rule(
        lambda v: type(v) is int and 2 <= v <= 4096 and v % 2 == 0,
        "must be an even integer from 2 to 4,096 (rotary embeddings pair its halves)",
    ),
    "vocab_size": count(260, MAX_CONTEXT),
    "context": count(1, MAX_CONTEXT),
    "batch_size": count(1, 1 << 16),
    "steps": count(),
    "learning_rate": real(0, 10, above=True),
    "min_lr_ratio": real(0, 1),
    "warmup": count(0),
    "weight_decay": real(0, 10),
    "grad_clip": real(0, 1e6, above=True),
    "seed": SEED,
    "checkpoint_every": count(),
    "eval_every": count(),
}

# `openelm eval ppl`
EVAL_RULES = {"context": optional(count()), "batch_size": count(1, 4096), "max_tokens": optional(count())}
# `openelm eval tasks`
EVAL_TASK_RULES = {"num_fewshot": optional(count(0, 1000)), "limit": optional(count()), "seed": SEED}

# `openelm convert`
CONVERT_RULES = {"bits": optional(one_of(*QUANT_BITS)), "group_size": one_of(*GROUP_SIZES)}
# `openelm export-coreml` and `export-coreai` (each also checked against the model once loaded)
EXPORT_RULES = {"context": optional(count(1, MAX_CONTEXT)), "block_size": count(1, 1 << 16)}
# `openelm verify-coreml` and `verify-coreai`
VERIFY_RULES = {"steps": count(0, MAX_CONTEXT)}


def check_options(values: Dict[str, object], rules: Dict[str, Rule]):
    """Raise OpenELMError for the first option (by its attribute name) that breaks its rule."""
    for name, check in rules.items():
        problem = check(values[name]) if name in values else None
        if problem:
            value = values[name]
            problem = problem.replace(f", got {shown(value)}", f", got {value}")
            raise OpenELMError(f"--{name.replace('_', '-')} {problem}")


def check_speculation(prompt_lookup, draft_model, num_draft):
    """The speculation options that go together (their ranges are in the tables above)."""
    if prompt_lookup is not None and draft_model is not None:
        raise OpenELMError("--prompt-lookup and --draft-model are alternatives: pass one")
    if num_draft is not None and draft_model is None:
        raise OpenELMError("--num-draft needs --draft-model (it is the number of tokens the draft model proposes)")
