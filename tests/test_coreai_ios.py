"""The iOS static-shape LanguageBundle model (convert/coreai/ios_graph.py) driven by the twin of
Apple's StaticShapeEngine (convert/coreai/static_engine.py) through Apple's runtime: the contract
the Swift engine reads, and MLX's greedy tokens over a prompt longer than one window plus 32
decode steps, float16 compute, for every compression. Small ladders (ctx 64/128) keep the float16
interpreter (~300x slower than float32) to seconds; the exports are conftest's, shared by the run."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coreai.runtime")

from conftest import assert_clean_error, run_cli, tiny_config  # noqa: E402

from openelm_mlx.convert.coreai.bundle import read_bundle  # noqa: E402
from openelm_mlx.convert.coreai.export import export_coreai  # noqa: E402
from openelm_mlx.convert.coreai.ios_graph import MASKED, StaticShapes  # noqa: E402
from openelm_mlx.convert.coreai.runtime import read_graph  # noqa: E402
from openelm_mlx.convert.coreai.static_engine import StaticShapeEngine, causal_mask  # noqa: E402
from openelm_mlx.convert.coreai.verify import verify_coreai  # noqa: E402
from openelm_mlx.convert.coreai.weights import named_constants, package_weights, resources  # noqa: E402
from openelm_mlx.convert.export import package_size  # noqa: E402
from openelm_mlx.convert.package import EMBEDDING  # noqa: E402
from openelm_mlx.convert.package_input import PackageInfo  # noqa: E402
from openelm_mlx.convert.runner import open_bundle  # noqa: E402
from openelm_mlx.errors import OpenELMError  # noqa: E402
from openelm_mlx.loader import DEMO_MODEL  # noqa: E402

CONTEXT, SMALLEST, QUERY = 128, 64, (8, 16)
SHAPES = StaticShapes.ladder(CONTEXT, SMALLEST, QUERY)
# Each decode computes all q rows of its window, and float16 on Apple's Linux runtime costs per row
# (demo model, one core: 1.38 s a step at q 8, 0.70 at q 4, 0.20 at q 1; tiny: 0.21 at q 8, 0.03 at
# q 1). The tiny model's uncompressed bundle keeps Apple's 8 and 16, so partial windows, their
# alignment and re-runs are checked in float16 over 32 steps; the compressed and demo bundles, which
# check the stored weights and a real model's numerics, decode a row at a time. Prompts still span
# two 16-token windows.
ONE_ROW = StaticShapes.ladder(CONTEXT, SMALLEST, (1, 16))
COMPRESSIONS = ("none", "int8", "int4", "palettize4", "ios-preset")
STEPS = 32
# test_coreai.py's: its greedy run has no near-ties (another sentence's diverged after 63 characters: float16 noise).
DEMO_PROMPT = "And it came to pass, when the men of the city saw the king and all the people of the land, that they"


def export_ios(source, output: Path, compress: str = "none", shapes=SHAPES) -> Path:
    export_coreai(source, output, target="ios", context=CONTEXT, compress=compress, static_shapes=shapes)
    return output


@pytest.fixture
def bundles(exported):
    """bundles(source, compress, shapes, precision) -> the bundle folder, from conftest's shared exports."""

    def get(source, compress="none", shapes=SHAPES, precision="float16"):
        return Path(exported("coreai", source, compress, precision, shapes)["output"])

    return get


def asset(bundle: Path) -> Path:
    return bundle / f"{bundle.name}.aimodel"


def test_contract_as_the_swift_engine_reads_it(tiny_checkpoint, bundles):
    from coreai.authoring import AIModelAsset

    bundle, config = bundles(tiny_checkpoint), tiny_config()
    package = asset(bundle)
    v, h, hd, layers = config.vocab_size, config.model_dim, config.head_dim, config.num_transformer_layers
    rows = max(config.num_kv_heads) * hd
    assert len(set(config.num_kv_heads)) > 1  # the per-layer kv heads the padded cache holds
    names = AIModelAsset.load(package).summary(include_statistics=False).function_names
    assert sorted(names) == sorted(SHAPES.function_names()) and SHAPES.contexts == (64, 128)
    runner = open_bundle(bundle)
    assert runner.max_query_length == 16 and runner.info.context == CONTEXT and runner.info.target == "ios"
    meta = json.loads((bundle / "metadata.json").read_text())
    assert meta["language"]["max_context_length"] == CONTEXT and meta["language"]["vocab_size"] == v
    desc = runner.functions["load_embeddings"].desc
    assert list(desc.input_names) == [] and list(desc.output_names) == ["embedding_table"]
    assert (desc.output_descriptor("embedding_table").shape, desc.output_descriptor("embedding_table").dtype) == (
        [v, 1, h],
        "int8",
    )
    for q in QUERY:
        desc = runner.functions[f"gather_embeddings_{q}"].desc
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
                desc = runner.functions[f"{kind}_{ctx}_{q}"].desc
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
    # One copy of the weights for all 19 functions (float16 matrices, the int8 embedding); the
    # functions' ops add ~13 KB each.
    stored = sum(len(blob) for blob in resources(package / "main.mlirb").values())
    assert 1.8 < stored / config.num_parameters() < 2.0
    assert package_size(bundle) - stored < 19 * 16 * 1024
    # No argmax in any graph (coreai-torch #116): the engine samples on the CPU.
    assert "argmax" not in str(AIModelAsset.load(package).program._module._mlir_module).lower()
    # The embedding table: int8 with one scale, in load_embeddings and the graphs that read it.
    assert named_constants(package, "gather_embeddings_8")[EMBEDDING + ".scale"].shape == (1, 1)
    assert named_constants(package, "load_embeddings")[EMBEDDING + ".data"].dtype == np.int8


def test_int8_is_per_block_and_the_preset_groups_32_rows(tiny_checkpoint, bundles):
    name = "transformer.layers.1.attn.qkv_proj.weight"
    int8 = named_constants(asset(bundles(tiny_checkpoint, "int8", ONE_ROW)), "extend_128_16")
    data, scale = int8[name + ".data"], int8[name + ".scale"]  # [in, out] for batch_matmul
    assert data.dtype == np.int8 and scale.shape == (data.shape[0] // 32, data.shape[1])  # blocks of 32 inputs
    preset = named_constants(asset(bundles(tiny_checkpoint, "ios-preset", ONE_ROW)), "extend_128_16")
    lut, indices = preset[name + ".lut"], preset[name + ".indices"]
    assert lut.shape == (1, indices.shape[1] // 32, 16, 1)  # one 4-bit LUT per 32 output channels


def check_greedy(bundle: Path, source, steps: int = STEPS):
    """verify-coreai on the bundle: the weights read back from main.mlirb, then the twin over the
    default prompt (longer than one 16-token window) and `steps` decode steps against MLX (float32)
    holding those weights. Its rule: greedy tokens agree except at a near-tie the logits
    difference explains (measured: one such step, tiny palettize4 decode 5, top-2 margin 0.007
    against a 0.017 difference)."""
    report = verify_coreai(bundle, source, steps=steps)
    assert report.ok, (report.weight_problems, [b.problem for b in report.backends])
    (twin,) = report.backends
    assert int(twin.steps[0].name[8:-1]) > max(QUERY)  # prefill[n]: more than one window
    assert len(twin.steps) == steps + 1 and twin.agreement >= 0.95


@pytest.mark.parametrize("compress", COMPRESSIONS)
def test_tiny_float16_gives_mlx_greedy_tokens(tiny_checkpoint, bundles, compress):
    check_greedy(bundles(tiny_checkpoint, compress, SHAPES if compress == "none" else ONE_ROW), tiny_checkpoint)


def test_demo_model_float16_gives_mlx_greedy_tokens(bundles):
    """The demo model (a real model's activations through the float16 guard) in the iOS default,
    ios-preset; every compression's stored weights and graph are the tiny model's checks above, and
    the demo model's uncompressed float16 numerics test_coreai.py's (each demo bundle costs ~20 s
    of Apple's float16 here). The prompt's two windows and 8 decode steps: the tiny bundles decode
    STEPS, and each demo step costs 0.2 s of Apple's float16 here."""
    check_greedy(bundles(DEMO_MODEL, "ios-preset", ONE_ROW), DEMO_MODEL, steps=8)


def test_an_extend_at_the_max_context_is_required(tiny_checkpoint, tmp_path, cli_here):
    """metadata.json says 128; the largest extend is extend_64_*: one line from the bundle reader,
    and the twin's own check (Swift:94-105) refuses it too."""
    bundle = export_ios(tiny_checkpoint, tmp_path / "short", shapes=StaticShapes((SMALLEST,), QUERY))
    result = cli_here("verify-coreai", bundle, "--model", tiny_checkpoint)
    assert_clean_error(result, "no extend_128_* function for language.max_context_length 128")
    read = read_bundle(bundle)
    meta = json.loads((read.asset / "metadata.json").read_text())["creatorDefinedMetadata"]
    info = PackageInfo.from_metadata(meta, read.asset, "export-coreai")
    with pytest.raises(OpenELMError, match="no function's key_cache holds language.max_context_length 128"):
        StaticShapeEngine(read, info, list(read_graph(read)))


def test_windows_masks_and_positions_as_the_swift_engine_makes_them(tiny_checkpoint, bundles, monkeypatch):
    """The calls for a 21-token prompt and one decode: q = the smallest >= remaining tokens (else
    the largest) with prompt_opt_ above it, ctx the smallest > position, the window start aligned
    down to a multiple of q, in_step = start, positions start+i, the mask 0 for key <= start+i on
    real rows (CoreAIStaticShapeEngine.swift:268-298, 386-393, 302-326, 466-531)."""
    runner = open_bundle(bundles(tiny_checkpoint))
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


def test_bad_ios_contexts_fail_in_one_line(tiny_checkpoint, tmp_path, cli_here):
    result = cli_here("export-coreai", tiny_checkpoint, "-o", tmp_path / "b", "--target", "ios", "--context", "100")
    assert_clean_error(result, "--context 100 is not a multiple of the largest query length 64")
    assert not (tmp_path / "b").exists()
    with pytest.raises(OpenELMError, match="--context 16 is below the key cache's 32 rows"):
        export_ios(tiny_checkpoint, tmp_path / "c", shapes=StaticShapes.ladder(16, 8, QUERY))
    assert not (tmp_path / "c").exists()


def test_generate_through_the_twin_gives_mlx_text(bundles):
    """`openelm generate --backend coreai` on the demo model's iOS bundle: the greedy text of MLX
    holding the bundle's weights (the embedding is int8 per tensor on iOS). The command's path to
    the static engine is what this checks, in float32 compute (float16's numerics are the greedy
    checks above; float16 here cost ~20 s)."""
    import mlx.core as mx

    from openelm_mlx import generate, load
    from openelm_mlx.convert.package import model_weights

    bundle, prompt = bundles(DEMO_MODEL, "none", ONE_ROW, "float32"), DEMO_PROMPT
    model, tokenizer = load(DEMO_MODEL)
    functions = ("load_embeddings", f"extend_{CONTEXT}_16")
    weights = package_weights(asset(bundle), list(model_weights(model)), 0, functions)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])  # the demo model's FFN scales are 0
    result = run_cli(
        "generate", "-p", prompt, "--max-tokens", "24", "--temp", "0", "--backend", "coreai", "--model", bundle
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == generate(model, tokenizer, prompt, max_tokens=24, temp=0.0) + "\n"
    assert len(result.stdout.split()) > 10 and "ODIE" not in result.stderr


def test_rewind_to_a_prefix_equals_running_it_again(tiny_checkpoint, bundles):
    """rewind(n) (reset(to: n), Swift:583-600) after tokens past n: the next window starts at the
    multiple of q below n and rewrites those columns; the logits equal a fresh run's, bit for bit."""
    runner = open_bundle(bundles(tiny_checkpoint))
    prefix = list(range(3, 23))  # 20 tokens: past one window of 16
    runner.reset()
    runner.prefill(prefix)
    for t in (40, 41, 42, 43):  # stale columns past the prefix
        runner.decode(t)
    runner.rewind(len(prefix))
    got = [runner.decode(t) for t in (50, 51)]
    runner.reset()
    runner.prefill(prefix)
    np.testing.assert_array_equal(got, [runner.decode(t) for t in (50, 51)])
    with pytest.raises(OpenELMError, match="cannot rewind to token 30: the cache holds 22"):
        runner.rewind(30)
