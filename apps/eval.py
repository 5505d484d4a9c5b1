"""`openelm eval tasks` (apps/eval_tasks.py): accuracy on lm-evaluation-harness tasks.

`openelm eval ppl`: perplexity of a model on a text file, next to the unigram baseline of its
own tokenizer on the same tokens, with tokens/s. Without --text: the demo model's validation text.

The text is read as the trainer reads it (apps/train_data.py): each line a document, BOS line EOS,
one stream cut into windows of `context` + 1 tokens that overlap by one token, so every token but
the first is scored exactly once.
"""

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from openelm_mlx.apps import eval_tasks
from openelm_mlx.apps.train_data import encode_documents
from openelm_mlx.errors import OpenELMError
from openelm_mlx.files import json_text, read_text
from openelm_mlx.loader import DEMO_MODEL, DTYPES, load
from openelm_mlx.model import Model
from openelm_mlx.options import EVAL_RULES, check_options
from openelm_mlx.overflow import OTHER_DTYPE_OPTION, check_finite
from openelm_mlx.progress import announce, forward, progress_bar, within
from openelm_mlx.tokenizer import Tokenizer

DEMO_TEXT = DEMO_MODEL / "validation.txt"


@dataclass
class Perplexity:
    tokens: int  # tokens scored
    loss: float  # mean cross-entropy, nats per token
    unigram: float  # perplexity of the best unigram model of the same scored tokens
    seconds: float  # forward passes only

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def unigram_perplexity(targets: np.ndarray) -> float:
    """exp(entropy) of the token frequencies of `targets`: no unigram model does better on them."""
    counts = np.bincount(targets).astype(np.float64)
    p = counts[counts > 0] / len(targets)
    return float(np.exp(-(p * np.log(p)).sum()))


def perplexity(
    model: Model,
    tokenizer: Tokenizer,
    text: str,
    context: Optional[int] = None,
    batch_size: int = 8,
    max_tokens: Optional[int] = None,
    progress: bool = False,
) -> Perplexity:
    """Perplexity of `model` on `text`; `max_tokens` scores only the first that many tokens."""
    check_options({"context": context, "batch_size": batch_size, "max_tokens": max_tokens}, EVAL_RULES)
    context = model.config.max_context_length if context is None else context
    if context > model.config.max_context_length:
        raise OpenELMError(f"--context {context} exceeds the model's context of {model.config.max_context_length}")
    tokens = encode_documents(tokenizer, text)
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    if len(tokens) < 2:
        raise OpenELMError("the text holds no tokens to score: pass a non-empty text file")
    starts = list(range(0, len(tokens) - 1, context))
    full = [s for s in starts if s + context + 1 <= len(tokens)]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in starts[len(full) :]]  # the shorter last window

    total, start = 0.0, time.perf_counter()
    bar = progress_bar(batches, show=progress, desc="eval ppl", unit="batch")
    with bar:  # closed before the run's last word (interrupted, an error)
        for b, batch in enumerate(bar):
            windows = mx.array(np.stack([tokens[s : s + context + 1] for s in batch]))
            # a layer at a time on a CPU (a batch of the demo model's windows is seconds): Ctrl-C acts there
            h = forward(model, windows[:, :-1], on_layer=lambda i, n: within(bar, f"layer {i}/{n}"))
            logits = model.transformer.token_embeddings.as_linear(h)  # tied output layer (Model.__call__)
            check_finite(logits, logits.dtype, OTHER_DTYPE_OPTION)
            loss = nn.losses.cross_entropy(logits.astype(mx.float32), windows[:, 1:], reduction="sum")
            total += loss.item()
            if b == 0:  # the first batch measures the rest
                plan = f"eval ppl: {len(batches)} batches of up to {batch_size} windows x {context} tokens"
                announce(bar, plan, time.perf_counter() - start, len(batches), "batch")
    seconds = time.perf_counter() - start
    n = len(tokens) - 1
    return Perplexity(tokens=n, loss=total / n, unigram=unigram_perplexity(tokens[1:]), seconds=seconds)


def add_arguments(parser):
    sub = parser.add_subparsers(dest="metric", metavar="METRIC", required=True)
    ppl = sub.add_parser(
        "ppl",
        help="perplexity on a text file, one document a line",
        description="perplexity of a model on a text file (one document a line), beside the unigram baseline of "
        "its own tokenizer on the same tokens, and tokens/s; every token but the first scored once",
        command_prog=parser.prog,
    )
    ppl.add_argument("--model", help="model folder or Hugging Face repo id (default: the demo model)")
    ppl.add_argument("--tokenizer", help="tokenizer.model file or folder (default: the model's)")
    ppl.add_argument("--text", type=Path, help="text file (default: the demo model's validation text)")
    ppl.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="activation dtype (auto: float32 on a CPU, float16 on a GPU, bfloat16 for 3B)",
    )
    ppl.add_argument("--context", type=int, help="tokens per window (default: the model's context)")
    ppl.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    ppl.add_argument("--max-tokens", type=int, help="score only the first N tokens of the text (default: all)")
    ppl.add_argument("--json", action="store_true", help="print the result as one JSON object instead")
    eval_tasks.add_arguments(sub, parser.prog)


def main(args):
    if args.metric == "tasks":
        return eval_tasks.main(args)
    text_file = args.text or DEMO_TEXT
    if not text_file.is_file():
        raise OpenELMError(f"no text file at {text_file}: pass --text FILE")
    text = read_text(text_file)
    model, tokenizer = load(args.model, args.tokenizer, args.dtype)
    result = perplexity(model, tokenizer, text, args.context, args.batch_size, args.max_tokens, progress=True)
    if args.json:
        figures = {"perplexity": result.perplexity, "tokens_per_second": result.tokens_per_second}
        print(json_text({"model": str(args.model or DEMO_MODEL), "text": str(text_file), **asdict(result), **figures}))
        return
    print(f"model: {args.model or f'demo model ({DEMO_MODEL})'}")
    print(f"text: {text_file}, {result.tokens} tokens scored")
    print(f"perplexity: {result.perplexity:.3f} (loss {result.loss:.4f} nats/token)")
    print(f"unigram baseline (same tokenizer and tokens): {result.unigram:.3f}")
    print(f"speed: {result.tokens_per_second:.0f} tokens/s")
