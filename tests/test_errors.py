"""Bad input: a one-line error that says what to do, exit code 1, no traceback, no partial output."""

import json
import shutil

import pytest
from conftest import assert_clean_error, run_cli, tiny_config

from openelm_mlx.benchmarks.synthetic import random_weights, write_checkpoint


@pytest.fixture
def checkpoint(tmp_path, tiny_checkpoint):
    """A private copy of the tiny checkpoint that a test may damage."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "model")


def convert_fails(source, tmp_path, *fragments):
    out = tmp_path / "out"
    result = run_cli("convert", source, "-o", out)
    assert_clean_error(result, *fragments)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary output left behind"
    return result


def test_missing_weights(checkpoint, tmp_path):
    (checkpoint / "model.safetensors").unlink()
    convert_fails(checkpoint, tmp_path, "no *.safetensors weights")


def test_corrupt_weights(checkpoint, tmp_path):
    (checkpoint / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" * 4)
    convert_fails(checkpoint, tmp_path, "is not a safetensors file", "download or convert it again")


def test_truncated_weights(checkpoint, tmp_path):
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    convert_fails(checkpoint, tmp_path, "is truncated")
    assert_clean_error(run_cli("generate", "--model", checkpoint, "-p", "hi"), "is truncated")


def test_config_field_missing(checkpoint, tmp_path):
    raw = json.loads((checkpoint / "config.json").read_text())
    del raw["num_kv_heads"]
    (checkpoint / "config.json").write_text(json.dumps(raw))
    convert_fails(checkpoint, tmp_path, "required field 'num_kv_heads' is missing")


def test_config_inconsistent(checkpoint, tmp_path):
    raw = json.loads((checkpoint / "config.json").read_text())
    raw["ffn_multipliers"] = raw["ffn_multipliers"][:-1]
    (checkpoint / "config.json").write_text(json.dumps(raw))
    convert_fails(checkpoint, tmp_path, "'ffn_multipliers' must list one value per layer (4), got 3")


def test_tensor_shape_mismatch(tmp_path, tokenizer_file):
    config = tiny_config()
    weights = random_weights(config)
    weights["transformer.layers.2.ffn.proj_2.weight"] = weights["transformer.layers.2.ffn.proj_2.weight"][:, :-32]
    src = write_checkpoint(tmp_path / "bad", config, weights, tokenizer_file)
    convert_fails(
        src, tmp_path, "wrong shapes: transformer.layers.2.ffn.proj_2.weight (128, 320) (expected (128, 352))"
    )


def test_tensor_names_mismatch(tmp_path, tokenizer_file):
    config = tiny_config()
    weights = random_weights(config)
    weights["model.layers.0.mlp.gate_proj.weight"] = weights.pop("transformer.layers.0.ffn.proj_1.weight")
    src = write_checkpoint(tmp_path / "bad", config, weights, tokenizer_file)
    convert_fails(
        src,
        tmp_path,
        "missing tensors: transformer.layers.0.ffn.proj_1.weight",
        "unexpected tensors: model.layers.0.mlp.gate_proj.weight",
    )


def test_output_exists_needs_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_error(run_cli("convert", tiny_checkpoint, "-o", out), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli("convert", tiny_checkpoint, "-o", out, "--force").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_unknown_model_path(tmp_path):
    assert_clean_error(run_cli("generate", "--model", tmp_path / "nope" / "x.y", "-p", "hi"), "no folder at")


def test_repo_offline(tmp_path):
    result = run_cli("convert", "apple/OpenELM-270M", "-o", tmp_path / "out", env={"HF_HOME": str(tmp_path / "hf")})
    assert_clean_error(result, "cannot download 'apple/OpenELM-270M'", "offline")


def test_pickle_checkpoint_is_refused(checkpoint, tmp_path):
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a pickle we will never open")
    convert_fails(checkpoint, tmp_path, "safetensors only", "pickle")


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--temp", "-0.5"], "--temp must be >= 0"),
        (["--top-p", "1.5"], "--top-p must be in [0, 1]"),
        (["--top-k", "-3"], "--top-k must be >= 0"),
        (["--min-p", "2"], "--min-p must be in [0, 1]"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    ],
)
def test_bad_sampling_values(tiny_checkpoint, flags, fragment):
    result = run_cli("generate", "--model", tiny_checkpoint, "-p", "hi", *flags)
    assert_clean_error(result, fragment)
    assert result.stdout == ""


def test_prompt_too_long(tiny_checkpoint):
    long_prompt = "the sea and the stars " * 60  # > 256 tokens of context
    result = run_cli("generate", "--model", tiny_checkpoint, "-p", long_prompt, "--max-tokens", "20")
    assert_clean_error(result, "exceeds the model's context of 256", "--truncate")
    ok = run_cli("generate", "--model", tiny_checkpoint, "-p", long_prompt, "--max-tokens", "20", "--truncate")
    assert ok.returncode == 0, ok.stderr
    assert "prompt: 236 tokens" in ok.stderr  # BOS + the last 235: 236 + 20 fill the 256 exactly


def test_missing_tokenizer_explains_llama2(tmp_path):
    config = tiny_config()
    src = write_checkpoint(tmp_path / "apple-like", config, random_weights(config))
    assert_clean_error(run_cli("generate", "--model", src, "-p", "hi"), "LLaMA-2 tokenizer", "--tokenizer")


def test_interrupted_conversion_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    from openelm_mlx.convert import hf_to_mlx

    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_to_mlx, "to_bytes", boom)
    with pytest.raises(KeyboardInterrupt):
        hf_to_mlx.convert(tiny_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
