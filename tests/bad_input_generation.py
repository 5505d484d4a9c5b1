"""Bad-input rows for generation (`openelm generate` and `openelm chat`): sampling values that are
out of range or not numbers, seeds MLX cannot take, speculation options, prompts given twice or
not in UTF-8. Each row runs through tests/test_bad_input.py's runner."""

import shutil

from bad_input import CHAT, GENERATE, Row, Work, category, nothing
from conftest import tiny_config

from openelm_mlx.benchmarks.synthetic import random_weights, write_checkpoint

NAN, INF = "nan", "inf"
LONG_SYSTEM = "be kind and brief " * 40  # ~200 tokens of the 256 the tiny model holds
ROOMLESS = "leaves no room for a message in the model's context of 256"
BAD_UTF8 = "a\udcffb"  # a lone surrogate: handed to the command as the raw byte 0xff


def draft_with_other_tokenizer(work: Work):
    """root/draft: the model again, with a tokenizer of 320 pieces beside it."""
    shutil.copytree(work.model, work.root / "draft")
    shutil.copyfile(work.assets["tokenizer-320"], work.root / "draft" / "tokenizer.model")


def draft_with_broken_config(work: Work):
    shutil.copytree(work.model, work.root / "draft")
    (work.root / "draft" / "config.json").write_text('{"vocab_size": "many"')


def draft_of_another_vocabulary(work: Work):
    """root/draft: a whole model of 320 pieces, its own tokenizer beside it (the model's has 384)."""
    config = tiny_config(vocab_size=320)
    write_checkpoint(work.root / "draft", config, random_weights(config), work.assets["tokenizer-320"])


SAMPLING = [
    ("temp-nan", ("--temp", NAN), "must be finite"),
    ("temp-inf", ("--temp", INF), "must be finite"),
    ("top-p-nan", ("--top-p", NAN), "must be finite"),
    ("min-p-negative", ("--min-p", "-0.1"), "--min-p must be in [0, 1]"),
    ("top-k-vocab", ("--top-k", "384"), "below the vocabulary size 384"),
    ("repetition-penalty-negative", ("--repetition-penalty", "-1.2"), "--repetition-penalty must be > 0"),
    ("repetition-penalty-inf", ("--repetition-penalty", INF), "must be finite"),
    ("seed-negative", ("--seed", "-1"), "--seed must be an integer from 0 to 18,446,744,073,709,551,615"),
    ("seed-beyond-64-bits", ("--seed", str(2**64)), "--seed must be an integer from 0 to 18,446,744,073,709,551,615"),
    ("max-tokens-negative", ("--max-tokens", "-3"), "--max-tokens must be at least 1"),
    ("prompt-lookup-negative", ("--prompt-lookup", "-1"), "--prompt-lookup must be an integer from 1 to 64"),
    ("prompt-lookup-huge", ("--prompt-lookup", "1000"), "--prompt-lookup must be an integer from 1 to 64"),
    ("num-draft-alone", ("--num-draft", "3"), "--num-draft needs --draft-model"),
    ("num-draft-0", ("--draft-model", "{model}", "--num-draft", "0"), "--num-draft must be an integer from 1 to 64"),
    ("lookup-and-draft", ("--prompt-lookup", "4", "--draft-model", "{model}"), "are alternatives"),
    ("draft-missing", ("--draft-model", "./no-such-draft"), "no model folder at './no-such-draft'"),
]

GENERATION = category(
    "generation",
    *[Row(f"generate.{name}", (*GENERATE, *argv), nothing, message) for name, argv, message in SAMPLING],
    *[Row(f"chat.{name}", (*CHAT, *argv), nothing, message) for name, argv, message in SAMPLING],
    Row("generate.prompt-twice", ("generate", "--model", "{model}", "hi", "-p", "ho"), nothing, "give the prompt once"),
    Row("generate.prompt-not-utf8", ("generate", "--model", "{model}", BAD_UTF8), nothing, "is not valid UTF-8"),
    Row(
        "generate.draft-other-tokenizer",
        (*GENERATE, "--draft-model", "{root}/draft"),
        draft_with_other_tokenizer,
        "error: --draft-model ",
    ),
    Row(
        "generate.draft-broken-config",
        (*GENERATE, "--draft-model", "{root}/draft"),
        draft_with_broken_config,
        "error: --draft-model ",
    ),
    Row(
        "generate.draft-other-vocabulary",
        (*GENERATE, "--draft-model", "{root}/draft"),
        draft_of_another_vocabulary,
        "a draft model must share the model's tokenizer",
    ),
    Row(
        "chat.draft-other-tokenizer",
        (*CHAT, "--draft-model", "{root}/draft"),
        draft_with_other_tokenizer,
        "error: --draft-model ",
    ),
    Row(
        "generate.lookup-on-a-package",
        ("generate", "--backend", "coreai", "--model", "{out}.aimodel", "--prompt-lookup", "4"),
        nothing,
        "need --backend mlx",
    ),
    # chat at the edge of its context: refused before the first turn, naming what takes the room
    Row("chat.system-too-long", (*CHAT, "--system", LONG_SYSTEM * 2), nothing, "the system message (--system) is"),
    Row("chat.system-and-max-tokens", (*CHAT, "--system", LONG_SYSTEM, "--max-tokens", "100"), nothing, ROOMLESS),
    Row(
        "chat.system-and-default-reply",
        ("chat", "--model", "{model}", "--system", LONG_SYSTEM),
        nothing,
        "the default --max-tokens, half the context",
    ),
    Row("chat.max-tokens-near-context", ("chat", "--model", "{model}", "--max-tokens", "250"), nothing, "use at most"),
    Row("chat.max-tokens-255", ("chat", "--model", "{model}", "--max-tokens", "255"), nothing, ROOMLESS),
    Row(
        "chat.max-tokens-past-context", ("chat", "--model", "{model}", "--max-tokens", "256"), nothing, "from 1 to 255"
    ),
)
