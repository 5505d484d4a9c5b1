"""`openelm chat`: a REPL for Instruct models that keeps the KV cache across turns."""

import logging
import sys
from dataclasses import replace
from typing import Dict, Iterator, List, Optional

from openelm_mlx.cache import make_cache
from openelm_mlx.errors import OpenELMError, Terminated
from openelm_mlx.generate import DEFAULT_MAX_TOKENS, GenerationChunk, GenerationOptions, fit_context, stream_generate
from openelm_mlx.model import Model
from openelm_mlx.tokenizer import Tokenizer, chat_prompt

from .generate import DEMO_NOTICE, add_model_arguments, add_sampling_arguments, generation_options, load_for_cli

# What can be typed at the chat's `>>` prompt besides a message: `chat --help` and /help list it.
COMMANDS = {
    "/reset": "start the conversation over (the system message stays)",
    "/quit": "leave the chat (also /exit, or Ctrl-D)",
    "/help": "list these commands",
}
KEYS = "Ctrl-C stops a reply, Ctrl-D leaves"
HELP = f"type a message, or {', '.join(COMMANDS)}; {KEYS}"
log = logging.getLogger(__name__)


class ChatSession:
    """A conversation whose tokens stay in the KV cache: each turn feeds only what is new. Every
    turn keeps room for a reply of max_tokens (default: DEFAULT_MAX_TOKENS or half the context).
    When the context fills, the oldest turns are dropped (the system message stays) and the rest
    is fed again; a message too long to fit even alone is refused, and the conversation stays as
    it was (docs/generate.md, "openelm chat")."""

    def __init__(self, model: Model, tokenizer: Tokenizer, system: Optional[str] = None):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.dropped_turns = 0  # turns dropped to fit the context, over the whole session
        self.reset()

    def reset(self):
        self.cache = make_cache(self.model)
        self.tokens: List[int] = []  # the conversation so far, as the template tokenizes it
        self.messages: List[Dict[str, str]] = []  # the finished turns as text: user, assistant, ...

    def encode_all(self, user: str, messages: Optional[List[Dict[str, str]]] = None) -> List[int]:
        """The whole conversation (or `messages`), system message first, ending with the new user message."""
        return conversation(self.tokenizer, self.system, self.messages if messages is None else messages, user)

    def turn_tokens(self, user: str) -> List[int]:
        if not self.tokens:
            return self.encode_all(user)
        # The previous reply ended with "</s>"; the template puts a newline after it.
        return self.tokenizer.encode("\n" + chat_prompt([{"role": "user", "content": user}]), bos=False)

    def send(
        self, user: str, options: Optional[GenerationOptions] = None, draft_model=None
    ) -> Iterator[GenerationChunk]:
        options = options or GenerationOptions()
        max_tokens = options.max_tokens
        context = self.model.config.max_context_length
        reply_room = room_for_reply(context, max_tokens)
        new = self.turn_tokens(user)
        if len(self.tokens) + len(new) + reply_room > context:
            # Drop the oldest turns until the rest, fed again from the start, leaves room for a
            # reply; planned first, so that a message that cannot fit changes nothing.
            kept = self.messages
            while True:
                new = self.encode_all(user, kept)
                if len(new) + reply_room <= context or not kept:
                    break
                kept = kept[2:]  # the oldest user message and its reply
            if len(new) + reply_room > context:
                alone, around = len(new) - len(self.encode_all("", [])), "the system message, " if self.system else ""
                raise OpenELMError(
                    f"this message is {alone} tokens, too long for the model's context of {context} with "
                    f"{around}the chat template and a reply of {reply_room}: send a shorter one "
                    "(the conversation so far is kept)"
                )
            self.dropped_turns += (len(self.messages) - len(kept)) // 2
            self.messages, self.tokens, self.cache = kept, [], make_cache(self.model)
        pending = self.tokens[self._cached() :] + new
        pending, max_tokens = fit_context(pending, max_tokens, context, self._cached())
        self.tokens += new
        reply = []
        try:
            reply_options = replace(options, max_tokens=max_tokens)
            for chunk in stream_generate(self.model, self.tokenizer, pending, reply_options, self.cache, draft_model):
                if chunk.token is not None:
                    self.tokens.append(chunk.token)
                reply.append(chunk.text)
                yield chunk
        finally:
            # The reply's "</s>" (sampled, or added when cut short) closes the turn as the
            # template does; the cache may or may not hold it yet.
            self.tokens.append(self.tokenizer.eos_id)
            self._sync_cache()
            self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(reply)}]

    def _cached(self) -> int:
        return min(c.offset for c in self.cache)

    def _sync_cache(self):
        """Keep only cache entries that match self.tokens (an interrupt can leave layers uneven)."""
        keep = min(self._cached(), len(self.tokens))
        for c in self.cache:
            c.trim(c.offset - keep)


def conversation(tokenizer: Tokenizer, system: Optional[str], turns: List[Dict[str, str]], user: str) -> List[int]:
    """The tokens of the system message (if any), the finished turns and the new user message."""
    head = [{"role": "system", "content": system}] if system else []
    return tokenizer.encode(chat_prompt(head + turns + [{"role": "user", "content": user}]))


def room_for_reply(context: int, max_tokens: Optional[int]) -> int:
    """Tokens each turn keeps free for the reply: --max-tokens, else DEFAULT_MAX_TOKENS or half the context."""
    return min(DEFAULT_MAX_TOKENS, context // 2) if max_tokens is None else max_tokens


def check_room(model: Model, tokenizer: Tokenizer, system: Optional[str], max_tokens: Optional[int]):
    """Refuse, before the first turn, a --system or --max-tokens that leaves no room for a
    message: otherwise every turn would fail."""
    context = model.config.max_context_length
    reply = room_for_reply(context, max_tokens)
    base = len(conversation(tokenizer, system, [], ""))  # the system message and the template around a message
    if base + reply < context:
        return
    half = ", half the context" if reply == context // 2 else ""
    given = "--max-tokens" if max_tokens is not None else f"the default --max-tokens{half}"
    if not system:
        raise OpenELMError(
            f"--max-tokens {reply} leaves no room for a message in the model's context of {context} "
            f"(the chat template takes {base}): use at most {context - base - 1}"
        )
    system_tokens = base - len(conversation(tokenizer, None, [], ""))
    lower = f" or pass --max-tokens {context - base - 1} or less" if base + 1 < context else ""
    raise OpenELMError(
        f"the system message (--system) is {system_tokens} tokens: with the chat template and a reply of {reply} "
        f"({given}) it leaves no room for a message in the model's context of {context}: shorten it{lower}"
    )


def add_arguments(parser):
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--system", help="system message")
    parser.epilog = f"at the >> prompt: {commands_text()}; {KEYS}"


def commands_text() -> str:
    return "; ".join(f"{name} {what}" for name, what in COMMANDS.items())


def main(args):
    def room(model, tokenizer):  # before the Instruct notice: a refusal is one line
        check_room(model, tokenizer, args.system, args.max_tokens)

    options = generation_options(args)
    model, tokenizer, draft = load_for_cli(args, options, chat=True, check=room)
    if args.model is None:
        log.info(DEMO_NOTICE)
    context = model.config.max_context_length
    import readline  # noqa: F401  (arrow keys and history in input())

    session = ChatSession(model, tokenizer, args.system)
    log.info(HELP)
    told = False
    while True:
        try:
            user = input(">> ")
            user.encode("utf-8")  # bytes that are not UTF-8 arrive as lone surrogates (or fail to decode)
        except EOFError:
            print()
            return 0
        except Terminated:  # SIGTERM ends the chat (apps/cli.py: status 143); Ctrl-C only the line
            raise
        except KeyboardInterrupt:
            print()
            continue
        except UnicodeError:
            print("error: that line is not valid UTF-8; type it again", file=sys.stderr)
            continue
        if user.strip() in ("/quit", "/exit"):
            return 0
        if user.strip() == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if user.strip() == "/help":
            print(f"({commands_text()}; {KEYS})", file=sys.stderr)
            continue
        if not user.strip():
            continue
        try:
            for chunk in session.send(user, options, draft):
                if session.dropped_turns and not told:
                    told = True
                    print(
                        f"(the conversation outgrew the model's context of {context} tokens: "
                        "the oldest turns are dropped to make room)",
                        file=sys.stderr,
                    )
                print(chunk.text, end="", flush=True)
        except Terminated:  # the reply's cleanup ran (send's finally); the chat ends
            print()
            raise
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except OpenELMError as e:
            print(f"error: {e}", file=sys.stderr)
        print()
