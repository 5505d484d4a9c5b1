"""Every command's numeric options, each range written once in one table per command, checked
before any work: 0, negative, NaN, infinite and huge values get one line naming the option and the
value (exit 1, as every error in a well-formed command line). A value that means "the default" is
None, never 0. (The exporters' tables are in convert/package.py.)"""

import math
from typing import Dict

from .errors import OpenELMError
from .files import Rule, integer, number, optional, rule, shown

# The largest integer MLX's random seed takes (a uint64), and so every --seed.
MAX_SEED = 2**64 - 1
# Counts of steps, trials and tokens: far beyond any real run, small enough to stay exact.
MAX_COUNT = 1 << 31
# Tokens drafted per step in speculative decoding (--prompt-lookup, --num-draft): each costs about
# a one-token forward pass when rejected, so more is never worth it.
MAX_DRAFT = 64


def count(low: int = 1, high: int = MAX_COUNT) -> Rule:
    return integer(low, high)


def between(low: float, high: float) -> Rule:
    """A finite number from low to high, both included (NaN fails every comparison)."""
    return rule(lambda v: type(v) in (int, float) and low <= v <= high, f"must be a number from {low:g} to {high:g}")


def finite(ok, needs: str) -> Rule:
    """A number for which ok(v) holds; NaN and infinities (argparse's float() takes 'nan' and
    'inf') named as such."""
    inner = rule(lambda v: type(v) in (int, float) and ok(v), needs)
    return lambda v: f"must be finite, got {shown(v)}" if type(v) is float and not math.isfinite(v) else inner(v)


SEED = integer(0, MAX_SEED)
DRAFT_TOKENS = rule(lambda v: type(v) is int and 1 <= v <= MAX_DRAFT, f"must be from 1 to {MAX_DRAFT}")
PROBABILITY = finite(lambda v: 0 <= v <= 1, "must be in [0, 1]")


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
        "temp": finite(lambda v: v >= 0, "must be >= 0 (0 is greedy)"),
        "top_p": PROBABILITY,
        "top_k": rule(
            lambda v: type(v) is int and 0 <= v < vocab_size,
            f"must be >= 0 (0 turns it off) and below the vocabulary size {vocab_size}",
        ),
        "min_p": PROBABILITY,
        "repetition_penalty": optional(finite(lambda v: v > 0, "must be > 0 (1 turns it off)")),
        "seed": optional(SEED),
        "prompt_lookup": optional(DRAFT_TOKENS),
        "num_draft": optional(DRAFT_TOKENS),
    }


# `openelm bench`: -p, -g, --trials, --warmup, --seed and the speculation options.
BENCH_RULES = {
    "prompt_tokens": count(1, 1 << 20),
    "generation_tokens": count(1, 1 << 20),
    "trials": count(1, 10_000),
    "warmup": count(0, 10_000),
    "seed": SEED,
    "prompt_lookup": optional(DRAFT_TOKENS),
    "num_draft": optional(DRAFT_TOKENS),
}

# `openelm train`: far beyond the demo recipe, within what MLX and sentencepiece take (a
# byte-fallback tokenizer holds 256 byte pieces and unk, bos, eos).
TRAIN_RULES = {
    "layers": count(1, 1024),
    "model_dim": count(1, 65536),
    "head_dim": count(2, 4096),
    "vocab_size": count(260, 1 << 20),
    "context": count(1, 1 << 20),
    "batch_size": count(1, 1 << 16),
    "steps": count(),
    "learning_rate": number(0, 10),
    "min_lr_ratio": between(0, 1),
    "warmup": count(0),
    "weight_decay": between(0, 10),
    "grad_clip": number(0, 1e6),
    "seed": SEED,
    "checkpoint_every": count(),
    "eval_every": count(),
}

# `openelm eval ppl`
EVAL_RULES = {"context": optional(count()), "batch_size": count(1, 4096), "max_tokens": optional(count())}
# `openelm eval tasks`
EVAL_TASK_RULES = {"num_fewshot": optional(count(0, 1000)), "limit": optional(count()), "seed": SEED}


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
