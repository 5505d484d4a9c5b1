"""`openelm chat`: a REPL for Instruct models that keeps the KV cache across turns."""

import sys
from typing import Iterator, List, Optional

from mlx_lm.models.cache import make_prompt_cache

from openelm_mlx.errors import OpenELMError
from openelm_mlx.generate import GenerationChunk, check_sampling, fit_context, stream_generate
from openelm_mlx.model import Model
from openelm_mlx.tokenizer import Tokenizer, chat_prompt

from .generate import add_model_arguments, add_sampling_arguments, load_for_cli, sampling_options

HELP = "type a message; /reset starts over, /quit (or Ctrl-D) leaves, Ctrl-C stops a reply"


class ChatSession:
    """A conversation whose tokens stay in the KV cache: each turn feeds only what is new."""

    def __init__(self, model: Model, tokenizer: Tokenizer, system: Optional[str] = None):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.reset()

    def reset(self):
        self.cache = make_prompt_cache(self.model)
        self.tokens: List[int] = []  # the conversation so far, as the template tokenizes it

    def turn_tokens(self, user: str) -> List[int]:
        if not self.tokens:
            messages = [{"role": "system", "content": self.system}] if self.system else []
            return self.tokenizer.encode(chat_prompt(messages + [{"role": "user", "content": user}]))
        # The previous reply ended with "</s>"; the template puts a newline after it.
        return self.tokenizer.encode("\n" + chat_prompt([{"role": "user", "content": user}]), bos=False)

    def send(self, user: str, **sampling) -> Iterator[GenerationChunk]:
        new = self.turn_tokens(user)
        pending = self.tokens[self._cached() :] + new
        fit_context(pending, sampling.get("max_tokens", 256), self.model.config.max_context_length, self._cached())
        self.tokens += new
        try:
            for chunk in stream_generate(self.model, self.tokenizer, pending, cache=self.cache, **sampling):
                if chunk.token is not None:
                    self.tokens.append(chunk.token)
                yield chunk
        finally:
            # The reply's "</s>" (sampled, or added when cut short) closes the turn as the
            # template does; the cache may or may not hold it yet.
            self.tokens.append(self.tokenizer.eos_id)
            self._sync_cache()

    def _cached(self) -> int:
        return min(c.offset for c in self.cache)

    def _sync_cache(self):
        """Keep only cache entries that match self.tokens (an interrupt can leave layers uneven)."""
        keep = min(self._cached(), len(self.tokens))
        for c in self.cache:
            c.trim(c.offset - keep)


def add_arguments(parser):
    add_model_arguments(parser)
    add_sampling_arguments(parser, max_tokens=512)
    parser.add_argument("--system", help="system message")


def main(args):
    check_sampling(args.max_tokens, args.temp, args.top_p, args.top_k, args.min_p, args.repetition_penalty)
    import readline  # noqa: F401  (arrow keys and history in input())

    model, tokenizer = load_for_cli(args)
    session = ChatSession(model, tokenizer, args.system)
    print(HELP, file=sys.stderr)
    while True:
        try:
            user = input(">> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        if user.strip() in ("/quit", "/exit"):
            return 0
        if user.strip() == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not user.strip():
            continue
        try:
            for chunk in session.send(user, **sampling_options(args)):
                print(chunk.text, end="", flush=True)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        except OpenELMError as e:
            print(f"error: {e}; /reset starts a new conversation", end="", file=sys.stderr)
        print()
