"""Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja) built
from a LLaMA-2-style sentencepiece model, for the runners that have no sentencepiece: the Swift
stacks (swift-transformers, mlx-swift-lm, Core AI) and transformers. They tokenize exactly as
sentencepiece does, with `</s>` in text read as the eos token as our Tokenizer.encode reads it.
Our own loading keeps using sentencepiece (tokenizer.py)."""

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, decoders, models, normalizers, processors

from .errors import OpenELMError
from .tokenizer import CHAT_TEMPLATE, Tokenizer

# The Swift runners and mlx-lm encode a rendered template without special tokens: it emits BOS.
TOKENIZER_CHAT_TEMPLATE = "{{ bos_token }}" + CHAT_TEMPLATE
Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
SPECIAL = (Piece.UNKNOWN, Piece.CONTROL)


def hf_tokenizer_files(
    sp_model: Tokenizer, instruct: bool = True, model_max_length: Optional[int] = None
) -> Dict[str, bytes]:
    """{"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} for the sentencepiece
    model `sp_model` (its bytes as Tokenizer read them), same bytes for the same model. A base
    model (`instruct` False) gets no chat template: a template is what tells mlx-lm and our loader
    to format chat turns."""
    proto = read_proto(sp_model)
    tokenizer = build_tokenizer(proto)
    files = {
        "tokenizer.json": tokenizer.to_str(pretty=True).encode() + b"\n",
        "tokenizer_config.json": to_json(tokenizer_config(proto, instruct, model_max_length)),
    }
    if instruct:
        files["chat_template.jinja"] = TOKENIZER_CHAT_TEMPLATE.encode()
    return files


def read_proto(sp_model: Tokenizer):
    """The model's pieces and settings (sentencepiece parsed the same bytes when it was loaded)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp_model.data)
    check_llama_form(sp_model.path, proto)
    return proto


def check_llama_form(path: Path, proto) -> None:
    """The tokenizer.json below reproduces LLaMA-2's sentencepiece setup only: byte-fallback BPE,
    no text normalization, a dummy-prefix space, spaces kept as they are."""
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    why = [
        (spec.model_type != spec.BPE, "not a BPE model"),
        (not spec.byte_fallback, "no byte fallback"),
        (spec.treat_whitespace_as_suffix, "whitespace as suffix"),
        (norm.name != "identity" or norm.precompiled_charsmap, f"normalization {norm.name!r}"),
        (not norm.add_dummy_prefix, "no dummy prefix"),
        (norm.remove_extra_whitespaces, "extra whitespace removed"),
        (any(p.type == Piece.USER_DEFINED for p in proto.pieces), "user-defined pieces"),
        ([spec.unk_id, spec.bos_id, spec.eos_id] != [0, 1, 2], "unk/bos/eos ids not 0/1/2"),
    ]
    reasons = [text for bad, text in why if bad]
    if reasons:
        raise OpenELMError(
            f"{path} is not a LLaMA-2-style sentencepiece model ({', '.join(reasons)}): tokenizer.json "
            "cannot reproduce it; pass LLaMA-2's tokenizer.model"
        )


def vocab_and_merges(proto) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """Every split of a normal piece into two normal pieces is a merge, ranked as sentencepiece's
    BPE ranks merges: by the merged piece's score, highest first (sentencepiece keeps no list).
    transformers' SentencePieceExtractor (convert_slow_tokenizer.py) derives them the same way."""
    pieces = [(p.piece, p.type == Piece.NORMAL, p.score) for p in proto.pieces]  # protobuf reads are slow
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    mergeable = {piece: i for i, (piece, normal, _) in enumerate(pieces) if normal}
    ranked = []
    for i, (s, normal, score) in enumerate(pieces):
        if not normal:
            continue
        for k in range(1, len(s)):
            left, right = mergeable.get(s[:k]), mergeable.get(s[k:])
            if left is not None and right is not None:
                ranked.append((-score, i, left, right, s[:k], s[k:]))
    ranked.sort()
    return vocab, [(r[4], r[5]) for r in ranked]


def build_tokenizer(proto) -> tokenizers.Tokenizer:
    """The legacy LLaMA form (transformers' LlamaConverter with legacy=True, the hub's Llama-2
    tokenizer.json): sentencepiece's dummy prefix as a Prepend normalizer, so the text after a
    special token starts with "▁" too, as sentencepiece encodes each part of our Tokenizer.encode.
    swift-transformers' Metaspace pre-tokenizer always splits on "▁", which would break the
    "▁▁" pieces of runs of spaces: hence no pre-tokenizer."""
    vocab, merges = vocab_and_merges(proto)
    unk, bos = (proto.pieces[i].piece for i in (proto.trainer_spec.unk_id, proto.trainer_spec.bos_id))
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
    )
    tokenizer.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in specials(proto)])
    return tokenizer


def specials(proto) -> List:
    return [p for p in proto.pieces if p.type in SPECIAL]


def tokenizer_config(proto, instruct: bool, model_max_length: Optional[int]) -> dict:
    """What transformers' and swift-transformers' AutoTokenizer read besides tokenizer.json."""
    spec, pieces = proto.trainer_spec, proto.pieces
    config = {
        # Not "LlamaTokenizer": transformers 5 builds that class's pipeline itself, ignoring the
        # one in tokenizer.json (its Metaspace adds no dummy space before a leading space: " x"
        # loses one), so mlx_lm.load would tokenize differently. This name makes transformers
        # and swift-transformers (Tokenizer.swift:158-199, 851-885) use tokenizer.json as it is.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": pieces[spec.bos_id].piece,
        "eos_token": pieces[spec.eos_id].piece,
        "unk_token": pieces[spec.unk_id].piece,
        "pad_token": None,
        # legacy: text after a special token starts with sentencepiece's space, as in our
        # Tokenizer.encode; chat prompts ("...</s>\n<|user|>") then give the same ids in both.
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {
                "content": p.piece,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, p in enumerate(pieces)
            if p.type in SPECIAL
        },
    }
    if model_max_length:
        config["model_max_length"] = model_max_length
    if instruct:
        config["chat_template"] = TOKENIZER_CHAT_TEMPLATE
    return config


def to_json(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()
