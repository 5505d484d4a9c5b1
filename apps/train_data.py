"""What `openelm train` reads: a sentencepiece tokenizer trained on the text, the text as one token
stream (each line a document, BOS line EOS), and the windows of it that batches and validation use."""

from pathlib import Path
from typing import List

import mlx.core as mx
import numpy as np
import sentencepiece as spm

from openelm_mlx.errors import OpenELMError
from openelm_mlx.tokenizer import Tokenizer

EVAL_WINDOWS = 16  # validation windows scored during training: a quick, fixed subset
MAX_LINE_BYTES = 1 << 16  # sentencepiece's max_sentence_length: it skips longer lines
# The tokenizer OpenELM's is (Llama's): byte-fallback BPE, digits split, text kept as written, and
# Llama's special ids (unk 0, bos 1, eos 2, no pad).
TOKENIZER_KIND = dict(model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0)
TOKENIZER_KIND |= dict(normalization_rule_name="identity", remove_extra_whitespaces=False)
TOKENIZER_KIND |= dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)


def train_tokenizer(text_file: Path, output: Path, vocab_size: int) -> Tokenizer:
    """A LLaMA-style sentencepiece BPE model (unk 0, bos 1, eos 2, byte fallback, LLaMA's identity
    normalization) trained on the text, saved as output/tokenizer.model."""
    with open(text_file, "rb") as f:  # read_text has checked it: a regular file of UTF-8
        lines = [len(line.rstrip(b"\r\n")) for line in f if line.strip()]
    if lines and min(lines) > MAX_LINE_BYTES:  # sentencepiece would say only "[!sentences_.empty()]"
        raise OpenELMError(
            f"cannot train the tokenizer on {text_file}: each of its lines is longer than {MAX_LINE_BYTES:,} bytes, "
            "the most the tokenizer trainer reads as one line: put one document a line"
        )
    prefix = output / "tokenizer-tmp"
    try:
        spm.SentencePieceTrainer.train(
            input=str(text_file),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            max_sentence_length=MAX_LINE_BYTES,
            num_threads=2,
            minloglevel=2,
            **TOKENIZER_KIND,
        )
    except RuntimeError as e:  # e.g. a --vocab-size the text is too small for
        why = str(e).splitlines()[-1].rsplit("] ", 1)[-1]  # drop sentencepiece's source location
        raise OpenELMError(f"cannot train the tokenizer on {text_file}: {why}") from None
    Path(f"{prefix}.vocab").unlink()
    path = Path(f"{prefix}.model").rename(output / "tokenizer.model")
    return Tokenizer(path)


def encode_documents(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """One token stream: each non-empty line is a document, BOS line EOS."""
    lines = [line for line in text.splitlines() if line.strip()]
    ids = []
    for tokens in tokenizer.sp.encode(lines):
        ids.extend([tokenizer.bos_id, *tokens, tokenizer.eos_id])
    return np.array(ids, dtype=np.int32)


def batch_at(tokens: np.ndarray, step: int, seed: int, batch_size: int, context: int) -> mx.array:
    """Random windows of context + 1 tokens; a function of (seed, step), so resuming is exact."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - context - 1, batch_size)
    return mx.array(np.stack([tokens[s : s + context + 1] for s in starts]))


def validation_windows(tokens: np.ndarray, context: int) -> List[mx.array]:
    """The first EVAL_WINDOWS non-overlapping windows of context + 1 tokens, each a batch of one."""
    n = min(EVAL_WINDOWS, (len(tokens) - 1) // context)
    return [mx.array(tokens[None, i * context : i * context + context + 1]) for i in range(n)]
