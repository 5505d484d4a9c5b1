"""`openelm chat` at the edge of its context (docs/generate.md, "openelm chat"), with the demo model
(context 256): the oldest turns are dropped and the system message kept; a message that cannot fit
even alone is refused in one line and the conversation so far is kept (the next reply is the one
it would have been without that message, not a fresh chat's). The up-front refusals (a --system or
--max-tokens that leaves no room) are rows of tests/bad_input_generation.py."""

import pytest
from conftest import run_cli

from openelm_mlx import load
from openelm_mlx.apps.chat import ChatSession
from openelm_mlx.generate import GenerationOptions, stream_generate
from openelm_mlx.loader import DEMO_MODEL

LONG = "the sea and the stars " * 60  # ~300 tokens: more than the context alone


def replies(*lines: str, options=("--max-tokens", "24")):
    """(the replies, stderr's lines but the start-up notices) of a chat fed `lines` on stdin."""
    result = run_cli("chat", "--model", DEMO_MODEL, *options, input="".join(f"{line}\n" for line in lines))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    turns = result.stdout.split(">> ")[1:-1]  # the last prompt met the end of stdin
    said = [line for line in result.stderr.splitlines() if not line.startswith(("openelm:", "type a message"))]
    return [turn.removesuffix("\n") for turn in turns], said


def test_a_message_too_long_is_refused_and_the_conversation_kept():
    kept, said = replies("Tell me about the sea", LONG, "And the stars?")
    assert len(said) == 1 and said[0].startswith("error: this message is "), said
    assert "send a shorter one (the conversation so far is kept)" in said[0] and "--truncate" not in said[0]
    without, _ = replies("Tell me about the sea", "And the stars?")
    fresh, _ = replies("And the stars?")
    assert kept[1] == "" and [kept[0], kept[2]] == without  # as if the long message was never sent
    assert kept[2] != fresh[0]  # the first turn is still in the conversation


@pytest.fixture(scope="module")
def demo():
    return load(DEMO_MODEL)


def test_the_oldest_turns_are_dropped_and_the_system_message_kept(demo):
    model, tokenizer = demo
    session = ChatSession(model, tokenizer, system="You are terse.")
    messages = [f"Tell me about the sea, part {i}, and the stars over it" for i in range(8)]
    sent = []
    while not session.dropped_turns:
        sent.append(messages[len(sent)])
        reply = [c.token for c in session.send(sent[-1], GenerationOptions(max_tokens=40)) if c.token is not None]
        assert len(session.tokens) <= model.config.max_context_length
    # What is kept: the newest turns in order, the system message first, the new message last.
    kept_users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert kept_users == sent[-len(kept_users) :] and len(kept_users) < len(sent)
    message = sent[-1]
    prompt = session.encode_all(message, session.messages[:-2])
    assert session.tokens[: len(prompt)] == prompt
    assert tokenizer.decode(prompt).startswith("<|system|>\nYou are terse.")
    # The reply is the one a fresh run over the kept conversation gives.
    fresh = [
        c.token
        for c in stream_generate(model, tokenizer, prompt, GenerationOptions(max_tokens=40))
        if c.token is not None
    ]
    assert reply == fresh


def test_a_refused_message_changes_nothing(demo):
    model, tokenizer = demo
    session = ChatSession(model, tokenizer)
    list(session.send("Tell me about the sea", GenerationOptions(max_tokens=24)))
    before = (list(session.tokens), list(session.messages), [c.offset for c in session.cache])
    with pytest.raises(Exception, match="too long for the model's context of 256"):
        list(session.send(LONG, GenerationOptions(max_tokens=24)))
    assert (session.tokens, session.messages, [c.offset for c in session.cache]) == before
    assert session.dropped_turns == 0
