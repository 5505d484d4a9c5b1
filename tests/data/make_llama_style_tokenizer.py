"""Makes tests/data/llama_style_32000.model: a 32,000-piece byte-fallback BPE sentencepiece model
trained with LLaMA-2's trainer settings (read from LLaMA-2's tokenizer.model), on text any Debian
machine has: the King James Bible (`apt-get install bible-kjv`, public domain) and the Python 3.11
standard library's source (PSF license; code brings runs of spaces, digits and symbols). Run once;
tests/test_hf_tokenizer.py uses the committed file. ~2 minutes on 2 cores.

    python tests/data/make_llama_style_tokenizer.py
"""

import random
import re
import subprocess
import tempfile
from pathlib import Path

import sentencepiece as spm

OUT = Path(__file__).resolve().parent / "llama_style_32000"
STDLIB = Path("/usr/lib/python3.11")


def corpus() -> str:
    bible = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    verses = [re.sub(r"^\S+\d+:\d+ ", "", line) for line in bible.splitlines() if line.strip()]
    files = sorted(STDLIB.glob("*.py"))
    random.Random(0).shuffle(files)
    code = "\n".join(f.read_text(errors="replace") for f in files[:120])
    return "\n".join(verses) + "\n" + code


def main():
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "corpus.txt"
        text.write_text(corpus())
        spm.SentencePieceTrainer.train(
            input=str(text),
            model_prefix=str(OUT),
            model_type="bpe",
            vocab_size=32000,
            character_coverage=0.99995,
            input_sentence_size=400000,
            shuffle_input_sentence=True,
            max_sentence_length=4192,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=2,
            minloglevel=1,
        )
    OUT.with_suffix(".vocab").unlink()


if __name__ == "__main__":
    main()
