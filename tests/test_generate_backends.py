"""`openelm generate --backend mil-reference|coreml|coreai` runs an exported package through the
same sampling and statistics code as MLX."""

import sys
from pathlib import Path

import pytest
from conftest import EXPORT_CONTEXT, assert_clean_error

from openelm_mlx import generate, load

PROMPT = "the quick brown fox jumps over the lazy dog and the stars"  # > one 16-token prefill block


@pytest.fixture
def package(tiny_checkpoint, exported):
    pytest.importorskip("coremltools")
    return Path(exported("coreml", tiny_checkpoint)["output"])


@pytest.fixture
def coreai_model(tiny_checkpoint, exported):
    pytest.importorskip("coreai.runtime")  # wheels for macOS arm64 and Linux x86-64, Python 3.11+
    return Path(exported("coreai", tiny_checkpoint, precision="float32")["output"])


@pytest.mark.parametrize("backend", ["mil-reference", "coreai"])
def test_package_backend_generates_what_mlx_generates(request, cli_here, tiny_checkpoint, backend):
    model_path = request.getfixturevalue("package" if backend == "mil-reference" else "coreai_model")
    result = cli_here("generate", "--model", model_path, "--backend", backend, "-p", PROMPT, "--max-tokens", "10")
    assert result.returncode == 0, result.stderr
    model, tokenizer = load(tiny_checkpoint)
    assert len(tokenizer.encode(PROMPT)) > 16
    assert result.stdout == generate(model, tokenizer, PROMPT, max_tokens=10) + "\n"
    assert "generation: " in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("backend", ["mil-reference", "coreai"])
def test_package_context_is_enforced(request, cli_here, backend):
    model_path = request.getfixturevalue("package" if backend == "mil-reference" else "coreai_model")
    result = cli_here(
        "generate", "--model", model_path, "--backend", backend, "-p", "the sea " * 20, "--max-tokens", "60"
    )
    assert_clean_error(result, f"exceeds the model's context of {EXPORT_CONTEXT}")


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS")
def test_coreml_backend_needs_macos(package, cli_here):
    assert_clean_error(cli_here("generate", "--model", package, "--backend", "coreml", "-p", "hi"), "macOS")


@pytest.mark.parametrize(
    "backend,wrong,missing",
    [
        ("mil-reference", "runs .mlpackage packages", "needs --model OUT.mlpackage"),
        ("coreai", "is not a Core AI bundle (no metadata.json)", "needs --model OUT (an exported bundle folder)"),
    ],
)
def test_backend_needs_its_package(tiny_checkpoint, cli_here, backend, wrong, missing):
    assert_clean_error(cli_here("generate", "--model", tiny_checkpoint, "--backend", backend, "-p", "hi"), wrong)
    assert_clean_error(cli_here("generate", "--backend", backend, "-p", "hi"), missing)
