"""The LLaMA-2 sentencepiece tokenizer that OpenELM uses, streaming detokenization, chat prompts."""

import os
import re
from pathlib import Path
from typing import Dict, List, Optional

import sentencepiece as spm

from .errors import OpenELMError
from .files import is_repo_id, read_bytes, read_json

EOS_TEXT = "</s>"
# LLaMA-2's tokenizer.model is 500 KB; the largest sentencepiece models in use are a few MB.
MAX_TOKENIZER_BYTES = 64 * 1024**2
# Apple's instruction-tuning template as Jinja, for tools that render it themselves (Hugging Face
# and mlx-lm tokenizers, apps): the same text as chat_prompt() below.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
NO_TOKENIZER = (
    "no tokenizer found: Apple's OpenELM repos ship none, the models use the LLaMA-2 tokenizer. "
    "Pass --tokenizer PATH/tokenizer.model (any copy of LLaMA-2's, e.g. from meta-llama/Llama-2-7b-hf), "
    "set OPENELM_TOKENIZER, or put tokenizer.model in the model folder"
)


class Tokenizer:
    def __init__(self, model_file):
        self.path = Path(model_file)
        self.data = read_bytes(self.path, MAX_TOKENIZER_BYTES)  # what the folder writers copy, read once
        try:
            if not self.data:
                raise ValueError("the file is empty")
            self.sp = spm.SentencePieceProcessor(model_proto=self.data)
        except (RuntimeError, ValueError) as e:
            why = str(e).removeprefix("INTERNAL: ")  # sentencepiece's C++ parse failure is no help to show
            raise OpenELMError(
                f"{self.path} is not a sentencepiece model"
                + (f" ({why})" if len(why) < 60 else "")
                + ": pass LLaMA-2's tokenizer.model"
            ) from None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()
        if self.bos_id < 0 or self.eos_id < 0:
            raise OpenELMError(
                f"{self.path} defines no {'<s>' if self.bos_id < 0 else '</s>'} piece, which OpenELM's "
                "prompts need: pass LLaMA-2's tokenizer.model"
            )
        # sentencepiece holds exactly one unknown piece (unk_id); only the control pieces need a
        # look at every id, one call each (asking both of every id took twice as long: 22 ms for 32,000)
        special = [self.sp.unk_id(), *filter(self.sp.is_control, range(self.vocab_size))]
        self.special_ids = {self.sp.id_to_piece(i): i for i in special}
        longest_first = sorted(self.special_ids, key=len, reverse=True)
        self.specials = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    def encode(self, text: str, bos: bool = True) -> List[int]:
        # The text of a special piece is that token ("</s>" in a chat prompt is eos), as Hugging
        # Face's tokenizers read it (our tokenizer.json, hf_tokenizer.py); sentencepiece would
        # spell it out. Each part between them gets sentencepiece's dummy-prefix space.
        ids = [self.bos_id] if bos else []
        for part in self.specials.split(text):
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: List[int]) -> str:
        return self.sp.decode(list(ids))

    def detokenizer(self, context: Optional[List[int]] = None) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self.sp, context)


def chat_prompt(messages: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
    """Apple's instruction-tuning template: `<|role|>\\ncontent</s>\\n` per turn."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}{EOS_TEXT}\n" for m in messages)
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def is_instruct_model(source, folder: Optional[Path] = None) -> bool:
    """Whether a model is instruction-tuned (wants chat_prompt). Apple's config.json does not say so.
    A folder with a tokenizer_config.json says it explicitly (`openelm convert` writes the chat
    template there for Instruct models only). Apple's repos have none, and their release name is
    the only sign: apple/OpenELM-270M-Instruct."""
    path = Path(folder) / "tokenizer_config.json" if folder is not None else None
    if path is not None and os.path.lexists(path):
        config = read_json(path)  # a broken or hostile file is an error, not a silent "base model"
        if not isinstance(config, dict):
            raise OpenELMError(f"{path} must hold a JSON object")
        return bool(config.get("chat_template"))
    return "-instruct" in Path(str(source)).name.lower()


class StreamingDetokenizer:
    """Text for each new token, holding back incomplete UTF-8 (byte-fallback pieces) and keeping
    the leading space that sentencepiece drops at the start of a decode."""

    def __init__(self, sp, context: Optional[List[int]] = None):
        self.sp = sp
        self.window = list(context or [])[-1:]  # one complete token of context keeps its space
        self.emitted = len(sp.decode(self.window))

    def add(self, token: int) -> str:
        self.window.append(token)
        text = self.sp.decode(self.window)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        new, self.emitted = text[self.emitted :], len(text)
        if len(self.window) > 16:  # restart the window on the last, complete token
            self.window = self.window[-1:]
            self.emitted = len(self.sp.decode(self.window))
        return new

    def flush(self) -> str:
        text = self.sp.decode(self.window)
        new, self.emitted = text[self.emitted :], len(text)
        return new


def find_tokenizer(model_folder: Optional[Path], tokenizer: Optional[str] = None, required: bool = True):
    """--tokenizer (a file, folder or repo id) first, then the model folder, then $OPENELM_TOKENIZER.
    Without any: an error, or None when not `required`."""
    for candidate, origin in (
        (tokenizer, "--tokenizer"),
        (model_folder, None),
        (os.environ.get("OPENELM_TOKENIZER"), "OPENELM_TOKENIZER"),
    ):
        if not candidate:
            continue
        path = _tokenizer_file(candidate, must_exist=origin is not None)
        if path is not None:
            return Tokenizer(path)
    if required:
        raise OpenELMError(NO_TOKENIZER)
    return None


def check_tokenizer_fits(tokenizer: Tokenizer, config) -> None:
    """A tokenizer must have exactly the model's vocab_size pieces: a larger one produces ids past
    the embedding (an out-of-range read), a smaller one cannot decode what the model samples."""
    if tokenizer.vocab_size != config.vocab_size:
        raise OpenELMError(
            f"the tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces but the model's vocab_size "
            f"is {config.vocab_size}: pass the tokenizer the model was trained with (--tokenizer)"
        )


def _tokenizer_file(candidate, must_exist: bool) -> Optional[Path]:
    """The tokenizer.model a candidate names; whatever exists there is returned for Tokenizer() to
    check (a FIFO or a broken link is an error, not a reason to look elsewhere)."""
    path = Path(candidate).expanduser()
    if path.is_dir():
        path = path / "tokenizer.model"
    if os.path.lexists(path):
        return path
    if not must_exist:
        return None
    if is_repo_id(str(candidate)):
        return _download_tokenizer(str(candidate))
    raise OpenELMError(f"no tokenizer.model at {candidate}. {NO_TOKENIZER}")


def _download_tokenizer(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, "tokenizer.model"))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise OpenELMError(
            f"cannot get tokenizer.model from '{repo_id}' ({type(e).__name__}). {NO_TOKENIZER}"
        ) from None
