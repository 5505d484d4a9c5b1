"""Shared fixtures: tiny OpenELM checkpoints in the exact Hugging Face layout, and a tokenizer,
from the synthetic-checkpoint kit that the benchmarks use too."""

from pathlib import Path

import pytest

from openelm_mlx.benchmarks.synthetic import train_tokenizer, write_checkpoint
from openelm_mlx.config import OpenELMConfig


def tiny_config(vocab_size: int = 384, layers: int = 4, **kwargs) -> OpenELMConfig:
    """A layer-wise-scaled config small enough for tests: per-layer heads 4..8, ffn 64..512."""
    return OpenELMConfig.layerwise(
        layers, 128, 16, vocab_size=vocab_size, ffn_dim_divisor=32, max_context_length=256, **kwargs
    )


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    """A LLaMA-style sentencepiece model (bos 1, eos 2, byte fallback) trained on a few lines."""
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer_file) -> Path:
    """A float32 Hugging Face-layout checkpoint of tiny_config() with random weights and a tokenizer."""
    return write_checkpoint(tmp_path_factory.mktemp("hf") / "OpenELM-tiny", tiny_config(), tokenizer=tokenizer_file)


def run_cli(*args, env=None, input=None, timeout=120, cwd=None):
    """`openelm ARGS` in a subprocess (in `cwd`), offline; returns the CompletedProcess."""
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
        cwd=cwd,
    )


def assert_clean_error(result, *fragments, exit=1):
    """Exit status `exit` and exactly one line on stderr, `openelm <command>: error: ...`, holding
    every fragment; no traceback."""
    assert result.returncode == exit, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    command = result.args[3]  # [python, -m, openelm_mlx, COMMAND, ...]
    assert len(lines) == 1 and lines[0].startswith(f"openelm {command}: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
