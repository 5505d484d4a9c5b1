"""The LLaMA-2 sentencepiece tokenizer that OpenELM uses, streaming detokenization, chat prompts."""

import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import sentencepiece as spm

from .errors import OpenELMError

EOS_TEXT = "</s>"
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
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise OpenELMError(
                f"{self.path} is not a sentencepiece model ({e}): pass LLaMA-2's tokenizer.model"
            ) from None
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = True) -> List[int]:
        # "</s>" in a chat prompt is the eos token, as Hugging Face's tokenizer splits it.
        ids = [self.bos_id] if bos else []
        for i, part in enumerate(text.split(EOS_TEXT)):
            if i:
                ids.append(self.eos_id)
            if part:
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
    if folder is not None:
        try:
            config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            config = None
        if isinstance(config, dict):
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


def find_tokenizer(model_folder: Optional[Path], tokenizer: Optional[str] = None) -> Tokenizer:
    """--tokenizer (a file, folder or repo id) first, then the model folder, then $OPENELM_TOKENIZER."""
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
    raise OpenELMError(NO_TOKENIZER)


def _tokenizer_file(candidate, must_exist: bool) -> Optional[Path]:
    path = Path(candidate).expanduser()
    if path.is_file():
        return path
    if (path / "tokenizer.model").is_file():
        return path / "tokenizer.model"
    if not must_exist:
        return None
    if not path.exists() and "/" in str(candidate) and not str(candidate).startswith((".", "/", "~")):
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
