"""tokenizer.json (hf_tokenizer.py) tokenizes as sentencepiece does, read by the `tokenizers`
library (the Rust library the Swift ports follow), on thousands of generated lines; its chat
template renders our chat prompt; and the files are the same bytes each time."""

import json
import random
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer as HFTokenizer

from openelm_mlx.errors import OpenELMError
from openelm_mlx.hf_tokenizer import TOKENIZER_CHAT_TEMPLATE, hf_tokenizer_files
from openelm_mlx.tokenizer import Tokenizer, chat_prompt

ROOT = Path(__file__).resolve().parent.parent
# A 32,000-piece byte-fallback BPE trained with LLaMA-2's settings (tests/data/make_llama_style_tokenizer.py).
LLAMA_STYLE = ROOT / "tests" / "data" / "llama_style_32000.model"
DEMO = ROOT / "openelm_mlx" / "demo_model" / "tokenizer.model"
FRAGMENTS = [
    "In the beginning God created the heaven and the earth.",
    "And the LORD said unto Moses,",
    "def forward(self, x):",
    "    return x + 1",
    "for i in range(10):",
    "x = {'a': [1, 2, 3]}",
    "3.14159",
    "2024-06-01",
    "1,000,000",
    "HTTP/1.1 200 OK",
    "naïve café résumé",
    "Straße",
    "日本語のテキスト",
    "中文分词测试",
    "한국어",
    "Привет, мир",
    "مرحبا",
    "😀👍🏽🎉",
    "👨‍👩‍👧",
    "ꙮ𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "\u200b\u00a0\u2028",
    "\x01\x7f",
    "<|user|>",
    "<|assistant|>",
    "<|system|>",
    "</s>",
    "<s>",
    "<unk>",
    "</s>\n<|user|>\n",
    "<0x0A>",
    "▁",
    "▁▁x",
    "it's",
    "don't!!",
    "...",
    "--",
    "a",
    "I",
    "thee thou thy",
    "ThisIsCamelCase",
    "snake_case_name",
]
SEPARATORS = ["", " ", "  ", "   ", "    ", "\t", "\n", "\n\n", " \n", "\t\t", "\r\n", "        "]


def varied_lines(n: int = 2400, seed: int = 16):
    """Deterministic lines mixing the fragments with leading, trailing and repeated whitespace."""
    rng = random.Random(seed)
    lines = ["", " ", "  ", "\n", "\t", "</s>", "</s>x", "</s> x", "x</s>", "<s></s>", " </s>\n"]
    while len(lines) < n:
        parts = [rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 6))]
        seps = [rng.choice(SEPARATORS) for _ in parts]
        line = "".join(p + s for p, s in zip(parts, seps))
        line = rng.choice(["", "", " ", "  ", "\n", "\t"]) + line
        if rng.random() < 0.1:  # mid-word splits: pieces glued to what precedes them
            cut = rng.randint(0, len(line))
            line = line[:cut] + line[cut + 1 :]
        lines.append(line)
    return lines


@pytest.fixture(scope="module", params=["demo", "llama_style_32000", "tiny"])
def tokenizers_pair(request, tokenizer_file):
    path = {"demo": DEMO, "llama_style_32000": LLAMA_STYLE, "tiny": tokenizer_file}[request.param]
    ours = Tokenizer(path)
    files = hf_tokenizer_files(ours)
    return ours, HFTokenizer.from_str(files["tokenizer.json"].decode()), files


def test_ids_equal_sentencepiece_on_varied_lines(tokenizers_pair):
    ours, theirs, _ = tokenizers_pair
    lines = varied_lines()
    plain = [line for line in lines if not ours.specials.search(line)]
    assert len(plain) > 1000
    encoded = theirs.encode_batch(lines, add_special_tokens=False)
    mismatches = [line for line, e in zip(lines, encoded) if e.ids != ours.encode(line, bos=False)]
    assert mismatches == []
    # Without special-token text, ours is sentencepiece's own encode.
    assert all(ours.encode(line, bos=False) == ours.sp.encode(line) for line in plain)
    # add_special_tokens: BOS first, as our prompts start.
    with_bos = theirs.encode_batch(lines, add_special_tokens=True)
    assert [e.ids for e in with_bos] == [ours.encode(line) for line in lines]
    assert all(e.ids[0] == ours.bos_id for e in with_bos)


def test_transformers_reads_the_files_as_they_are(tokenizers_pair, tmp_path):
    """mlx_lm.load tokenizes with transformers' AutoTokenizer from these files."""
    from transformers import AutoTokenizer

    ours, _, files = tokenizers_pair
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    lines = varied_lines(1000, seed=3)
    assert [theirs.encode(line) for line in lines] == [ours.encode(line) for line in lines]


def test_decode_equals_sentencepiece(tokenizers_pair):
    ours, theirs, _ = tokenizers_pair
    for line in varied_lines(600, seed=7):
        ids = [i for i in ours.encode(line, bos=False) if i not in ours.special_ids.values()]
        assert theirs.decode(ids) == ours.decode(ids), line
    # Special tokens are skipped by both (sentencepiece shows <unk> as " ⁇ "); each part after
    # one was encoded with its own dummy-prefix space, which decoding keeps.
    ids = ours.encode("a</s> b<s>c", bos=True)
    assert theirs.decode(ids) == ours.decode(ids) == "a  b c"


def test_special_token_text(tokenizers_pair):
    """`</s>` in text is the eos token in both (sentencepiece alone spells it out), and the text
    after it starts with the dummy-prefix space: legacy LLaMA behaviour."""
    ours, theirs, _ = tokenizers_pair
    assert ours.sp.encode("</s>") != [2]
    assert ours.encode("</s>\n<|user|>", bos=False) == [2, *ours.sp.encode("\n<|user|>")]
    assert theirs.encode("</s>\n<|user|>", add_special_tokens=False).ids == [2, *ours.sp.encode("\n<|user|>")]


def render(template: str, messages, add_generation_prompt: bool) -> str:
    """As transformers renders chat templates (chat_template_utils.py: trim_blocks, lstrip_blocks)."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token="<s>", eos_token="</s>"
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_our_prompt(tokenizers_pair, add_generation_prompt):
    ours, theirs, files = tokenizers_pair
    config = json.loads(files["tokenizer_config.json"])
    assert config["chat_template"] == files["chat_template.jinja"].decode() == TOKENIZER_CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "  Hello,\nworld! </s> 日本 😀"},
        {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "\tAnd now?"},
    ]
    text = render(config["chat_template"], messages, add_generation_prompt)
    assert text == "<s>" + chat_prompt(messages, add_generation_prompt)
    # The Swift runners encode the rendered prompt without special tokens.
    expected = ours.encode(chat_prompt(messages, add_generation_prompt))
    assert theirs.encode(text, add_special_tokens=False).ids == expected


def test_files_are_deterministic_and_complete(tokenizer_file):
    files = hf_tokenizer_files(Tokenizer(LLAMA_STYLE), model_max_length=2048)
    assert files == hf_tokenizer_files(Tokenizer(LLAMA_STYLE), model_max_length=2048)
    assert sorted(files) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    config = json.loads(files["tokenizer_config.json"])
    assert {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "model_max_length")} == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 2048,
    }
    assert (config["tokenizer_class"], config["add_bos_token"], config["add_eos_token"], config["legacy"]) == (
        "PreTrainedTokenizerFast",
        True,
        False,
        True,
    )
    assert {k: v["content"] for k, v in config["added_tokens_decoder"].items()} == {
        "0": "<unk>",
        "1": "<s>",
        "2": "</s>",
    }
    spec = json.loads(files["tokenizer.json"])
    assert len(spec["model"]["vocab"]) == 32000 and spec["model"]["byte_fallback"] and spec["pre_tokenizer"] is None
    base = hf_tokenizer_files(Tokenizer(tokenizer_file), instruct=False)
    assert sorted(base) == ["tokenizer.json", "tokenizer_config.json"]
    assert "chat_template" not in json.loads(base["tokenizer_config.json"])


def test_refuses_what_it_cannot_reproduce(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "uni"),
        vocab_size=30,
        hard_vocab_limit=False,
        model_type="unigram",
        minloglevel=2,
    )
    with pytest.raises(OpenELMError, match="not a BPE model.*normalization 'nmt_nfkc'"):
        hf_tokenizer_files(Tokenizer(tmp_path / "uni.model"))
