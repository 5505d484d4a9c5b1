"""Hugging Face Hub sources, offline: the real huggingface_hub code resolves a repo id from a
local cache laid out as the Hub lays it out; nothing executable is ever fetched."""

import fnmatch
import hashlib
import shutil
from pathlib import Path

import mlx.core as mx
from conftest import assert_clean_error, run_cli, tiny_config

from openelm_mlx import load
from openelm_mlx.benchmarks.synthetic import write_checkpoint
from openelm_mlx.checkpoint import HUB_PATTERNS

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root, repo_id, checkpoint):
    """The Hub cache's own layout: each file once in blobs/ under its hash, and
    snapshots/COMMIT/NAME -> ../../blobs/HASH relative links, as huggingface_hub makes them."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in checkpoint.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / digest)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", digest))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root


def test_repo_id_resolves_from_the_hub_cache_offline(tmp_path, tiny_checkpoint, monkeypatch):
    cache = fake_hub_cache(tmp_path / "hub", "apple/OpenELM-tiny", tiny_checkpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    model, tokenizer = load("apple/OpenELM-tiny")
    reference, _ = load(tiny_checkpoint)
    tokens = mx.array([tokenizer.encode("the sea")])
    assert mx.abs(model(tokens) - reference(tokens)).max().item() == 0


def test_sharded_snapshot_of_links_loads(tmp_path, tiny_checkpoint, tokenizer_file):
    """An index and shards that are links out of the snapshot folder into blobs/ are read: the
    index names files in its own folder, and those may be links."""
    weights = dict(mx.load(str(tiny_checkpoint / "model.safetensors")))
    sharded = write_checkpoint(tmp_path / "sharded", tiny_config(), weights, tokenizer_file, shards=2)
    cache = fake_hub_cache(tmp_path / "hub", "apple/OpenELM-tiny", sharded)
    snapshot = cache / "models--apple--OpenELM-tiny" / "snapshots" / COMMIT
    assert (snapshot / "model.safetensors.index.json").is_symlink()
    model, tokenizer = load(snapshot)
    reference, _ = load(tiny_checkpoint)
    tokens = mx.array([tokenizer.encode("the sea")])
    assert mx.abs(model(tokens) - reference(tokens)).max().item() == 0


def test_cli_with_repo_id_offline(tmp_path, tiny_checkpoint):
    cache = fake_hub_cache(tmp_path / "hub", "apple/OpenELM-tiny", tiny_checkpoint)
    env = {"HF_HUB_CACHE": str(cache)}
    ok = run_cli("generate", "--model", "apple/OpenELM-tiny", "-p", "the sea", "--max-tokens", "4", env=env)
    assert ok.returncode == 0, ok.stderr
    missing = run_cli("generate", "--model", "apple/OpenELM-3B", "-p", "x", env=env)
    assert_clean_error(missing, "no model folder at 'apple/OpenELM-3B', and cannot download", "offline")


def test_only_safe_files_are_downloaded():
    def fetched(name):
        return any(fnmatch.fnmatch(name, p) for p in HUB_PATTERNS)

    assert fetched("model.safetensors") and fetched("model-00001-of-00002.safetensors")
    assert fetched("model.safetensors.index.json") and fetched("config.json")
    for unsafe in ("modeling_openelm.py", "configuration_openelm.py", "pytorch_model.bin"):
        assert not fetched(unsafe)
