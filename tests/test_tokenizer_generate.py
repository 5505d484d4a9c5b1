"""Tokenizer, streaming text, chat template, stop strings and the chat session's KV cache."""

import pytest

from openelm_mlx import generate, load
from openelm_mlx.apps.chat import ChatSession
from openelm_mlx.generate import GenerationOptions, StopMatcher, stream_generate
from openelm_mlx.tokenizer import Tokenizer, chat_prompt


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    return load(tiny_checkpoint)


def test_streaming_detokenizer_rebuilds_text_exactly(tokenizer_file):
    tok = Tokenizer(tokenizer_file)
    text = "Café naïve 東京 🙂 — the quick brown fox, déjà vu!"
    ids = tok.encode(text, bos=False)
    assert any(tok.sp.id_to_piece(i).startswith("<0x") for i in ids)  # byte-fallback pieces present
    detok = tok.detokenizer()
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_streaming_keeps_the_space_after_the_prompt(tokenizer_file):
    tok = Tokenizer(tokenizer_file)
    # sentencepiece adds the word-initial space itself ("▁a"), as LLaMA-2's tokenizer does
    prompt, rest = tok.encode("Once upon"), tok.encode("a time there was a fox", bos=False)
    full = tok.decode(prompt + rest)
    detok = tok.detokenizer(context=prompt)
    assert tok.decode(prompt) + "".join(detok.add(i) for i in rest) + detok.flush() == full
    assert full.startswith("Once upon a time")


def test_chat_template_and_eos_token(tokenizer_file):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = chat_prompt(messages)
    assert text == "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    tok = Tokenizer(tokenizer_file)
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids.count(tok.eos_id) == 2  # "</s>" is the eos token, not text
    assert tok.encode("a</s>b") == [tok.bos_id, *tok.encode("a", bos=False), tok.eos_id, *tok.encode("b", bos=False)]


def test_stop_matcher_holds_back_partial_matches():
    stop = StopMatcher(["\n\n", "END"])
    assert stop.feed("hello E") == ("hello ", False)
    assert stop.feed("N") == ("", False)
    assert stop.feed("D and more") == ("", True)
    assert StopMatcher([]).feed("abc") == ("abc", False)


def test_stop_string_cuts_output(loaded):
    model, tok = loaded
    full = generate(model, tok, "Once upon a time", max_tokens=30)
    stop = full[5:8]
    cut = generate(model, tok, "Once upon a time", max_tokens=30, stop=[stop])
    assert cut == full[: full.index(stop)]


def test_greedy_is_deterministic_and_sampling_seeded(loaded):
    model, tok = loaded
    assert generate(model, tok, "The sea", max_tokens=16) == generate(model, tok, "The sea", max_tokens=16)
    a = generate(model, tok, "The sea", max_tokens=16, temp=1.0, top_p=0.9, seed=7)
    b = generate(model, tok, "The sea", max_tokens=16, temp=1.0, top_p=0.9, seed=7)
    c = generate(model, tok, "The sea", max_tokens=16, temp=1.0, top_p=0.9, seed=8)
    assert a == b and a != c


def test_stats_are_consistent(loaded):
    model, tok = loaded
    chunks = list(stream_generate(model, tok, "Once upon a time", GenerationOptions(max_tokens=10)))
    s = chunks[-1].stats
    assert s.prompt_tokens == len(tok.encode("Once upon a time"))
    assert s.finish_reason in ("eos", "length") and 1 <= s.generation_tokens <= 10
    assert s.time_to_first_token > 0 and abs(s.prompt_tps - s.prompt_tokens / s.time_to_first_token) < 1e-6
    # MLX's peak allocation holds at least the KV cache of the prompt and the tokens generated
    c = model.config
    per_token = 2 * sum(c.num_kv_heads) * c.head_dim * 2  # keys and values, 16 bits or more each
    cache_bytes = per_token * (s.prompt_tokens + s.generation_tokens - 1)
    assert s.memory_source == "mlx" and s.peak_memory_bytes >= cache_bytes


def test_chat_session_cache_equals_recomputing_the_conversation(loaded):
    """Turn 2 through the kept cache must give what a fresh run over the whole conversation gives."""
    model, tok = loaded
    session = ChatSession(model, tok, system="You are terse.")
    first = "".join(c.text for c in session.send("Tell me about the sea", GenerationOptions(max_tokens=12)))
    second = [c.token for c in session.send("And the stars?", GenerationOptions(max_tokens=12)) if c.token is not None]
    assert first
    conversation = session.tokens[: -len(second) - 1]  # before turn 2's reply and its closing eos
    fresh = [
        c.token
        for c in stream_generate(model, tok, conversation, GenerationOptions(max_tokens=12))
        if c.token is not None
    ]
    assert second == fresh
    # The cache holds the conversation, less what was never fed: the reply's last token (sampled
    # from the step before) and the closing eos. The next turn feeds them first.
    assert {c.offset for c in session.cache} <= {len(session.tokens) - 2, len(session.tokens) - 1}
    session.reset()
    assert session.tokens == [] and session.cache[0].offset == 0


def test_chat_reply_stopped_midway_keeps_a_consistent_conversation(loaded):
    """Ctrl-C in `openelm chat` closes the reply generator; the next turn must still see exactly
    the conversation so far."""
    model, tok = loaded
    session = ChatSession(model, tok)
    reply = session.send("Tell me about the sea", GenerationOptions(max_tokens=40))
    for _ in zip(range(3), reply):
        pass
    reply.close()
    assert session.tokens[-1] == tok.eos_id
    second = [c.token for c in session.send("And the stars?", GenerationOptions(max_tokens=8)) if c.token is not None]
    conversation = session.tokens[: -len(second) - 1]
    fresh = [
        c.token
        for c in stream_generate(model, tok, conversation, GenerationOptions(max_tokens=8))
        if c.token is not None
    ]
    assert second == fresh
