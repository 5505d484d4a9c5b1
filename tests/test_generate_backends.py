"""`openelm generate --backend mil-reference|coreml` runs an exported package through the same
sampling and statistics code as MLX."""

import sys

import pytest
from conftest import assert_clean_error, run_cli

from openelm_mlx import generate, load

pytest.importorskip("coremltools")


@pytest.fixture(scope="module")
def package(tiny_checkpoint, tmp_path_factory):
    from openelm_mlx.convert.coreml.export import export_coreml

    out = tmp_path_factory.mktemp("pkg") / "tiny.mlpackage"
    export_coreml(tiny_checkpoint, out, context=64, prefill_length=16)
    return out


def test_mil_reference_backend_generates_what_mlx_generates(package, tiny_checkpoint):
    prompt = "the quick brown fox jumps over the lazy dog and the stars"  # > one 16-token prefill block
    result = run_cli("generate", "--model", package, "--backend", "mil-reference", "-p", prompt, "--max-tokens", "10")
    assert result.returncode == 0, result.stderr
    model, tokenizer = load(tiny_checkpoint)
    assert len(tokenizer.encode(prompt)) > 16
    assert result.stdout == generate(model, tokenizer, prompt, max_tokens=10) + "\n"
    assert "generation: " in result.stderr.splitlines()[-1]


def test_package_context_is_enforced(package):
    result = run_cli(
        "generate", "--model", package, "--backend", "mil-reference", "-p", "the sea " * 20, "--max-tokens", "30"
    )
    assert_clean_error(result, "exceeds the model's context of 64")


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS")
def test_coreml_backend_needs_macos(package):
    assert_clean_error(run_cli("generate", "--model", package, "--backend", "coreml", "-p", "hi"), "macOS")


def test_backend_needs_a_package(tiny_checkpoint):
    assert_clean_error(
        run_cli("generate", "--model", tiny_checkpoint, "--backend", "mil-reference", "-p", "hi"),
        "runs .mlpackage packages",
    )
