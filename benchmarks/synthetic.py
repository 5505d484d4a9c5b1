"""Synthetic OpenELM checkpoints in the exact Hugging Face layout: random weights of any shape and
a small LLaMA-style sentencepiece tokenizer. The one kit that the tests and the benchmarks share."""

import json
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import sentencepiece as spm
from mlx.utils import tree_flatten
from sentencepiece import sentencepiece_model_pb2

from openelm_mlx.config import OpenELMConfig
from openelm_mlx.model import Model

TEXT = """The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time there was a little model that wanted to write stories about the sea and the stars.
It read every book in the library, learned the shapes of words, and dreamed of long sentences.
Café, naïve, jalapeño and déjà vu are words with accents; 東京 and 🙂 need more than one byte.
"""


def random_weights(config: OpenELMConfig, seed: int = 0, dtype: mx.Dtype = mx.float32) -> Dict[str, mx.array]:
    """HF-named weights, drawn lazily (nothing is computed until a tensor is used or saved), so a
    3B-shaped checkpoint never sits in memory whole. Matrices are uniform with variance 1/fan_in,
    which keeps activations at a realistic scale (uniform: three times faster to draw than normal
    on a CPU); norm weights are 1 +- 0.1, so a bug that ignores them shows."""
    shapes = [(name, p.shape) for name, p in tree_flatten(Model(config).parameters())]
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    weights = {}
    for (name, shape), key in zip(shapes, keys):
        noise = mx.random.uniform(-1, 1, shape, key=key)
        w = 1 + 0.1 * noise if name.endswith("norm.weight") else noise * (3 / shape[-1]) ** 0.5
        weights[name] = w.astype(dtype)
    return weights


def write_checkpoint(
    folder: Path,
    config: OpenELMConfig,
    weights: Optional[Dict[str, mx.array]] = None,
    tokenizer: Optional[Path] = None,
    shards: int = 1,
    seed: int = 0,
    dtype: mx.Dtype = mx.float32,
) -> Path:
    """config.json, generation_config.json and model.safetensors (or `shards` files and their
    index) as an apple/OpenELM repo has them, plus tokenizer.model when given. Without `weights`,
    random ones; they are evaluated shard by shard, so memory stays near one shard."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = config.to_dict()
    # What the Hub's config.json holds beside the fields we read: remote code we never run.
    raw.update(auto_map={"AutoConfig": "configuration_openelm.OpenELMConfig"}, torch_dtype=str(dtype).split(".")[-1])
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    ids = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (folder / "generation_config.json").write_text(json.dumps(ids))
    weights = dict(weights) if weights is not None else random_weights(config, seed, dtype)
    names = sorted(weights)
    if shards == 1:
        mx.save_safetensors(str(folder / "model.safetensors"), {k: mx.array(weights[k]) for k in names})
    else:
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: mx.array(weights.pop(k)) for k in names[i::shards]}
            mx.save_safetensors(str(folder / file), part)
            weight_map.update(dict.fromkeys(part, file))
        total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    if tokenizer is not None:
        (folder / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return folder


def train_tokenizer(folder: Path, vocab_size: int = 384, text: str = TEXT) -> Path:
    """A LLaMA-style sentencepiece BPE model (unk 0, bos 1, eos 2, byte fallback, so any text
    encodes) trained on a few lines: folder/tokenizer.model with exactly `vocab_size` pieces. A few
    lines support a few hundred pieces; a larger vocabulary (32000 for the released shapes) is
    padded with UNUSED pieces that the encoder never emits."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(text * 20)
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=min(vocab_size, 384),
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        # LLaMA-2's settings: text kept as it is (no NFKC, spaces kept), so transformers' LLaMA
        # tokenizer (under mlx_lm.load) splits every text as sentencepiece does.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    corpus.unlink()
    (folder / "tokenizer.vocab").unlink()
    path = folder / "tokenizer.model"
    proto = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
    unused = sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED
    for i in range(vocab_size - len(proto.pieces)):
        proto.pieces.add(piece=f"<unused{i}>", score=0.0, type=unused)
    path.write_bytes(proto.SerializeToString())
    return path
