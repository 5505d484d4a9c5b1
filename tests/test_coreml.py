"""Core ML export in swift-transformers' contract (apple-runners.md section 5): the saved package's
spec, its execution by the Python twin of that runner on the numpy MIL executor against MLX,
compression, and the failures a broken package or an oversized input must produce."""

import json
import shutil
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tokenizers import Tokenizer

pytest.importorskip("coremltools")

from conftest import EXPORT_CONTEXT, tiny_config  # noqa: E402

from openelm_mlx.apps.cli import main as cli  # noqa: E402
from openelm_mlx.benchmarks.synthetic import write_checkpoint  # noqa: E402
from openelm_mlx.cache import make_cache  # noqa: E402
from openelm_mlx.convert.coreml.executor import MILExecutor  # noqa: E402
from openelm_mlx.convert.coreml.export import export_coreml  # noqa: E402
from openelm_mlx.convert.coreml.swift_transformers import (  # noqa: E402
    CoreMLRunner,
    generate,
    logits_sizes,
    sampler,
    swift_inputs,
)
from openelm_mlx.convert.coreml.verify import verify_coreml  # noqa: E402
from openelm_mlx.convert.package_input import tokenizer_folder  # noqa: E402
from openelm_mlx.convert.verify import LOGITS_RTOL  # noqa: E402
from openelm_mlx.errors import OpenELMError  # noqa: E402
from openelm_mlx.hf_tokenizer import hf_tokenizer_files  # noqa: E402
from openelm_mlx.loader import DEMO_MODEL, load_model  # noqa: E402
from openelm_mlx.tokenizer import find_tokenizer  # noqa: E402

CONTEXT = EXPORT_CONTEXT
FLOAT16, INT32 = 65552, 131104  # ArrayFeatureType data types in Core ML's protobuf


@pytest.fixture
def packages(exported):
    """The shared Core ML exports (conftest): packages(source, compress) -> the export's summary."""
    return lambda source, compress="none": exported("coreml", source, compress)


def spec_of(package):
    import coremltools as ct

    return ct.models.MLModel(str(package), skip_model_load=True).get_spec()


def op_types(spec):
    block = spec.mlProgram.functions["main"].block_specializations["CoreML8"]
    return [op.type for op in block.operations]


def ranges(feature):
    return [(r.lowerBound, r.upperBound) for r in feature.type.multiArrayType.shapeRange.sizeRanges]


def test_spec_is_swift_transformers_contract(tiny_checkpoint, packages):
    """Names, ranks, dtypes and ranges that LanguageModel.swift reads (apple-runners.md section 5)."""
    summary = packages(tiny_checkpoint)
    spec = spec_of(summary["output"])
    config = tiny_config()
    assert spec.specificationVersion == 9  # iOS18 / macOS15: states
    assert list(spec.mlProgram.functions) == ["main"] and not spec.description.functions
    inputs = {f.name: f for f in spec.description.input}
    assert list(inputs) == ["inputIds", "causalMask"]
    assert inputs["inputIds"].type.multiArrayType.dataType == INT32
    (lo, hi) = ranges(inputs["inputIds"])[1]
    assert ranges(inputs["inputIds"])[0] == (1, 1) and (lo, hi) == (1, CONTEXT) and hi - lo > 1  # :501
    assert inputs["causalMask"].type.multiArrayType.dataType == FLOAT16
    assert ranges(inputs["causalMask"]) == [(1, 1), (1, 1), (1, 1), (1, CONTEXT + 1)]  # [1, 1, 1, T + 1]
    states = {s.name: s.type.stateType.arrayType for s in spec.description.state}
    assert list(states) == ["keyCache", "valueCache"]
    kv_max = max(config.num_kv_heads)
    assert len(set(config.num_kv_heads)) > 1  # the padding to kv_max is exercised
    for state in states.values():
        assert state.dataType == FLOAT16
        assert list(state.shape) == [config.num_transformer_layers, 1, kv_max, CONTEXT, config.head_dim]
    per_head = 2 * CONTEXT * config.head_dim * 2  # K and V, float16: the summary's KV memory is the states'
    assert summary["kv_bytes"] == config.num_transformer_layers * kv_max * per_head
    assert summary["kv_bytes_unpadded"] == sum(config.num_kv_heads) * per_head
    assert logits_sizes(spec) == [config.vocab_size]  # what check_graph holds openelm.vocab_size to
    (logits,) = spec.description.output
    assert logits.name == "logits" and logits.type.multiArrayType.dataType == FLOAT16
    assert all(f.shortDescription for f in list(inputs.values()) + [logits] + list(spec.description.state))
    ops = op_types(spec)
    assert ops.count("scaled_dot_product_attention") == config.num_transformer_layers
    # coreml_update_state is stored as write_state + read_state; the cache is read once per state
    assert ops.count("slice_update") == ops.count("write_state") == 2 * config.num_transformer_layers
    meta = dict(spec.description.metadata.userDefined)
    assert meta["co.huggingface.exporters.name"] == tiny_checkpoint.name  # never a local path
    assert meta["co.huggingface.exporters.task"] == "text-generation"
    assert meta["openelm.bos_token_id"] == "1" and meta["openelm.eos_token_id"] == "2"
    assert meta["openelm.context_length"] == meta["openelm.prefill_length"] == str(CONTEXT)
    assert meta["openelm.compression"] == "none" and meta["openelm.source_model"] == tiny_checkpoint.name
    assert "<|assistant|>" in meta["openelm.chat_template"] and meta["openelm.toolkit_version"]
    beside = tokenizer_folder(summary["output"])
    assert summary["tokenizer"] == str(beside)
    files = hf_tokenizer_files(find_tokenizer(tiny_checkpoint), False, CONTEXT)  # a base model: no template
    files["tokenizer.model"] = (tiny_checkpoint / "tokenizer.model").read_bytes()
    assert {p.name: p.read_bytes() for p in beside.iterdir()} == files
    # The fp16 weights once (2 bytes/parameter), the float32 norms and RoPE tables besides.
    assert 2.0 < summary["bytes_per_parameter"] < 2.4


def test_verify_uncompressed_matches_mlx(tiny_checkpoint, packages):
    summary = packages(tiny_checkpoint)
    report = verify_coreml(summary["output"], tiny_checkpoint, steps=16)
    assert report.ok and not report.weight_problems
    (mil,) = report.backends
    assert mil.steps[0].name.startswith("prefill[") and int(mil.steps[0].name[8:-1]) > 16  # the prompt, one call
    assert len(mil.steps) == 17 and mil.agreement == 1.0
    assert max(s.max_abs_diff for s in mil.steps) < mil.tolerance


def test_executor_against_original_fp32_weights(tiny_checkpoint, packages):
    """Independent of verify: run the package by hand against the float32 MLX model (original weights)."""
    from mlx_lm.models.cache import make_prompt_cache

    summary = packages(tiny_checkpoint)
    model, _ = load_model(tiny_checkpoint, "float32")
    runner = CoreMLRunner(summary["output"], "mil-reference")
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, 384, size=21)]
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


def mlx_greedy(model, prompt, steps):
    cache, out = make_cache(model), list(prompt)
    logits = model(mx.array([prompt]), cache=cache)
    for _ in range(steps):
        out.append(int(mx.argmax(logits[0, -1])))
        logits = model(mx.array([[out[-1]]]), cache=cache)
    return out


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_swift_transformers_loop_gives_mlx_greedy_tokens(request, tmp_path, packages, which):
    """The twin of Generation.swift's loop (resetState, all prompt ids with a zero mask of T + 1,
    then the last id only, CPU argmax) on the float16 package gives MLX's greedy tokens, float32."""
    if which == "tiny":
        source = request.getfixturevalue("tiny_checkpoint")
        package = packages(source)["output"]
    else:
        source = DEMO_MODEL
        package = export_coreml(DEMO_MODEL, tmp_path / "demo.mlpackage", context=64)["output"]
    model, tokenizer = load_model(source, "float32")[0], find_tokenizer(source, None)
    # The app's ids: tokenizer.json beside the package, special tokens added (Generation.swift:184)
    text = "Once upon a time"  # MLX's top-2 margins >= 0.1 on the demo model, 14x the error
    prompt = Tokenizer.from_file(str(tokenizer_folder(package) / "tokenizer.json")).encode(text).ids
    assert prompt == tokenizer.encode(text) and prompt[0] == tokenizer.bos_id
    expected = mlx_greedy(model, prompt, 16)
    runner = CoreMLRunner(package, "mil-reference")
    assert generate(runner, prompt, 16, eos_token_id=tokenizer.eos_id) == expected
    # eos ends the loop and is not appended (Generation.swift:98-100)
    stop = expected[len(prompt) + 5]
    cut = expected.index(stop, len(prompt))
    assert generate(runner, prompt, 16, eos_token_id=stop) == expected[:cut]


def test_sampler_draws_as_swift_transformers():
    """Temperature, then top-k, then the inverse CDF of one uniform draw (Decoders.swift:23-55)."""
    scores = np.array([0.0, 3.0, 1.0, 2.5, -1.0], np.float32)
    assert sampler(top_k=1, seed=0)(scores) == 1  # top-1 is greedy
    draws = [sampler(temperature=0.7, top_k=2, seed=s)(scores) for s in range(400)]
    assert set(draws) == {1, 3}  # only the two best
    p1 = 1 / (1 + np.exp((2.5 - 3.0) / 0.7))  # softmax of the two at temperature 0.7
    assert abs(draws.count(1) / 400 - p1) < 0.08  # 3.3 sigma of a binomial(400, 0.67)


def test_causal_mask_input_values_and_length_do_not_change_logits(tiny_checkpoint, packages):
    """Only the mask's length carries information (the position); the graph masks causally by
    itself, so non-zero, -inf or huge mask values change nothing, a reference-export mask one
    short at prefill (export.py:161: length = q) gives the same as the runner's q + 1, and row j of
    a prefill is what a prefill of the first j + 1 tokens gives (no token sees a later one)."""
    executor = MILExecutor(packages(tiny_checkpoint)["output"])
    tokens = [1, 17, 99, 250, 3, 42, 7]
    rng = np.random.default_rng(1)

    def run(inputs):
        state = executor.make_state("main")
        return executor.run("main", inputs, state)["logits"], state

    base, base_state = run(swift_inputs(tokens, len(tokens)))
    q = len(tokens)
    for mask in (
        rng.normal(0, 100, (1, 1, 1, q + 1)).astype(np.float16),
        np.full((1, 1, 1, q + 1), -np.inf, np.float16),
        np.full((1, 1, 1, q + 1), 6e4, np.float16),
        np.zeros((1, 1, 1, q), np.float16),  # one short: clamped to position 0
    ):
        logits, state = run({"inputIds": np.array([tokens], np.int32), "causalMask": mask})
        assert np.array_equal(logits, base)
        assert all(np.array_equal(state[k], base_state[k]) for k in state)
    for j in (0, 3):
        row, _ = run(swift_inputs(tokens[: j + 1], j + 1))
        assert np.abs(row[0, -1].astype(np.float32) - base[0, j].astype(np.float32)).max() < 0.02 * max(
            1.0, float(np.abs(base[0, j]).max())
        )


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
    assert op_types(spec).count(constexpr) == 1 + 4 * tiny_config().num_transformer_layers
    if compress == "int4":
        block = spec.mlProgram.functions["main"].block_specializations["CoreML8"]
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
    shutil.copytree(tokenizer_folder(packages(tiny_checkpoint, compress)["output"]), tokenizer_folder(broken))
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
    block = spec.mlProgram.functions["main"].block_specializations["CoreML8"]
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


def test_refuses_overwrite_and_bad_names(tiny_checkpoint, packages, capsys, tmp_path):
    out = packages(tiny_checkpoint)["output"]
    with pytest.raises(SystemExit) as exit_info:
        cli(["export-coreml", str(tiny_checkpoint), "-o", out])
    assert exit_info.value.code == 1 and "--force" in capsys.readouterr().err
    with pytest.raises(OpenELMError, match=".mlpackage"):
        export_coreml(tiny_checkpoint, out.replace(".mlpackage", ".bin"))
    (tmp_path / "m.tokenizer").mkdir()  # the tokenizer folder alone is refused too, before any work
    with pytest.raises(OpenELMError, match="m.tokenizer.*--force"):
        export_coreml(tiny_checkpoint, tmp_path / "m.mlpackage")
    assert not (tmp_path / "m.mlpackage").exists()


def test_names_never_collide_with_core_ai_or_older_exports(tiny_checkpoint, tmp_path):
    """NAME.mlpackage + NAME.tokenizer/ go beside a Core AI bundle folder NAME/ (with its tokenizer/)
    and beside NAME.tokenizer.model of older exports, without --force and touching neither. An
    Instruct model's tokenizer folder carries the chat template (emitting BOS) too."""
    (tmp_path / "NAME" / "tokenizer").mkdir(parents=True)
    (tmp_path / "NAME" / "metadata.json").write_text("{}")
    (tmp_path / "NAME.tokenizer.model").write_bytes(b"old")
    source = shutil.copytree(tiny_checkpoint, tmp_path / "src" / "OpenELM-tiny-Instruct")
    export_coreml(source, tmp_path / "NAME.mlpackage", context=8)
    template = (tmp_path / "NAME.tokenizer" / "chat_template.jinja").read_text()
    assert template.startswith("{{ bos_token }}") and "<|assistant|>" in template
    shutil.rmtree(tmp_path / "src")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "NAME",
        "NAME.mlpackage",
        "NAME.tokenizer",
        "NAME.tokenizer.model",
    ]
    assert (tmp_path / "NAME.tokenizer.model").read_bytes() == b"old"
    assert (tmp_path / "NAME" / "metadata.json").read_text() == "{}"


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
    out = export_coreml(folder, tmp_path / "q4.mlpackage", context=64)["output"]
    report = verify_coreml(out, folder, steps=2)
    assert report.ok and report.backends[0].agreement == 1.0


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predicts on macOS 15+ only")
def test_coreml_runtime_matches_executor(tiny_checkpoint, packages):
    out = packages(tiny_checkpoint)["output"]
    report = verify_coreml(out, tiny_checkpoint, steps=8)
    coreml = next(b for b in report.backends if b.backend == "coreml")
    assert coreml.ok and coreml.agreement == 1.0
    a, b = CoreMLRunner(out, "coreml"), CoreMLRunner(out, "mil-reference")
    tokens = list(range(3, 24))
    ref = b.prefill(tokens)
    assert np.abs(a.prefill(tokens) - ref).max() < LOGITS_RTOL["float16"] * max(1, np.abs(ref).max())
