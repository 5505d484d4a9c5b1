"""Core ML export: the saved package's spec, its execution by the numpy MIL executor against MLX,
compression, and the failures a broken package or an oversized input must produce."""

import json
import shutil
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

pytest.importorskip("coremltools")

from conftest import EXPORT_CONTEXT, EXPORT_PREFILL, tiny_config  # noqa: E402

from openelm_mlx.apps.cli import main as cli  # noqa: E402
from openelm_mlx.benchmarks.synthetic import write_checkpoint  # noqa: E402
from openelm_mlx.convert.coreml.executor import MILExecutor  # noqa: E402
from openelm_mlx.convert.coreml.export import export_coreml  # noqa: E402
from openelm_mlx.convert.coreml.runtime import CoreMLRunner  # noqa: E402
from openelm_mlx.convert.coreml.verify import verify_coreml  # noqa: E402
from openelm_mlx.convert.package import tokenizer_path  # noqa: E402
from openelm_mlx.convert.verify import LOGITS_RTOL  # noqa: E402
from openelm_mlx.errors import OpenELMError  # noqa: E402
from openelm_mlx.loader import load_model  # noqa: E402

CONTEXT, PREFILL = EXPORT_CONTEXT, EXPORT_PREFILL


@pytest.fixture
def packages(exported):
    """The shared Core ML exports (conftest): packages(source, compress) -> the export's summary."""
    return lambda source, compress="none": exported("coreml", source, compress)


def spec_of(package):
    import coremltools as ct

    return ct.models.MLModel(str(package), skip_model_load=True).get_spec()


def op_types(spec, function):
    block = spec.mlProgram.functions[function].block_specializations["CoreML8"]
    return [op.type for op in block.operations]


def test_spec_functions_states_metadata(tiny_checkpoint, packages):
    summary = packages(tiny_checkpoint)
    spec = spec_of(summary["output"])
    config = tiny_config()
    assert spec.specificationVersion == 9  # iOS18 / macOS15
    assert [f.name for f in spec.description.functions] == ["prefill", "decode"]
    assert spec.description.defaultFunctionName == "decode"
    for function in spec.description.functions:
        states = {s.name: list(s.type.stateType.arrayType.shape) for s in function.state}
        assert states == {
            f"{kind}_cache_{i}": [1, kv, CONTEXT, config.head_dim]
            for i, kv in enumerate(config.num_kv_heads)
            for kind in "kv"
        }
        assert len(set(config.num_kv_heads)) > 1  # the layer-wise scaling shows in the states
        assert [i.name for i in function.input] == ["input_ids", "position"]
        assert all(f.shortDescription for f in list(function.input) + list(function.output) + list(function.state))
        ops = op_types(spec, function.name)
        assert ops.count("scaled_dot_product_attention") == config.num_transformer_layers
        # coreml_update_state is stored as write_state + read_state
        assert ops.count("slice_update") == ops.count("write_state") == 2 * config.num_transformer_layers
    prefill_ids = spec.description.functions[0].input[0].type.multiArrayType.shapeRange.sizeRanges[1]
    assert (prefill_ids.lowerBound, prefill_ids.upperBound) == (1, PREFILL)
    meta = dict(spec.description.metadata.userDefined)
    assert meta["openelm.bos_token_id"] == "1" and meta["openelm.eos_token_id"] == "2"
    assert meta["openelm.context_length"] == str(CONTEXT) and meta["openelm.prefill_length"] == str(PREFILL)
    assert (
        meta["openelm.compression"] == "none" and meta["openelm.source_model"] == tiny_checkpoint.name
    )  # never a local path
    assert "<|assistant|>" in meta["openelm.chat_template"] and meta["openelm.toolkit_version"]
    assert tokenizer_path(summary["output"]).read_bytes() == (tiny_checkpoint / "tokenizer.model").read_bytes()
    # One copy of the fp16 weights shared by both functions (two would be > 4 bytes/parameter).
    assert 2.0 < summary["bytes_per_parameter"] < 2.4


def test_verify_uncompressed_matches_mlx(tiny_checkpoint, packages):
    summary = packages(tiny_checkpoint)
    report = verify_coreml(summary["output"], tiny_checkpoint, steps=16)
    assert report.ok and not report.weight_problems
    (mil,) = report.backends
    assert mil.steps[0].name.startswith("prefill[") and int(mil.steps[0].name[8:-1]) > 2 * PREFILL  # 3 blocks
    assert len(mil.steps) == 17 and mil.agreement == 1.0
    assert max(s.max_abs_diff for s in mil.steps) < mil.tolerance


def test_executor_against_original_fp32_weights(tiny_checkpoint, packages):
    """Independent of verify: run the package by hand against the float32 MLX model (original weights)."""
    from mlx_lm.models.cache import make_prompt_cache

    summary = packages(tiny_checkpoint)
    model, _ = load_model(tiny_checkpoint, "float32")
    runner = CoreMLRunner(summary["output"], "mil-reference")
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, 384, size=PREFILL + 5)]
    cache = make_prompt_cache(model)
    ref = np.array(model(mx.array([tokens]), cache=cache)[0, -1])
    got = runner.prefill(tokens)
    assert runner.position == len(tokens)
    assert np.abs(got - ref).max() < LOGITS_RTOL["float16"] * max(1, np.abs(ref).max())
    for _ in range(3):
        token = int(ref.argmax())
        ref = np.array(model(mx.array([[token]]), cache=cache)[0, -1])
        got = runner.decode(token)
        assert int(got.argmax()) == int(ref.argmax())


@pytest.mark.parametrize(
    "compress,constexpr,max_bpp",
    [
        ("int8", "constexpr_blockwise_shift_scale", 1.4),
        ("int4", "constexpr_blockwise_shift_scale", 0.9),
        ("palettize4", "constexpr_lut_to_dense", 0.9),
    ],
)
def test_compressed_exports_verify(tiny_checkpoint, packages, compress, constexpr, max_bpp):
    summary = packages(tiny_checkpoint, compress)
    spec = spec_of(summary["output"])
    for function in ("prefill", "decode"):
        assert op_types(spec, function).count(constexpr) == 1 + 4 * tiny_config().num_transformer_layers
    if compress == "int4":
        block = spec.mlProgram.functions["decode"].block_specializations["CoreML8"]
        op = next(o for o in block.operations if o.type == constexpr)
        data = op.inputs["data"].arguments[0].value.type.tensorType
        assert data.dataType == 25  # MIL proto INT4
    assert summary["bytes_per_parameter"] < max_bpp
    report = verify_coreml(summary["output"], tiny_checkpoint, steps=4)
    assert report.ok, report
    assert 0 < report.weight_max_rel_error < {"int8": 0.01, "int4": 0.12, "palettize4": 0.12}[compress]
    assert report.backends[0].agreement == 1.0


@pytest.mark.parametrize("compress", ["none", "int4"])
def test_corrupted_weights_fail_verify(tiny_checkpoint, packages, tmp_path, capsys, compress):
    broken = tmp_path / "broken.mlpackage"
    shutil.copytree(packages(tiny_checkpoint, compress)["output"], broken)
    shutil.copy(tokenizer_path(packages(tiny_checkpoint, compress)["output"]), tokenizer_path(broken))
    weights = next(broken.rglob("weight.bin"))
    data = bytearray(weights.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    weights.write_bytes(bytes(data))
    with pytest.raises(SystemExit) as exit_info:
        cli(["verify-coreml", str(broken), "--model", str(tiny_checkpoint), "--steps", "2"])
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "weight mismatch" in out and "FAILED" in out


def test_deleted_op_input_fails_verify(tiny_checkpoint, packages, tmp_path, capsys):
    broken = tmp_path / "broken.mlpackage"
    shutil.copytree(packages(tiny_checkpoint)["output"], broken)
    spec_file = next(broken.rglob("model.mlmodel"))
    spec = spec_of(broken)
    block = spec.mlProgram.functions["prefill"].block_specializations["CoreML8"]
    op = next(o for o in block.operations if o.type == "scaled_dot_product_attention")
    del op.inputs["key"]
    spec_file.write_bytes(spec.SerializeToString())
    with pytest.raises(SystemExit) as exit_info:
        cli(["verify-coreml", str(broken), "--model", str(tiny_checkpoint)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "cannot be loaded" in err and "Traceback" not in err


def test_context_is_enforced(tiny_checkpoint, packages, tmp_path):
    runner = CoreMLRunner(packages(tiny_checkpoint)["output"], "mil-reference")
    with pytest.raises(OpenELMError, match=f"context of {CONTEXT}"):
        runner.prefill([5] * (CONTEXT + 1))
    runner.prefill([5] * (CONTEXT - 1))
    runner.decode(7)
    with pytest.raises(OpenELMError, match="do not fit"):
        runner.decode(7)
    with pytest.raises(OpenELMError, match="exceed the package's context"):
        verify_coreml(packages(tiny_checkpoint)["output"], tiny_checkpoint, steps=CONTEXT, prompt="the sea")
    with pytest.raises(OpenELMError, match="max_context_length"):
        export_coreml(tiny_checkpoint, tmp_path / "big.mlpackage", context=tiny_config().max_context_length + 1)


def test_refuses_overwrite_and_bad_names(tiny_checkpoint, packages, capsys):
    out = packages(tiny_checkpoint)["output"]
    with pytest.raises(SystemExit) as exit_info:
        cli(["export-coreml", str(tiny_checkpoint), "-o", out])
    assert exit_info.value.code == 1 and "--force" in capsys.readouterr().err
    with pytest.raises(OpenELMError, match=".mlpackage"):
        export_coreml(tiny_checkpoint, out.replace(".mlpackage", ".bin"))


def test_executor_refuses_unknown_op(tmp_path):
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb

    @mb.program(input_specs=[mb.TensorSpec((2,))], opset_version=ct.target.iOS18)
    def prog(x):
        return mb.sin(x=x, name="y")

    ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18, skip_model_load=True).save(
        str(tmp_path / "sin.mlpackage")
    )
    with pytest.raises(OpenELMError, match="no implementation of op 'sin'"):
        MILExecutor(tmp_path / "sin.mlpackage").run("main", {"x": np.zeros(2, np.float32)}, {})


def test_export_from_quantized_mlx_folder(tokenizer_file, tmp_path):
    """A 4-bit MLX folder is dequantized, then exported; verify compares with that same folder.
    Two layers: the quantized source is the point, not the depth (an export takes seconds a layer)."""
    source = write_checkpoint(tmp_path / "f32", tiny_config(layers=2), tokenizer=tokenizer_file)
    model, _ = load_model(source, "float32")
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    folder = tmp_path / "q4"
    folder.mkdir()
    config = model.config.to_dict() | {"quantization": {"group_size": 32, "bits": 4}}
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    shutil.copy(tokenizer_file, folder / "tokenizer.model")
    out = export_coreml(folder, tmp_path / "q4.mlpackage", context=64, prefill_length=32)["output"]
    report = verify_coreml(out, folder, steps=2)
    assert report.ok and report.backends[0].agreement == 1.0


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predicts on macOS 15+ only")
def test_coreml_runtime_matches_executor(tiny_checkpoint, packages):
    out = packages(tiny_checkpoint)["output"]
    report = verify_coreml(out, tiny_checkpoint, steps=8)
    coreml = next(b for b in report.backends if b.backend == "coreml")
    assert coreml.ok and coreml.agreement == 1.0
    a, b = CoreMLRunner(out, "coreml"), CoreMLRunner(out, "mil-reference")
    tokens = list(range(3, 3 + PREFILL + 3))
    ref = b.prefill(tokens)
    assert np.abs(a.prefill(tokens) - ref).max() < LOGITS_RTOL["float16"] * max(1, np.abs(ref).max())
