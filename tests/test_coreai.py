"""Core AI export, run by Apple's own runtime (the reference runtime in coreai-core on Linux):
the saved model's functions, states and metadata, its logits and greedy tokens against MLX,
compression, corrupted files, and generation with the demo model."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coreai.runtime")

from conftest import EXPORT_CONTEXT, EXPORT_PREFILL, assert_clean_error, run_cli, tiny_config  # noqa: E402

from openelm_mlx import generate, load  # noqa: E402
from openelm_mlx.apps.cli import main as cli  # noqa: E402
from openelm_mlx.convert.coreai.export import export_coreai  # noqa: E402
from openelm_mlx.convert.coreai.runtime import CoreAIRunner  # noqa: E402
from openelm_mlx.convert.coreai.verify import verify_coreai  # noqa: E402
from openelm_mlx.convert.coreai.weights import named_constants  # noqa: E402
from openelm_mlx.convert.package import tokenizer_path  # noqa: E402
from openelm_mlx.errors import OpenELMError  # noqa: E402
from openelm_mlx.loader import DEMO_MODEL  # noqa: E402

CONTEXT, PREFILL = EXPORT_CONTEXT, EXPORT_PREFILL


@pytest.fixture
def packages(exported):
    """The shared Core AI exports (conftest): packages(source, compress, precision) -> the summary."""
    return lambda source, compress="none", precision="float16": exported("coreai", source, compress, precision)


def test_functions_states_metadata(tiny_checkpoint, packages):
    from coreai.authoring import AIModelAsset

    summary = packages(tiny_checkpoint)
    package, config = Path(summary["output"]), tiny_config()
    assert sorted(p.name for p in package.iterdir()) == ["main.hash", "main.mlirb", "metadata.json"]
    assert AIModelAsset.load(package).summary(include_statistics=False).function_names == ["prefill", "decode"]
    runner = CoreAIRunner(package)
    expected_states = {
        f"{kind}_cache_{i}": [1, kv, CONTEXT, config.head_dim]
        for i, kv in enumerate(config.num_kv_heads)
        for kind in "kv"
    }
    assert len(set(config.num_kv_heads)) > 1  # the layer-wise scaling shows in the states
    for name, function in runner._functions.items():
        desc = function.desc
        assert desc.input_names == ["input_ids", "position"] and desc.output_names == ["logits"]
        assert {s: list(desc.state_descriptor(s).shape) for s in desc.state_names} == expected_states
        assert {desc.state_descriptor(s).dtype for s in desc.state_names} == {"float16"}
        assert desc.output_descriptor("logits").shape == [1, config.vocab_size]
        assert desc.input_descriptor("input_ids").shape == ([1, 1] if name == "decode" else [1, -1])
    meta = json.loads((package / "metadata.json").read_text())["creatorDefinedMetadata"]
    assert meta["openelm.bos_token_id"] == "1" and meta["openelm.eos_token_id"] == "2"
    assert meta["openelm.context_length"] == str(CONTEXT) and meta["openelm.prefill_length"] == str(PREFILL)
    assert meta["openelm.compression"] == "none" and meta["openelm.compute_precision"] == "float16"
    assert meta["openelm.source_model"] == tiny_checkpoint.name  # never a local path
    assert json.loads(meta["openelm.ffn_scale_exponents"]) == [0] * config.num_transformer_layers
    assert json.loads(meta["openelm.config"])["num_kv_heads"] == config.num_kv_heads
    assert "<|assistant|>" in meta["openelm.chat_template"] and meta["openelm.toolkit_version"]
    assert tokenizer_path(package).read_bytes() == (tiny_checkpoint / "tokenizer.model").read_bytes()
    # One copy of the float16 weights shared by both functions (two would be > 4 bytes/parameter).
    assert 2.0 < summary["bytes_per_parameter"] < 2.3


def test_float16_export_matches_mlx_over_three_prefill_blocks(tiny_checkpoint, packages):
    report = verify_coreai(packages(tiny_checkpoint)["output"], tiny_checkpoint, steps=16)
    assert report.ok and not report.weight_problems and report.weight_max_rel_error < 5e-4  # float16 rounding
    (coreai,) = report.backends
    assert coreai.steps[0].name.startswith("prefill[") and int(coreai.steps[0].name[8:-1]) > 2 * PREFILL
    assert len(coreai.steps) == 17 and coreai.agreement == 1.0
    assert max(s.max_abs_diff for s in coreai.steps) < coreai.tolerance


def test_float32_export_matches_mlx_closely(tiny_checkpoint, packages):
    report = verify_coreai(packages(tiny_checkpoint, precision="float32")["output"], tiny_checkpoint, steps=4)
    (coreai,) = report.backends
    assert report.ok and report.weight_max_rel_error == 0 and coreai.agreement == 1.0
    assert max(s.max_abs_diff for s in coreai.steps) < 1e-4  # Apple's runtime vs MLX, both float32


@pytest.mark.parametrize(
    "compress,max_bpp,max_rel_error", [("int8", 1.25, 0.01), ("int4", 0.75, 0.1), ("palettize4", 0.7, 0.1)]
)
def test_compressed_exports_verify(tiny_checkpoint, packages, compress, max_bpp, max_rel_error):
    summary = packages(tiny_checkpoint, compress)
    assert summary["bytes_per_parameter"] < max_bpp
    constants = named_constants(Path(summary["output"]))
    proj = "transformer.layers.0.ffn.proj_1.weight"
    if compress == "palettize4":
        indices = constants[proj + ".indices"]
        assert indices.max() <= 15 and constants[proj + ".lut"].shape == (1, indices.shape[1] // 16, 16, 1)
    else:  # int8 and int4 alike: one scale per 32 inputs ([in, out] here), as Apple's presets
        data, scale = constants[proj + ".data"], constants[proj + ".scale"]
        assert data.dtype == np.int8 and np.abs(data).max() == (7 if compress == "int4" else 127)
        assert scale.shape == (data.shape[0] // 32, data.shape[1])
    report = verify_coreai(summary["output"], tiny_checkpoint, steps=8)
    assert report.ok, report
    assert 0 < report.weight_max_rel_error < max_rel_error
    assert len(report.backends[0].steps) == 9


def test_int4_is_packed_two_values_per_byte(tiny_checkpoint, packages):
    from openelm_mlx.convert.coreai.weights import resources

    package = Path(packages(tiny_checkpoint, "int4")["output"])
    blob = resources(package / "main.mlirb")["transformer.layers.0.ffn.proj_1.weight.data"]
    config = tiny_config()
    assert len(blob) == 2 * config.ffn_dims[0] * config.model_dim // 2  # [in, 2 * ffn] nibbles


def copy_package(package, to):
    shutil.copytree(package, to)
    shutil.copy(tokenizer_path(package), tokenizer_path(to))
    return to


def flip(path: Path, start: int, n: int = 64):
    data = bytearray(path.read_bytes())
    for i in range(start, start + n):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def one_line_error(capsys, argv, *fragments):
    """`openelm ARGV` in this process: exit 1 and one line on stderr naming the problem."""
    with pytest.raises(SystemExit) as exit_info:
        cli([str(a) for a in argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 1 and len(lines) == 1 and lines[0].startswith(f"openelm {argv[0]}: error: ")
    assert all(f in lines[0] for f in fragments), lines[0]


def test_flipped_bytes_fail_verify(tiny_checkpoint, packages, tmp_path, capsys):
    package = packages(tiny_checkpoint, "int4")["output"]
    for where in (0.01, 0.5, 0.99):  # program, weights, end of the file
        broken = copy_package(package, tmp_path / f"broken-{where}.aimodel")
        flip(broken / "main.mlirb", int((broken / "main.mlirb").stat().st_size * where))
        one_line_error(capsys, ["verify-coreai", broken, "--model", tiny_checkpoint], "does not match its main.hash")


def test_weights_are_checked_even_with_a_matching_hash(tiny_checkpoint, packages, tmp_path, capsys):
    """Someone edits a weight and rewrites main.hash: the weights read back from main.mlirb fail."""
    import hashlib

    broken = copy_package(packages(tiny_checkpoint)["output"], tmp_path / "edited.aimodel")
    mlirb = broken / "main.mlirb"
    flip(mlirb, mlirb.stat().st_size // 2)
    (broken / "main.hash").write_bytes(hashlib.sha256(mlirb.read_bytes()).digest())
    with pytest.raises(SystemExit) as exit_info:
        cli(["verify-coreai", str(broken), "--model", str(tiny_checkpoint), "--steps", "2"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1 and "weight mismatch" in out and out.rstrip().endswith("FAILED")


def test_context_is_enforced_and_default_prompt_fits(tiny_checkpoint, tmp_path):
    out = export_coreai(tiny_checkpoint, tmp_path / "short.aimodel", context=8, prefill_length=4)["output"]
    report = verify_coreai(out, tiny_checkpoint)  # the default prompt and 16 steps, clipped to 8 tokens
    assert (
        report.ok
        and [s.name for s in report.backends[0].steps][0] == "prefill[1]"
        and len(report.backends[0].steps) == 8
    )
    runner = CoreAIRunner(out)
    runner.prefill([5] * 7)
    runner.decode(6)
    with pytest.raises(OpenELMError, match="do not fit"):
        runner.decode(6)
    with pytest.raises(OpenELMError, match="exceed the package's context"):
        verify_coreai(out, tiny_checkpoint, prompt="the quick brown fox jumps over the lazy dog")


def test_refuses_overwrite_and_bad_names(tiny_checkpoint, packages, capsys):
    out = packages(tiny_checkpoint)["output"]
    one_line_error(capsys, ["export-coreai", tiny_checkpoint, "-o", out], "--force")
    with pytest.raises(OpenELMError, match=r"must end in \.aimodel"):
        export_coreai(tiny_checkpoint, out.replace(".aimodel", ".mlpackage"))
    one_line_error(capsys, ["verify-coreai", tiny_checkpoint, "--model", tiny_checkpoint], "not a .aimodel")


@pytest.mark.parametrize(
    "command,module,extra,suffix",
    [("export-coreai", "coreai", "coreai", ".aimodel"), ("export-coreml", "coremltools", "coreml", ".mlpackage")],
)
def test_missing_extra_gives_the_install_hint(tiny_checkpoint, tmp_path, command, module, extra, suffix):
    (tmp_path / module).mkdir()  # a package that refuses to import, ahead of the real one
    (tmp_path / module / "__init__.py").write_text("raise ImportError('not installed')\n")
    result = run_cli(command, tiny_checkpoint, "-o", tmp_path / f"x{suffix}", env={"PYTHONPATH": str(tmp_path)})
    assert_clean_error(result, f"pip install 'openelm-mlx[{extra}]'")


def test_demo_model_generates_the_same_text_as_mlx(tmp_path):
    """The shipped demo model, exported (float32 compute: Apple's Linux runtime is ~300x slower in
    float16) and run by `openelm generate --backend coreai`: the same greedy text as MLX."""
    prompt = "And it came to pass, when the men of the city saw the king and all the people of the land, that they"
    model, tokenizer = load(DEMO_MODEL)
    assert len(tokenizer.encode(prompt)) + 24 <= 64  # the context is not the point here
    out = export_coreai(
        DEMO_MODEL, tmp_path / "demo.aimodel", context=64, prefill_length=16, compute_precision="float32"
    )
    # a subprocess: what the terminal shows of the runtime's native output is checked too
    package = run_cli(
        "generate", "-p", prompt, "--max-tokens", "24", "--temp", "0", "--backend", "coreai", "--model", out["output"]
    )
    assert package.returncode == 0, package.stderr
    assert package.stdout == generate(model, tokenizer, prompt, max_tokens=24, temp=0.0) + "\n"
    assert len(package.stdout.split()) > 10
    assert package.stderr.splitlines()[-1].startswith("prompt: ") and "C++" not in package.stderr
    assert "ODIE" not in package.stderr  # the runtime's load messages are kept off the terminal


def test_bench_times_the_model_through_apples_runtime(tiny_checkpoint, packages):
    from openelm_mlx.benchmarks.bench import run_benchmark
    from openelm_mlx.benchmarks.package_bench import RUNTIME_NOTES
    from openelm_mlx.benchmarks.report import markdown

    results = run_benchmark(
        [packages(tiny_checkpoint)["output"]],
        prompt_tokens=20,
        generation_tokens=4,
        trials=2,
        warmup=0,
        backend="coreai",
        progress=False,
    )
    (entry,) = results["configurations"]
    assert entry["error"] is None and entry["activation_dtype"] == "float16"
    trials = entry["implementations"]["coreai"]["trials"]
    assert len(trials) == 2 and all(t["prefill_tps"] > 0 and len(t["inter_token_s"]) == 4 for t in trials)
    assert entry["runtime"] == RUNTIME_NOTES["coreai"] and RUNTIME_NOTES["coreai"] in markdown(results)
    if sys.platform == "linux":
        assert RUNTIME_NOTES["coreai"] == "Apple's reference runtime on Linux (coreai-core), not device speed"
