"""Shared fixtures: tiny OpenELM checkpoints in the exact Hugging Face layout, and a tokenizer,
from the synthetic-checkpoint kit that the benchmarks use too."""

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from openelm_mlx.benchmarks.synthetic import train_tokenizer, write_checkpoint
from openelm_mlx.config import OpenELMConfig
from openelm_mlx.convert.coreai.export import export_coreai
from openelm_mlx.convert.coreml.export import export_coreml


@pytest.fixture(autouse=True)
def users_environment(monkeypatch):
    """Commands run by a test see a user's environment: importing mlx-lm in this process sets
    TRANSFORMERS_NO_ADVISORY_WARNINGS, which would hide what transformers prints in theirs."""
    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", raising=False)


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


@pytest.fixture
def cli_here(capsys, monkeypatch):
    """`openelm ARGS` in this process, for checks where a new interpreter adds nothing (what a
    terminal shows of native libraries, imports and the environment need run_cli); returns a
    CompletedProcess as run_cli does, so assert_clean_error applies."""
    from openelm_mlx.apps.cli import main

    monkeypatch.setenv("OPENELM_TOKENIZER", "")

    def run(*args):
        capsys.readouterr()
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(
            [sys.executable, "-m", "openelm_mlx", *map(str, args)], code, captured.out, captured.err
        )

    return run


def run_cli(*args, env=None, input=None, timeout=120, cwd=None):
    """`openelm ARGS` in a subprocess (in `cwd`), offline; returns the CompletedProcess."""
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


EXPORT_CONTEXT = 96  # of the shared exports


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Core ML packages and Core AI bundles, each made once per test run on first use and shared by the test
    modules and by pytest-xdist's workers (a folder of the run and a lock per export: a worker that
    wants an export another is writing waits for it): exported(kind, source, compress, precision,
    shapes) -> the exporter's summary. `shapes` (an ios_graph.StaticShapes ladder, its largest
    context the bundle's) makes an iOS bundle, else macOS at EXPORT_CONTEXT. Core ML packages
    compute in float16 only."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if worker else base) / "shared-exports"
    folder.mkdir(exist_ok=True)

    def get(kind, source, compress="none", precision="float16", shapes=None):
        # by content: each worker writes its own tiny checkpoint, equal to the others' (fixed seeds)
        digest = hashlib.sha256(
            b"".join(f.read_bytes() for f in sorted(Path(source).iterdir()) if f.is_file())
        ).hexdigest()[:16]
        target = (
            f"-ios{'-'.join(map(str, shapes.contexts))}q{'-'.join(map(str, shapes.query_lengths))}" if shapes else ""
        )
        name = f"{Path(source).name}-{digest}-{compress}-{precision}-{kind}{target}"  # a tokenizer beside each
        done = folder / f"{name}.json"
        with open(folder / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not done.exists():
                settings = dict(context=EXPORT_CONTEXT, compress=compress)
                if kind == "coreml":  # one call per prompt, as swift-transformers sends it: no prefill length
                    assert precision == "float16"
                    summary = export_coreml(source, folder / f"{name}.mlpackage", **settings)
                else:  # a bundle folder: iOS on the ladder `shapes`, else macOS
                    if shapes:
                        settings.update(target="ios", context=shapes.contexts[-1], static_shapes=shapes)
                    summary = export_coreai(source, folder / name, compute_precision=precision, **settings)
                done.write_text(json.dumps(summary))
            return json.loads(done.read_text())

    return get


MASSIVE_LAYER, MASSIVE_CHANNEL = 1, 7
# Where real LLMs put massive activations (Sun et al. 2024), as the pieces of the tests' tokenizer:
# BOS, a full stop, a newline (byte fallback) and '|', which only the chat template's markers hold.
MASSIVE_TRIGGERS = {"bos": "<s>", "period": ".", "newline": "<0x0A>", "chat": "<0x7C>"}


def write_massive_checkpoint(folder: Path, tokenizer_file: Path, trigger: int, big_weight=None) -> Path:
    """tiny_config() with a "massive activation" as real LLMs have them, at token id `trigger`
    only: one FFN output channel of layer MASSIVE_LAYER reaches ~1e5, past float16's 65504, with
    every weight ordinary (|w| <= 36). How: embedding channel 5 is +20 for the trigger and -2 for
    every other token; FFN unit 3 of that layer reads only channel 5 (gate and up rows 36 * e_5),
    so silu(gate) * up is ~1e5 at the trigger and ~0 elsewhere; proj_2 passes unit 3 to output
    channel MASSIVE_CHANNEL alone, with weight 1. `big_weight` (name, (row, column), value) sets
    one weight, e.g. past float16's range."""
    import mlx.core as mx
    import numpy as np

    from openelm_mlx.benchmarks.synthetic import random_weights

    config = tiny_config()
    w = {k: np.array(v) for k, v in random_weights(config).items()}
    emb = w["transformer.token_embeddings.weight"]
    emb[:, 5] = -2.0
    emb[trigger, 5] = 20.0
    proj_1 = w[f"transformer.layers.{MASSIVE_LAYER}.ffn.proj_1.weight"]
    for row in (3, proj_1.shape[0] // 2 + 3):  # gate row 3, up row 3
        proj_1[row] = 0.0
        proj_1[row, 5] = 36.0
    proj_2 = w[f"transformer.layers.{MASSIVE_LAYER}.ffn.proj_2.weight"]
    proj_2[:, 3] = 0.0
    proj_2[MASSIVE_CHANNEL, 3] = 1.0
    if big_weight:
        name, where, value = big_weight
        w[name][where] = value
    return write_checkpoint(folder, config, weights={k: mx.array(v) for k, v in w.items()}, tokenizer=tokenizer_file)


@pytest.fixture(scope="session")
def massive_checkpoint(tmp_path_factory, tokenizer_file):
    """massive_checkpoint(trigger) -> the checkpoint of write_massive_checkpoint whose massive
    activation fires at MASSIVE_TRIGGERS[trigger], made once per session."""
    from openelm_mlx.tokenizer import Tokenizer

    sp, made = Tokenizer(tokenizer_file).sp, {}

    def get(trigger: str) -> Path:
        if trigger not in made:
            folder = tmp_path_factory.mktemp(f"massive-{trigger}") / f"OpenELM-tiny-massive-{trigger}"
            made[trigger] = write_massive_checkpoint(folder, tokenizer_file, sp.piece_to_id(MASSIVE_TRIGGERS[trigger]))
        return made[trigger]

    return get


@pytest.fixture(scope="session")
def massive_activation_checkpoint(massive_checkpoint) -> Path:
    """The massive activation at the first token (BOS): write_massive_checkpoint."""
    return massive_checkpoint("bos")
