"""The iOS static-shape LanguageBundle model (convert/coreai/ios_graph.py) driven by the twin of
Apple's StaticShapeEngine (convert/coreai/static_engine.py) through Apple's runtime: the contract
the Swift engine reads, and MLX's greedy tokens over a prompt longer than one window plus 32
decode steps, float16 compute, for every compression. Small ladders (ctx 64/128, q 8/16) keep the
float16 interpreter (~300x slower than float32) to seconds; exports are shared in the module."""

import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("coreai.runtime")

from openelm_mlx.convert.compression import BITS  # noqa: E402
from openelm_mlx.convert.coreai.export import save  # noqa: E402
from openelm_mlx.convert.coreai.ios_graph import MASKED, StaticShapes, build_program  # noqa: E402
from openelm_mlx.convert.coreai.static_engine import StaticShapeRunner, causal_mask  # noqa: E402
from openelm_mlx.convert.coreai.weights import named_constants, package_weights  # noqa: E402
from openelm_mlx.convert.numerics import fold_ffn_scales  # noqa: E402
from openelm_mlx.convert.package import EMBEDDING, describe, model_weights  # noqa: E402
from openelm_mlx.convert.verify import FLOAT16_SUM_RTOL, compare  # noqa: E402
from openelm_mlx.errors import OpenELMError  # noqa: E402
from openelm_mlx.loader import DEMO_MODEL, load_model  # noqa: E402
from openelm_mlx.model import Model  # noqa: E402
from openelm_mlx.tokenizer import find_tokenizer  # noqa: E402

CONTEXT, SMALLEST, QUERY = 128, 64, (8, 16)
SHAPES = StaticShapes.ladder(CONTEXT, SMALLEST, QUERY)
COMPRESSIONS = ("none", "int8", "int4", "palettize4", "ios-preset")
PROMPT = list(range(5, 45))  # 40 tokens: prompt_opt windows of 16, then an extend
STEPS = 32


def export_ios(source, output: Path, compress: str, shapes=SHAPES, precision="float16") -> Path:
    desc, folder = describe(source, CONTEXT, 16, compress, 32, precision, COMPRESSIONS, target="ios")
    save(build_program(desc, shapes), desc.metadata(find_tokenizer(folder, None)), output)
    return output


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """bundles(source, compress) -> the saved .aimodel, each exported once per module."""
    folder, made = tmp_path_factory.mktemp("ios"), {}

    def get(source, compress="none"):
        key = (str(source), compress)
        if key not in made:
            made[key] = export_ios(source, folder / f"{Path(source).name}-{compress}.aimodel", compress)
        return made[key]

    return get


def test_contract_as_the_swift_engine_reads_it(tiny_checkpoint, bundles):
    from conftest import tiny_config
    from coreai.authoring import AIModelAsset

    package, config = bundles(tiny_checkpoint), tiny_config()
    v, h, hd, layers = config.vocab_size, config.model_dim, config.head_dim, config.num_transformer_layers
    rows = max(config.num_kv_heads) * hd
    assert len(set(config.num_kv_heads)) > 1  # the per-layer kv heads the padded cache holds
    names = AIModelAsset.load(package).summary(include_statistics=False).function_names
    assert sorted(names) == sorted(SHAPES.function_names()) and SHAPES.contexts == (64, 128)
    runner = StaticShapeRunner(package)
    assert runner.max_query_length == 16 and runner.info.context == CONTEXT
    desc = runner._function("load_embeddings").desc
    assert list(desc.input_names) == [] and list(desc.output_names) == ["embedding_table"]
    assert (desc.output_descriptor("embedding_table").shape, desc.output_descriptor("embedding_table").dtype) == (
        [v, 1, h],
        "int8",
    )
    for q in QUERY:
        desc = runner._function(f"gather_embeddings_{q}").desc
        assert [
            (n, list(desc.input_descriptor(n).shape), desc.input_descriptor(n).dtype) for n in desc.input_names
        ] == [
            ("in_new_token_ids", [1, q], "int32"),
            ("embedding_table", [v, 1, h], "int8"),
        ]
        assert (
            desc.output_descriptor("out_transformer_input").shape,
            desc.output_descriptor("out_transformer_input").dtype,
        ) == ([1, q, 1, h], "float16")
    for kind in ("extend", "prompt_opt"):
        for ctx in SHAPES.contexts:
            for q in QUERY:
                desc = runner._function(f"{kind}_{ctx}_{q}").desc
                inputs = [
                    (n, list(desc.input_descriptor(n).shape), desc.input_descriptor(n).dtype) for n in desc.input_names
                ]
                assert inputs == [
                    ("transformer_input", [1, q, 1, h], "float16"),
                    ("position_ids", [1, q], "uint16"),
                    ("in_step", [1], "int32"),
                    ("causal_mask", [1, ctx, 1, q], "float16"),
                    ("embedding_table", [v, 1, h], "int8"),
                ]
                assert list(desc.state_names) == ["key_cache", "value_cache"]
                for state in desc.state_names:
                    assert (list(desc.state_descriptor(state).shape), desc.state_descriptor(state).dtype) == (
                        [layers, 1, rows, 1, ctx],
                        "float16",
                    )
                logits = desc.output_descriptor("out_logits")
                assert list(desc.output_names) == ["out_logits"] and logits.dtype == "float16"
                assert list(logits.shape) == ([1] if kind == "prompt_opt" else [1, 1, q, v])
    # No argmax in any graph (coreai-torch #116): the engine samples on the CPU.
    assert "argmax" not in str(AIModelAsset.load(package).program._module._mlir_module).lower()
    # The embedding table: int8 with one scale, in load_embeddings and the graphs that read it.
    assert named_constants(package, "gather_embeddings_8")[EMBEDDING + ".scale"].shape == (1, 1)
    assert named_constants(package, "load_embeddings")[EMBEDDING + ".data"].dtype == np.int8


def test_int8_is_per_block_and_the_preset_groups_32_rows(tiny_checkpoint, bundles):
    name = "transformer.layers.1.attn.qkv_proj.weight"
    int8 = named_constants(bundles(tiny_checkpoint, "int8"), "extend_128_16")
    data, scale = int8[name + ".data"], int8[name + ".scale"]  # [in, out] for batch_matmul
    assert data.dtype == np.int8 and scale.shape == (data.shape[0] // 32, data.shape[1])  # blocks of 32 inputs
    preset = named_constants(bundles(tiny_checkpoint, "ios-preset"), "extend_128_16")
    lut, indices = preset[name + ".lut"], preset[name + ".indices"]
    assert lut.shape == (1, indices.shape[1] // 32, 16, 1)  # one 4-bit LUT per 32 output channels


def greedy_against_mlx(package: Path, source, compress: str):
    """The twin over PROMPT then STEPS decode steps against MLX (float32) holding the package's
    own weights, read back from main.mlirb: convert/verify.py's comparison, whose rule is that
    the greedy tokens agree except at a near-tie the logits difference explains (report.ok;
    measured: one such step, tiny palettize4 decode 5, top-2 margin 0.007 against a 0.017
    difference)."""
    runner = StaticShapeRunner(package)
    model, _ = load_model(source, dtype="float32")
    functions = ("load_embeddings", f"extend_{CONTEXT}_{max(QUERY)}")
    weights = package_weights(package, list(model_weights(model)), BITS.get(compress, 0), functions)
    reference = Model(model.config)
    reference.load_weights(
        [(k, mx.array(v)) for k, v in fold_ffn_scales(weights, runner.info.ffn_scale_exponents, unfold=True).items()]
    )
    return compare(runner, reference, PROMPT, STEPS, "coreai-ios", FLOAT16_SUM_RTOL)


@pytest.mark.parametrize("compress", COMPRESSIONS)
def test_tiny_float16_gives_mlx_greedy_tokens(tiny_checkpoint, bundles, compress):
    report = greedy_against_mlx(bundles(tiny_checkpoint, compress), tiny_checkpoint, compress)
    assert report.ok, report.problem
    assert len(report.steps) == STEPS + 1 and report.agreement >= 0.95


@pytest.mark.parametrize("compress", COMPRESSIONS)
def test_demo_model_float16_gives_mlx_greedy_tokens(bundles, compress):
    report = greedy_against_mlx(bundles(DEMO_MODEL, compress), DEMO_MODEL, compress)
    assert report.ok, report.problem
    assert len(report.steps) == STEPS + 1 and report.agreement >= 0.95


def test_an_extend_at_the_max_context_is_required(tiny_checkpoint, tmp_path):
    shapes = StaticShapes((SMALLEST,), QUERY)  # metadata says 128, the largest extend is 64
    package = export_ios(tiny_checkpoint, tmp_path / "short.aimodel", "none", shapes)
    with pytest.raises(
        OpenELMError, match=r"no extend function with the max context length 128 \(extend_<context>_<q>\)"
    ):
        StaticShapeRunner(package)


def test_windows_masks_and_positions_as_the_swift_engine_makes_them(tiny_checkpoint, bundles, monkeypatch):
    """The calls for a 21-token prompt and one decode: q = the smallest >= remaining tokens (else
    the largest) with prompt_opt_ above it, ctx the smallest > position, the window start aligned
    down to a multiple of q, in_step = start, positions start+i, the mask 0 for key <= start+i on
    real rows (CoreAIStaticShapeEngine.swift:268-298, 386-393, 302-326, 466-531)."""
    runner = StaticShapeRunner(bundles(tiny_checkpoint))
    calls = []
    run = runner._run_with_caches
    monkeypatch.setattr(
        runner, "_run_with_caches", lambda name, inputs: calls.append((name, inputs)) or run(name, inputs)
    )
    runner.prefill(list(range(5, 26)))
    runner.decode(7)
    runner.prefill(list(range(5, 70)))  # past ctx 64: the 128 graphs
    got = [(name, int(inputs["in_step"][0]), int(inputs["position_ids"][0, 0])) for name, inputs in calls]
    assert got == [
        ("prompt_opt_64_16", 0, 0),  # 21 > 16 left
        ("extend_64_8", 16, 16),  # 5 left: q 8, window 16..23 holds 16..20
        ("extend_64_8", 16, 16),  # the decode at 21: window 16..23 again
        ("prompt_opt_64_16", 16, 16),  # 65 left from 22: q 16, window 16..31
        ("prompt_opt_64_16", 32, 32),
        ("prompt_opt_64_16", 48, 48),
        ("prompt_opt_128_16", 64, 64),  # position 64: the next context
        ("extend_128_8", 80, 80),  # 7 left at 80: window 80..87 holds 80..86
    ]
    mask = calls[1][1]["causal_mask"]
    assert mask.shape == (1, 64, 1, 8) and mask.dtype == np.float16
    expected = np.full((64, 8), MASKED, np.float16)
    for i in range(5):  # real rows 16..20 see keys 0..16+i; padding rows nothing
        expected[: 17 + i, i] = 0
    assert np.array_equal(mask[0, :, 0, :], expected)
    assert np.array_equal(causal_mask([1, 64, 1, 8], 5, 16), mask)
    assert calls[1][1]["position_ids"].dtype == np.uint16 and list(calls[1][1]["position_ids"][0]) == list(
        range(16, 24)
    )


def test_context_ladder_ends_at_the_context():
    assert StaticShapes.ladder(1024).contexts == (256, 512, 1024)
    assert StaticShapes.ladder(1536).contexts == (256, 512, 1024, 1536)
    assert StaticShapes.ladder(1024).query_lengths == (8, 16, 64)
    with pytest.raises(OpenELMError, match="not a multiple of the largest query length 64"):
        StaticShapes.ladder(1000)
    assert re.fullmatch(r"extend_\d+_\d+", StaticShapes.ladder(512).function_names()[4])
