"""`openelm generate --backend mil-reference|coreml|coreai` runs an exported package through the
same sampling and statistics code as MLX."""

import sys

import pytest
from conftest import assert_clean_error, run_cli

from openelm_mlx import generate, load

PROMPT = "the quick brown fox jumps over the lazy dog and the stars"  # > one 16-token prefill block


@pytest.fixture(scope="module")
def package(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("coremltools")
    from openelm_mlx.convert.coreml.export import export_coreml

    out = tmp_path_factory.mktemp("pkg") / "tiny.mlpackage"
    export_coreml(tiny_checkpoint, out, context=64, prefill_length=16)
    return out


@pytest.fixture(scope="module")
def coreai_model(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("coreai.runtime")
    from openelm_mlx.convert.coreai.export import export_coreai

    out = tmp_path_factory.mktemp("aimodel") / "tiny.aimodel"
    export_coreai(tiny_checkpoint, out, context=64, prefill_length=16, compute_precision="float32")
    return out


@pytest.mark.parametrize("backend", ["mil-reference", "coreai"])
def test_package_backend_generates_what_mlx_generates(request, tiny_checkpoint, backend):
    model_path = request.getfixturevalue("package" if backend == "mil-reference" else "coreai_model")
    result = run_cli("generate", "--model", model_path, "--backend", backend, "-p", PROMPT, "--max-tokens", "10")
    assert result.returncode == 0, result.stderr
    model, tokenizer = load(tiny_checkpoint)
    assert len(tokenizer.encode(PROMPT)) > 16
    assert result.stdout == generate(model, tokenizer, PROMPT, max_tokens=10) + "\n"
    assert "generation: " in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("backend", ["mil-reference", "coreai"])
def test_package_context_is_enforced(request, backend):
    model_path = request.getfixturevalue("package" if backend == "mil-reference" else "coreai_model")
    result = run_cli(
        "generate", "--model", model_path, "--backend", backend, "-p", "the sea " * 20, "--max-tokens", "30"
    )
    assert_clean_error(result, "exceeds the model's context of 64")


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS")
def test_coreml_backend_needs_macos(package):
    assert_clean_error(run_cli("generate", "--model", package, "--backend", "coreml", "-p", "hi"), "macOS")


@pytest.mark.parametrize("backend,suffix", [("mil-reference", ".mlpackage"), ("coreai", ".aimodel")])
def test_backend_needs_its_package(tiny_checkpoint, backend, suffix):
    assert_clean_error(
        run_cli("generate", "--model", tiny_checkpoint, "--backend", backend, "-p", "hi"), f"runs {suffix} packages"
    )
    assert_clean_error(run_cli("generate", "--backend", backend, "-p", "hi"), f"needs --model OUT{suffix}")
