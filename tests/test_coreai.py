"""Core AI LanguageBundle export, driven by the sequential-engine twin through Apple's own runtime
(the reference runtime in coreai-core on Linux): the bundle's files, function, states and metadata,
the metadata read as the Swift loader reads it, greedy tokens against MLX over chunked prompts
(compressed too), corrupted files, generation with the demo model, the bench."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("coreai.runtime")

from conftest import EXPORT_CONTEXT, assert_clean_error, run_cli, tiny_config  # noqa: E402

from openelm_mlx import generate, load  # noqa: E402
from openelm_mlx.apps.cli import main as cli  # noqa: E402
from openelm_mlx.config import PRESETS, OpenELMConfig  # noqa: E402
from openelm_mlx.convert.coreai import runtime  # noqa: E402
from openelm_mlx.convert.coreai.bundle import check_static_functions, engine_kind, read_bundle  # noqa: E402
from openelm_mlx.convert.coreai.export import AUTHOR, LICENSE, export_coreai  # noqa: E402
from openelm_mlx.convert.coreai.graph import STATES, cache_shape  # noqa: E402
from openelm_mlx.convert.coreai.runtime import SLOW_FLOAT16  # noqa: E402
from openelm_mlx.convert.coreai.sequential_engine import GrowingState, SequentialEngine  # noqa: E402
from openelm_mlx.convert.coreai.verify import verify_coreai  # noqa: E402
from openelm_mlx.convert.coreai.weights import named_constants, resources  # noqa: E402
from openelm_mlx.convert.export import kv_bytes  # noqa: E402
from openelm_mlx.convert.package import Layer, PackageDescription  # noqa: E402
from openelm_mlx.convert.runner import open_bundle  # noqa: E402
from openelm_mlx.errors import OpenELMError  # noqa: E402
from openelm_mlx.loader import DEMO_MODEL  # noqa: E402

CONTEXT = EXPORT_CONTEXT
CHUNK = 16  # the engine's chunk threshold in these tests (Swift's 1024 needs prompts too long to run here)
DEMO_PROMPT = "And it came to pass, when the men of the city saw the king and all the people of the land, that they"


@pytest.fixture
def bundles(exported):
    """The shared Core AI bundles (conftest): bundles(source, compress, precision) -> the summary."""
    return lambda source, compress="none", precision="float16": exported("coreai", source, compress, precision)


@pytest.fixture
def calls(monkeypatch):
    """The token count of every call the engine makes to `main`."""
    sizes = []
    process = SequentialEngine._process
    monkeypatch.setattr(
        SequentialEngine, "_process", lambda self, tokens: sizes.append(len(tokens)) or process(self, tokens)
    )
    return sizes


def test_bundle_files_function_states_metadata(tiny_checkpoint, bundles):
    summary = bundles(tiny_checkpoint)
    bundle, config = Path(summary["output"]), tiny_config()
    name = bundle.name
    assert sorted(p.name for p in bundle.iterdir()) == [f"{name}.aimodel", "metadata.json", "tokenizer"]
    assert sorted(p.name for p in (bundle / f"{name}.aimodel").iterdir()) == [
        "main.hash",
        "main.mlirb",
        "metadata.json",
    ]
    assert (bundle / "tokenizer/tokenizer.model").read_bytes() == (tiny_checkpoint / "tokenizer.model").read_bytes()
    assert json.loads((bundle / "metadata.json").read_text()) == {
        "metadata_version": "0.2",
        "kind": "llm",
        "name": name,
        "assets": {"main": f"{name}.aimodel"},
        "language": {
            "tokenizer": tiny_checkpoint.name,
            "vocab_size": config.vocab_size,
            "max_context_length": CONTEXT,
            "embedded_tokenizer": True,
            "function_map": {"main": ["main"]},
        },
        "source": {"model_definition": "openelm-mlx", "hf_model_id": tiny_checkpoint.name},
    }
    engine = open_bundle(bundle)
    assert isinstance(engine, SequentialEngine) and list(engine.functions) == ["main"]
    desc = engine.functions["main"].desc
    # The dynamic contract, bound by index by the stock engines: ids then positions, K then V.
    assert desc.input_names == ["input_ids", "position_ids"] and desc.output_names == ["logits"]
    assert [desc.input_descriptor(n).shape for n in desc.input_names] == [[1, -1], [1, -1]]
    assert {desc.input_descriptor(n).dtype for n in desc.input_names} == {"int32"}
    assert desc.state_names == ["keyCache", "valueCache"]
    kv_max = max(config.num_kv_heads)
    assert len(set(config.num_kv_heads)) > 1  # the layer-wise scaling is padded into one pair
    shape = [config.num_transformer_layers, 1, kv_max, CONTEXT, config.head_dim]
    assert [list(desc.state_descriptor(s).shape) for s in desc.state_names] == [shape, shape]
    assert {desc.state_descriptor(s).dtype for s in desc.state_names} == {"float16"}
    logits = desc.output_descriptor("logits")
    assert logits.shape == [1, -1, config.vocab_size] and logits.dtype == "float16"
    per_head = 2 * CONTEXT * config.head_dim * 2
    assert summary["kv_bytes"] == config.num_transformer_layers * kv_max * per_head
    assert summary["kv_bytes_unpadded"] == sum(config.num_kv_heads) * per_head
    asset = json.loads((bundle / f"{name}.aimodel/metadata.json").read_text())
    assert asset["author"] == AUTHOR and asset["license"] == LICENSE and "OpenELM" in asset["description"]
    assert asset["creationDate"]
    meta = asset["creatorDefinedMetadata"]
    assert meta["openelm.bos_token_id"] == "1" and meta["openelm.eos_token_id"] == "2"
    assert meta["openelm.context_length"] == str(CONTEXT) and meta["openelm.prefill_length"] == str(CONTEXT)
    assert meta["openelm.compression"] == "none" and meta["openelm.compute_precision"] == "float16"
    assert meta["openelm.source_model"] == tiny_checkpoint.name  # never a local path
    assert json.loads(meta["openelm.ffn_scale_exponents"]) == [0] * config.num_transformer_layers
    assert json.loads(meta["openelm.config"])["num_kv_heads"] == config.num_kv_heads
    assert "<|assistant|>" in meta["openelm.chat_template"] and meta["openelm.toolkit_version"]
    assert 2.0 < summary["bytes_per_parameter"] < 2.3  # float16 weights, stored once


def assert_greedy(coreai, steps: int):
    """MLX's greedy token at every step, except at most one where MLX's own top two are closer than
    twice the difference (the random tiny model's logits are flat: margins down to 0.002 over 33
    steps; the demo model's decode 24 of DEMO_PROMPT: 471 for MLX's 345, float16 sums)."""
    assert len(coreai.steps) == steps and max(s.max_abs_diff for s in coreai.steps) < coreai.tolerance
    ties = [s for s in coreai.steps if s.package_token != s.reference_token]
    assert len(ties) <= 1 and all(s.margin < 2 * s.max_abs_diff for s in ties), ties


@pytest.mark.parametrize(
    "compress,max_bpp,max_rel_error",
    [
        ("none", 2.3, 5e-4),
        ("int8", 1.25, 0.01),
        ("int4", 0.75, 0.1),
        ("palettize4", 0.7, 0.1),
        ("ios-preset", 0.7, 0.15),
    ],
)
def test_float16_bundle_gives_mlx_greedy_tokens(tiny_checkpoint, bundles, calls, compress, max_bpp, max_rel_error):
    """A prompt of three chunks and 32 decode steps, each call as the Swift engine makes it, against
    MLX holding the bundle's own (decompressed) weights. ios-preset serves macOS bundles too: every
    matrix, the embedding too, 4-bit per 32 rows."""
    summary = bundles(tiny_checkpoint, compress)
    assert summary["bytes_per_parameter"] < max_bpp
    report = verify_coreai(summary["output"], tiny_checkpoint, steps=32, chunk_threshold=CHUNK)
    assert report.ok and not report.weight_problems, report
    assert 0 < report.weight_max_rel_error < max_rel_error  # float16 rounding at least
    (coreai,) = report.backends
    prompt = int(coreai.steps[0].name[8:-1])
    assert (
        prompt > 2 * CHUNK and calls == [CHUNK] * (prompt // CHUNK) + [prompt % CHUNK] * (prompt % CHUNK > 0) + [1] * 32
    )
    assert_greedy(coreai, 33)


@pytest.mark.parametrize("compress", ["int8", "int4", "palettize4"])
def test_compressed_weights_are_stored_compressed(tiny_checkpoint, bundles, compress):
    bundle = read_bundle(bundles(tiny_checkpoint, compress)["output"])
    constants = named_constants(bundle.asset)
    proj = "transformer.layers.0.ffn.proj_1.weight"
    if compress == "palettize4":
        indices = constants[proj + ".indices"]
        assert indices.max() <= 15 and constants[proj + ".lut"].shape == (1, indices.shape[1] // 16, 16, 1)
    else:
        data = constants[proj + ".data"]
        assert data.dtype == np.int8 and np.abs(data).max() == (7 if compress == "int4" else 127)
    if compress == "int4":  # two values per byte
        config = tiny_config()
        blob = resources(bundle.asset / "main.mlirb")[proj + ".data"]
        assert len(blob) == 2 * config.ffn_dims[0] * config.model_dim // 2


def test_float32_bundle_matches_mlx_closely(tiny_checkpoint, bundles):
    report = verify_coreai(bundles(tiny_checkpoint, precision="float32")["output"], tiny_checkpoint, steps=4)
    (coreai,) = report.backends
    assert report.ok and report.weight_max_rel_error == 0 and coreai.agreement == 1.0
    # float32 compute, float16 logits (what the stock engines read): one float16 rounding (2**-11 of
    # the largest |logit| at most) and float32's own error; tolerance = 1e-3 * the largest |logit|
    assert max(s.max_abs_diff for s in coreai.steps) < 2.0**-10 * coreai.tolerance / 1e-3


def test_main_mlirb_is_hashed_once_per_open_and_verify(tiny_checkpoint, bundles, monkeypatch):
    """runtime.read_model hashes main.mlirb once and passes the program along: opening a bundle,
    and verifying one (its reader and its engine), check the hash once each."""
    hashed, check = [], runtime.check_integrity
    monkeypatch.setattr(runtime, "check_integrity", lambda package: hashed.append(package) or check(package))
    bundle = bundles(tiny_checkpoint, precision="float32")["output"]
    open_bundle(bundle).close()
    assert len(hashed) == 1
    assert verify_coreai(bundle, tiny_checkpoint, steps=1).ok
    assert len(hashed) == 2


def test_demo_model_float16_gives_mlx_greedy_tokens(bundles, calls):
    """The shipped demo model, float16 compute: a prompt of several chunks and 12 decode steps (the
    tiny model's bundles decode 32; a demo step costs ~0.2 s of Apple's float16 here)."""
    report = verify_coreai(bundles(DEMO_MODEL)["output"], DEMO_MODEL, steps=12, prompt=DEMO_PROMPT, chunk_threshold=8)
    (coreai,) = report.backends
    assert report.ok, report
    assert_greedy(coreai, 13)
    assert calls == [8, 8, 8, 2] + [1] * 12 and coreai.steps[0].name == "prefill[26]"


def test_demo_model_generates_the_same_text_as_mlx(bundles):
    """`openelm generate --backend coreai` on the demo model's bundle: the same greedy text as MLX,
    and nothing of the runtime's native output on the terminal. Float32 compute: the command is
    what this checks (float16's numerics are test_demo_model_float16_gives_mlx_greedy_tokens's;
    float16 here cost ~10 s)."""
    prompt = DEMO_PROMPT
    model, tokenizer = load(DEMO_MODEL)
    bundle = bundles(DEMO_MODEL, precision="float32")["output"]
    package = run_cli(
        "generate", "-p", prompt, "--max-tokens", "24", "--temp", "0", "--backend", "coreai", "--model", bundle
    )
    assert package.returncode == 0, package.stderr
    assert package.stdout == generate(model, tokenizer, prompt, max_tokens=24, temp=0.0) + "\n"
    assert len(package.stdout.split()) > 10
    assert package.stderr.splitlines()[-1].startswith("prompt: ") and "C++" not in package.stderr
    assert "ODIE" not in package.stderr  # the runtime's load messages are kept off the terminal
    assert "computes in float16" not in package.stderr  # float32: no note of float16's speed


def test_a_float16_bundle_says_once_that_linux_runs_it_slowly(tiny_checkpoint, bundles):
    """On Linux, one notice before the first step naming what to pass instead (Apple's reference
    runtime computes float16 ~300x slower); none on macOS, where the OS framework runs it."""
    bundle = bundles(tiny_checkpoint)["output"]
    result = run_cli("generate", "-p", "hi", "--max-tokens", "3", "--backend", "coreai", "--model", bundle)
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "computes in float16" in line]
    assert notes == (["openelm: " + SLOW_FLOAT16.format(bundle=bundle)] if sys.platform == "linux" else [])
    if notes:
        assert result.stderr.index("computes in float16") < result.stderr.index("prompt: ")
    quiet = run_cli("generate", "-p", "hi", "--max-tokens", "3", "--backend", "coreai", "--model", bundle, "--quiet")
    assert quiet.returncode == 0 and "computes in float16" not in quiet.stderr, quiet.stderr


def copy_bundle(bundle, to: Path) -> Path:
    shutil.copytree(bundle, to)
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
    assert exit_info.value.code == 1 and len(lines) == 1 and lines[0].startswith(f"openelm {argv[0]}: error: "), lines
    assert all(f in lines[0] for f in fragments), lines[0]


def test_flipped_bytes_fail_verify(tiny_checkpoint, bundles, tmp_path, capsys):
    bundle = bundles(tiny_checkpoint, "int4")["output"]
    for where in (0.01, 0.5, 0.99):  # program, weights, end of the file
        broken = copy_bundle(bundle, tmp_path / f"broken-{where}")
        mlirb = broken / f"{Path(bundle).name}.aimodel/main.mlirb"
        flip(mlirb, int(mlirb.stat().st_size * where))
        one_line_error(capsys, ["verify-coreai", broken, "--model", tiny_checkpoint], "does not match its main.hash")


def test_weights_are_checked_even_with_a_matching_hash(tiny_checkpoint, bundles, tmp_path, capsys):
    """Someone edits a weight and rewrites main.hash: the weights read back from main.mlirb fail."""
    bundle = bundles(tiny_checkpoint)["output"]
    asset = copy_bundle(bundle, tmp_path / "edited") / f"{Path(bundle).name}.aimodel"
    flip(asset / "main.mlirb", (asset / "main.mlirb").stat().st_size // 2)
    (asset / "main.hash").write_bytes(hashlib.sha256((asset / "main.mlirb").read_bytes()).digest())
    with pytest.raises(SystemExit) as exit_info:
        cli(["verify-coreai", str(tmp_path / "edited"), "--model", str(tiny_checkpoint), "--steps", "2"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 1 and "weight mismatch" in out and out.rstrip().endswith("FAILED")


# metadata.json edits -> a fragment of the one-line error (Swift: ModelBundle.swift:141-198,
# LanguageBundle.swift:35-54, LanguageConfig.swift:60-69)
METADATA_EDITS = [
    (lambda m: m.pop("metadata_version"), "metadata_version '0.1' is not supported"),
    (lambda m: m.update(metadata_version="0.3"), "metadata_version '0.3' is not supported"),
    (lambda m: m.pop("kind"), "kind is missing"),
    (lambda m: m.update(kind="diffusion"), "kind 'diffusion' is not a language model"),
    (lambda m: m.pop("name"), "name is missing"),
    (lambda m: m.pop("assets"), "assets is missing"),
    (lambda m: m["assets"].pop("main"), "assets.main is missing"),
    (lambda m: m["assets"].update(main="other.aimodel"), "'other.aimodel' does not exist in the bundle"),
    (lambda m: m["assets"].update(main="../other/x.aimodel"), "points outside the bundle"),
    (lambda m: m.pop("language"), "language is missing"),
    (lambda m: m["language"].pop("tokenizer"), "language.tokenizer is missing"),
    (lambda m: m["language"].pop("vocab_size"), "language.vocab_size is missing"),
    (lambda m: m["language"].update(vocab_size="384"), "language.vocab_size must be int"),
    (lambda m: m["language"].pop("max_context_length"), "language.max_context_length is missing"),
    (lambda m: m["language"].update(function_map={"main": "main"}), "function_map must map roles to lists"),
    (lambda m: m["language"].update(vocab_size=383), "language.vocab_size 383 is not the model's 384"),
]


@pytest.mark.parametrize("edit,fragment", METADATA_EDITS, ids=[f for _, f in METADATA_EDITS])
def test_metadata_is_read_as_the_swift_loader_does(tiny_checkpoint, bundles, tmp_path, capsys, edit, fragment):
    bundle = copy_bundle(bundles(tiny_checkpoint)["output"], tmp_path / "x")
    meta = json.loads((bundle / "metadata.json").read_text())
    edit(meta)
    (bundle / "metadata.json").write_text(json.dumps(meta))
    one_line_error(capsys, ["generate", "--backend", "coreai", "--model", bundle, "-p", "hi"], fragment)


def test_missing_or_misnamed_bundle_pieces(tiny_checkpoint, bundles, tmp_path, capsys):
    bundle = bundles(tiny_checkpoint)["output"]
    one_line_error(capsys, ["verify-coreai", tiny_checkpoint, "--model", tiny_checkpoint], "no metadata.json")
    asset = Path(bundle) / f"{Path(bundle).name}.aimodel"
    one_line_error(capsys, ["verify-coreai", asset, "--model", tiny_checkpoint], "is the model inside a bundle")
    broken = copy_bundle(bundle, tmp_path / "not-json")
    (broken / "metadata.json").write_text("{")
    one_line_error(capsys, ["verify-coreai", broken, "--model", tiny_checkpoint], "metadata.json")


def test_engine_choice_and_static_bundles_need_the_full_context():
    """EngineFactory.swift / ModelStructure.swift:240-268 and CoreAIStaticShapeEngine.swift:94-105."""
    assert engine_kind(["main"]) == engine_kind(["extend_96_8"]) == engine_kind(["whatever"]) == "sequential"
    assert engine_kind(["load_embeddings", "gather_embeddings_8", "extend_96_8"]) == "static"
    bundle = type("B", (), {"max_context_length": 96, "path": Path("b")})()
    check_static_functions(bundle, ["load_embeddings", "extend_64_8", "extend_96_8"])
    with pytest.raises(OpenELMError, match="no extend_96_\\* function"):
        check_static_functions(bundle, ["load_embeddings", "extend_64_8"])


def test_kv_states_grow_as_the_swift_handler_does():
    """GrowingNDArrayState: a dynamic length starts at the initial capacity and doubles up to the
    maximum, keeping what was written; a static length (ours) is full size from the start."""
    state = GrowingState({"k": ([2, 1, 1, -1, 4], "float16"), "s": ([2, 1, 1, 6, 4], "float16")}, 4, 20)
    assert state.arrays["k"].numpy().shape == (2, 1, 1, 4, 4) and state.arrays["s"].numpy().shape == (2, 1, 1, 6, 4)
    from coreai.runtime import NDArray

    state.arrays["k"] = NDArray(np.ones((2, 1, 1, 4, 4), np.float16))  # what the model wrote
    state.ensure_capacity(4)
    assert state.capacity == 4
    state.ensure_capacity(5)
    k = state.arrays["k"].numpy()
    assert state.capacity == 8 and k.shape == (2, 1, 1, 8, 4) and k[:, :, :, :4].all() and not k[:, :, :, 4:].any()
    state.ensure_capacity(17)
    assert state.capacity == 20 and state.arrays["s"].numpy().shape == (2, 1, 1, 6, 4)
    with pytest.raises(OpenELMError, match="exceeds the maximum 20"):
        state.ensure_capacity(21)


@pytest.mark.parametrize("size", list(PRESETS))
def test_released_sizes_get_one_state_pair(size):
    """Every released size fits the stock engines' 2-4 states: one K/V pair, padded to the layer
    with the most KV heads (270M: 80 head slots for 63)."""
    config = OpenELMConfig.preset(size)
    layers = [Layer(q, kv, f, 0) for q, kv, f in zip(config.num_query_heads, config.num_kv_heads, config.ffn_dims)]
    desc = PackageDescription(config, size, 2048, 2048, "none", 32, "float16", layers, {}, None, None)
    assert len(STATES) == 2
    assert cache_shape(desc) == [config.num_transformer_layers, 1, max(config.num_kv_heads), 2048, config.head_dim]
    kv = kv_bytes(desc)
    if size == "270M":
        assert (max(config.num_kv_heads), sum(config.num_kv_heads)) == (5, 63)
        assert kv["kv_bytes"] / kv["kv_bytes_unpadded"] == 80 / 63


def test_context_is_enforced_and_default_prompt_fits(tiny_checkpoint, tmp_path):
    out = export_coreai(tiny_checkpoint, tmp_path / "short", context=8)["output"]
    report = verify_coreai(out, tiny_checkpoint)  # the default prompt and 16 steps, clipped to 8 tokens
    assert report.ok and [s.name for s in report.backends[0].steps][0] == "prefill[1]"
    assert len(report.backends[0].steps) == 8
    engine = open_bundle(out)
    engine.prefill([5] * 7)
    engine.decode(6)
    with pytest.raises(OpenELMError, match="do not fit"):
        engine.decode(6)
    with pytest.raises(OpenELMError, match="exceed the package's context"):
        verify_coreai(out, tiny_checkpoint, prompt="the quick brown fox jumps over the lazy dog")


def test_refuses_overwrite_and_model_file_names(tiny_checkpoint, bundles, tmp_path, capsys):
    out = bundles(tiny_checkpoint)["output"]
    one_line_error(capsys, ["export-coreai", tiny_checkpoint, "-o", out], "--force")
    one_line_error(
        capsys, ["export-coreai", tiny_checkpoint, "-o", tmp_path / "m.aimodel"], f"use -o {tmp_path / 'm'}", "bundle"
    )
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    "command,module,extra,output",
    [("export-coreai", "coreai", "coreai", "x"), ("export-coreml", "coremltools", "coreml", "x.mlpackage")],
)
def test_missing_extra_gives_the_install_hint(tiny_checkpoint, tmp_path, command, module, extra, output):
    (tmp_path / module).mkdir()  # a package that refuses to import, ahead of the real one
    (tmp_path / module / "__init__.py").write_text("raise ImportError('not installed')\n")
    result = run_cli(command, tiny_checkpoint, "-o", tmp_path / output, env={"PYTHONPATH": str(tmp_path)})
    assert_clean_error(result, f"pip install 'openelm-mlx[{extra}]'")


def test_an_extra_that_is_not_there_is_said_before_anything_is_imported(monkeypatch):
    """package.installed looks the module up without importing it (coremltools takes ~4 s)."""
    from openelm_mlx.convert.package import installed

    monkeypatch.setitem(sys.modules, "coremltools", None)  # an import of it would now fail
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "coremltools" else object())
    with pytest.raises(OpenELMError, match=r"coremltools is not installed: pip install 'openelm-mlx\[coreml\]'"):
        installed("coremltools", "coreml")
    installed("coreai.runtime", "coreai")  # there: nothing said


def test_bench_times_the_model_through_apples_runtime(tiny_checkpoint, bundles):
    """On the float32 bundle (the other tests' too): the bench's path, not float16's numerics."""
    from openelm_mlx.benchmarks.bench import run_benchmark
    from openelm_mlx.benchmarks.package_bench import RUNTIME_NOTES
    from openelm_mlx.benchmarks.report import markdown

    bundle = bundles(tiny_checkpoint, precision="float32")["output"]
    results = run_benchmark(
        [bundle],
        prompt_tokens=20,
        generation_tokens=4,
        trials=2,
        warmup=0,
        backend="coreai",
        progress=False,
    )
    (entry,) = results["configurations"]
    assert entry["error"] is None and entry["activation_dtype"] == "float32"  # the bundle's compute precision
    bundle = read_bundle(bundle)
    assert entry["weight_bytes"] == (bundle.asset / "main.mlirb").stat().st_size
    trials = entry["implementations"]["coreai"]["trials"]
    assert len(trials) == 2 and all(t["prefill_tps"] > 0 and len(t["inter_token_s"]) == 4 for t in trials)
    assert entry["runtime"] == RUNTIME_NOTES["coreai"] and RUNTIME_NOTES["coreai"] in markdown(results)
    if sys.platform == "linux":
        assert RUNTIME_NOTES["coreai"] == "Apple's reference runtime on Linux (coreai-core), not device speed"


def model_with(path: Path, meta: dict, inputs: int, states: int, logits_dtype: str):
    """A Core AI model whose `main` has `inputs` int32 inputs, `states` states and logits of
    `logits_dtype` (each token id times ones), with the openelm metadata `meta`."""
    from coreai.authoring import AIProgram, Module
    from coreai.runtime import AIModelAssetMetadata

    from openelm_mlx.convert.coreai.graph import (
        DYNAMIC,
        C,
        F16Type,
        F32Type,
        G,
        GraphOp,
        IntegerType,
        RankedTensorType,
    )

    module = Module.create()
    with module:
        ftype = {"float16": F16Type.get(), "float32": F32Type.get()}[logits_dtype]
        ids = RankedTensorType.get([1, DYNAMIC], IntegerType.get_signed(32))
        handle = C.HandleType.get(RankedTensorType.get([1, 4], F16Type.get()))
        graph = GraphOp(
            "main",
            [ids] * inputs + [handle] * states,
            [RankedTensorType.get([1, DYNAMIC, 384], ftype)] + [C.TokenType.get()] * states,
            input_names=[f"in{i}" for i in range(inputs)] + [f"state{j}" for j in range(states)],
            result_names=["logits"] + [f"written{j}" for j in range(states)],
        )
        with graph.block:
            x = C.cast(C.reshape(graph.arguments[0], [1, -1, 1]), np.dtype(logits_dtype).type)
            written = [G.write_handle(h, *G.read_handle(h, C.create_token())) for h in graph.arguments[inputs:]]
            C.output([C.broadcasting_mul(x, np.ones((1, 1, 384), logits_dtype))] + written)
    asset_meta = AIModelAssetMetadata()
    for key, value in meta.items():
        asset_meta.set_custom(key, value)
    AIProgram(module).save_asset(path, metadata=asset_meta)


@pytest.mark.parametrize(
    "inputs,states,logits,fragment",
    [
        (1, 2, "float16", "expected 2 inputs, got 1"),
        (3, 2, "float16", "expected 2 inputs, got 3"),
        (2, 1, "float16", "expected 2-4 states (KV cache + optional persistent states), got 1"),
        (2, 5, "float16", "got 5"),
        (2, 2, "float32", "only float16 logits are supported, got float32"),
    ],
)
def test_engine_refuses_what_the_swift_engine_refuses(
    tiny_checkpoint, bundles, tmp_path, capsys, inputs, states, logits, fragment
):
    """The load-time checks of CoreAISequentialEngine.swift:110-150, one line each (generate: the
    engine is opened first; verify would stop at the weights this model lacks)."""
    bundle = copy_bundle(bundles(tiny_checkpoint)["output"], tmp_path / "b")
    asset = read_bundle(bundle).asset
    meta = json.loads((asset / "metadata.json").read_text())["creatorDefinedMetadata"]
    shutil.rmtree(asset)
    model_with(asset, meta, inputs, states, logits)
    one_line_error(capsys, ["generate", "--backend", "coreai", "--model", bundle, "-p", "hi"], fragment)
