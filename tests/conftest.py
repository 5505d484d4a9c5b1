"""Shared fixtures: tiny OpenELM checkpoints in the exact Hugging Face layout, and a tokenizer."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import sentencepiece as spm
from mlx.utils import tree_flatten

from openelm_mlx.config import OpenELMConfig
from openelm_mlx.model import Model

TEXT = """The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time there was a little model that wanted to write stories about the sea and the stars.
It read every book in the library, learned the shapes of words, and dreamed of long sentences.
Café, naïve, jalapeño and déjà vu are words with accents; 東京 and 🙂 need more than one byte.
"""


def tiny_config(vocab_size: int = 384, layers: int = 4, **kwargs) -> OpenELMConfig:
    """A layer-wise-scaled config small enough for tests: per-layer heads 4..8, ffn 64..512."""
    return OpenELMConfig.layerwise(
        layers, 128, 16, vocab_size=vocab_size, ffn_dim_divisor=32, max_context_length=256, **kwargs
    )


def random_weights(config: OpenELMConfig, seed: int = 0, dtype=np.float32) -> dict:
    """HF-named numpy weights with a scale that keeps activations realistic."""
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in tree_flatten(Model(config).parameters())}
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            out[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(dtype)
        else:
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(dtype)
    return out


def write_hf_checkpoint(
    folder: Path, config: OpenELMConfig, weights: dict, tokenizer: Path = None, shards: int = 1
) -> Path:
    """config.json, generation_config.json and model.safetensors (or shards with an index)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = config.to_dict()
    raw.update(
        auto_map={"AutoConfig": "configuration_openelm.OpenELMConfig"},
        torch_dtype="float32",
        activation_fn_name="swish",
        normalization_layer_name="rms_norm",
    )
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    arrays = {k: mx.array(v) for k, v in weights.items()}
    if shards == 1:
        mx.save_safetensors(str(folder / "model.safetensors"), arrays)
    else:
        names = sorted(arrays)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: arrays[k] for k in names[i::shards]}
            mx.save_safetensors(str(folder / file), part)
            weight_map.update({k: file for k in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if tokenizer is not None:
        (folder / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
    return folder


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    """A LLaMA-style sentencepiece model (bos 1, eos 2, byte fallback) trained on a few lines."""
    folder = tmp_path_factory.mktemp("tokenizer")
    corpus = folder / "corpus.txt"
    corpus.write_text(TEXT * 20)
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=384,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return folder / "tokenizer.model"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_file) -> Path:
    """A float32 Hugging Face-layout checkpoint of tiny_config() with random weights and a tokenizer."""
    config = tiny_config()
    return write_hf_checkpoint(
        tmp_path_factory.mktemp("hf") / "OpenELM-tiny", config, random_weights(config), tokenizer_file
    )


def run_cli(*args, env=None, input=None, timeout=120):
    """`openelm ARGS` in a subprocess, offline; returns the CompletedProcess."""
    import os
    import subprocess
    import sys

    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENELM_TOKENIZER": "", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "openelm_mlx", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        input=input or "",
        timeout=timeout,
    )


def assert_clean_error(result, *fragments):
    """Non-zero exit, one line on stderr naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("openelm "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
