"""The first run with default options works: `openelm generate "Hello"` and `openelm chat` with the
shipped demo model (context 256) produce text, chat keeps going when its context fills, and the
notices a user needs (truncation, a base model in chat, float16 overflow) are there."""

import os
import subprocess
import sys

from conftest import assert_clean_error, run_cli

from openelm_mlx import load
from openelm_mlx.apps.chat import ChatSession
from openelm_mlx.generate import DEFAULT_MAX_TOKENS, GenerationOptions, stream_generate
from openelm_mlx.tokenizer import chat_prompt

DEMO_CONTEXT = 256


def test_generate_hello_with_defaults_produces_text():
    result = run_cli("generate", "Hello")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) > 20  # the default length fits the 256-token context
    assert "generation:" in result.stderr and "error" not in result.stderr


def test_chat_with_defaults_keeps_going_when_the_context_fills():
    turns = [f"Tell me about the {w} and the land of Egypt and the children of Israel" for w in ("sea", "sky", "sun")]
    result = run_cli("chat", input="\n".join(turns) + "\n")
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.split(">> ") if line.strip()]
    assert len(replies) == 3 and all(len(r.split()) > 3 for r in replies), result.stdout
    assert result.stderr.count("the oldest turns are dropped") == 1, result.stderr  # said once
    assert "error" not in result.stderr
    assert "does not look like an Instruct model" in result.stderr  # the demo model is a base model


def test_chat_session_after_dropping_turns_equals_a_fresh_run_over_what_is_kept():
    model, tok = load(None)
    session = ChatSession(model, tok)
    user = "Tell me about the sea and the land of Egypt and the children of Israel"
    while not session.dropped_turns:
        list(session.send(user, GenerationOptions(temp=0.0)))
    # What the last turn started from: the turns kept, then its user message.
    kept = tok.encode(chat_prompt(session.messages[:-2] + [{"role": "user", "content": user}]))
    assert len(kept) + min(DEFAULT_MAX_TOKENS, DEMO_CONTEXT // 2) <= DEMO_CONTEXT
    reply = [t for t in session.tokens[len(kept) :] if t != tok.eos_id]
    fresh = [
        c.token
        for c in stream_generate(model, tok, kept, GenerationOptions(max_tokens=len(reply)))
        if c.token is not None
    ]
    assert reply == fresh


def test_truncate_says_how_many_tokens_it_dropped():
    result = run_cli("generate", "-p", "the sea and the stars " * 80, "--max-tokens", "8", "--truncate")
    assert result.returncode == 0, result.stderr
    assert "--truncate dropped the prompt's first" in result.stderr


def test_float16_overflow_stops_generation_naming_the_dtype(massive_activation_checkpoint):
    """A model whose FFN emits ~1e5 at BOS overflows float16: one line naming the dtype to use,
    instead of printing garbage and exiting 0."""
    result = run_cli("generate", "--model", massive_activation_checkpoint, "-p", "hi", "--dtype", "float16")
    assert_clean_error(result, "not finite", "--dtype float32")
    ok = run_cli("generate", "--model", massive_activation_checkpoint, "-p", "hi", "--max-tokens", "4")
    assert ok.returncode == 0, ok.stderr


def test_text_that_is_not_utf8_on_stdin_or_in_chat(tiny_checkpoint):
    """Undecodable bytes: the prompt on stdin is one clear error; a chat line is refused and the
    chat goes on."""
    command = [sys.executable, "-m", "openelm_mlx"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run(
        [*command, "generate", "--model", str(tiny_checkpoint)], input=b"a\xffb", capture_output=True, env=env
    )
    assert bad.returncode == 1 and bad.stderr.decode().strip().splitlines() == [
        "openelm generate: error: the prompt on standard input is not valid UTF-8 (byte 1): give the text in UTF-8"
    ]
    chat = subprocess.run(
        [*command, "chat", "--model", str(tiny_checkpoint), "--max-tokens", "4"],
        input=b"a\xffb\nhello\n",
        capture_output=True,
        env=env,
    )
    assert chat.returncode == 0 and b"Traceback" not in chat.stderr
    assert b"that line is not valid UTF-8" in chat.stderr
    assert len([r for r in chat.stdout.split(b">> ") if r.strip()]) == 1  # the reply to "hello"
