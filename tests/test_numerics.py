"""The float16 guard (convert/numerics.py) and the storage checks (convert/compression.py): massive
activations at BOS, a full stop, a newline and a chat-template marker stay finite and match MLX in
both exports; the weight bounds hold and do not depend on the calibration text; weights past
float16's range are folded, compressed or refused, never written as inf."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import (
    MASSIVE_CHANNEL,
    MASSIVE_LAYER,
    MASSIVE_TRIGGERS,
    assert_clean_error,
    run_cli,
    write_massive_checkpoint,
)

from openelm_mlx.convert.numerics import (
    BOUND_MARGIN,
    FLOAT16_MAX,
    calibration_peaks,
    calibration_text,
    calibration_tokens,
    ffn_scale_exponents,
    top_eigenvalue_bound,
    weight_bounds,
)
from openelm_mlx.convert.package import model_weights
from openelm_mlx.loader import DEMO_MODEL, load_model
from openelm_mlx.tokenizer import Tokenizer, chat_prompt

# A prompt per trigger, with the trigger after BOS except for "bos": the massive activation in the
# middle of what an app sends. Each has no near-tie (MLX's top-2 margin >= 0.08) in its greedy run.
PROMPTS = {
    "bos": "A journey of a thousand miles begins with a single step.",
    "period": "It read every book in the library. Once upon a time there was a little model",
    "newline": "Once upon a time there was a little model.\nIt read every book in the library",
    "chat": chat_prompt([{"role": "user", "content": "Write stories about the sea and the stars."}]),
}


def massive_positions(checkpoint: Path, prompt: str):
    """(tokens, the positions where MLX float32's residual stream passes float16's range after
    MASSIVE_LAYER, the largest |value| elsewhere)."""
    model, _ = load_model(checkpoint, "float32")
    tokens = Tokenizer(checkpoint / "tokenizer.model").encode(prompt)
    h = model.transformer.token_embeddings(mx.array([tokens]))
    for layer in model.layers[: MASSIVE_LAYER + 1]:
        h = layer(h, "causal")
    channel = np.abs(np.array(h[0, :, MASSIVE_CHANNEL]))
    return tokens, np.flatnonzero(channel > FLOAT16_MAX), float(channel[channel <= FLOAT16_MAX].max())


@pytest.mark.parametrize("trigger", list(MASSIVE_TRIGGERS))
def test_the_massive_activation_is_where_real_models_put_it(massive_checkpoint, trigger):
    checkpoint = massive_checkpoint(trigger)
    tokens, where, elsewhere = massive_positions(checkpoint, PROMPTS[trigger])
    trigger_id = Tokenizer(checkpoint / "tokenizer.model").sp.piece_to_id(MASSIVE_TRIGGERS[trigger])
    assert list(where) == [i for i, t in enumerate(tokens) if t == trigger_id] and len(where) >= 1
    assert (where[0] == 0) == (trigger == "bos") and elsewhere < 100
    model, _ = load_model(checkpoint, "float32")
    weights = model_weights(model)
    assert max(np.abs(w).max() for w in weights.values()) <= 40  # ordinary weights


def test_calibration_text_has_what_real_prompts_have():
    text = calibration_text()
    for marker in ("<|system|>\n", "<|user|>\n", "<|assistant|>\n", "</s>\n", ". ", ", ", "\n\n", "2024", "def ", "{"):
        assert marker in text, marker
    tok = Tokenizer(DEMO_MODEL / "tokenizer.model")
    windows = calibration_tokens(tok, 256)
    assert windows[0][0] == tok.bos_id and tok.eos_id in windows[0] and max(map(len, windows)) == 256


@pytest.mark.parametrize("source", ["demo", "bos", "chat"])
def test_weight_bounds_hold_over_the_calibration_text(massive_checkpoint, source):
    """Every float16 tensor's peak on real text lies within its bound from the weights; on the
    trained demo model no layer needs rescaling, and the bounds of its FFN outputs stay within
    ~100x of what text reaches (a looser bound would push k up for nothing)."""
    checkpoint = DEMO_MODEL if source == "demo" else massive_checkpoint(source)
    model, _ = load_model(checkpoint, "float32")
    tok = Tokenizer(checkpoint / "tokenizer.model")
    bounds = weight_bounds(model_weights(model), model.config)
    for window in calibration_tokens(tok, model.config.max_context_length):
        for bound, peak in zip(bounds, calibration_peaks(model, window)):
            assert all(peak[name] <= bound[name] * (1 + 1e-3) for name in peak), (peak, bound)
    if source == "demo":
        assert ffn_scale_exponents(model, model_weights(model), "float16", tok) == [0] * len(bounds)
        assert all(b["proj_2"] < 2000 for b in bounds)
    else:  # the massive unit's bound is ~1.7x its real peak (~1e5): k = 3, not 6 as a 32x margin gave
        assert FLOAT16_MAX < bounds[MASSIVE_LAYER]["proj_2"] < 2e5


def test_top_eigenvalue_bound_is_above_the_eigenvalue_and_close():
    rng = np.random.default_rng(0)
    for rows, d in ((64, 128), (1024, 256)):  # low rank and full rank
        m = rng.standard_normal((rows, d))
        m[0] *= 30  # one dominant direction, as a massive-activation unit makes
        for gram in (m.T @ m, (m[1:].T @ m[1:])):
            exact = np.linalg.eigvalsh(gram)[-1]
            assert exact <= top_eigenvalue_bound(gram) < 1.1 * exact


def test_rescaling_does_not_depend_on_the_calibration_text(tmp_path, tokenizer_file):
    """A massive activation at '~', a token the calibration text never holds: calibration sees
    nothing, the weight bound still scales the layer enough for the prompt that has it."""
    tok = Tokenizer(tokenizer_file)
    assert "~" not in calibration_text()
    checkpoint = write_massive_checkpoint(tmp_path / "tilde", tokenizer_file, tok.sp.piece_to_id("<0x7E>"))
    model, _ = load_model(checkpoint, "float32")
    peaks = [calibration_peaks(model, w)[MASSIVE_LAYER]["proj_2"] for w in calibration_tokens(tok, 256)]
    assert max(peaks) < 100
    k = ffn_scale_exponents(model, model_weights(model), "float16", tok)
    real = calibration_peaks(model, tok.encode("The sea and the stars ~ once upon a time"))[MASSIVE_LAYER]
    assert real["proj_2"] > FLOAT16_MAX and k[MASSIVE_LAYER] == 3
    assert real["proj_2"] * 2.0 ** -k[MASSIVE_LAYER] <= FLOAT16_MAX / BOUND_MARGIN


def verifier(target):
    """verify_coreai (Apple's runtime) or verify_coreml (the numpy MIL executor), or a skip."""
    if target == "coreai":
        pytest.importorskip("coreai.runtime")
        from openelm_mlx.convert.coreai.verify import verify_coreai

        return verify_coreai
    pytest.importorskip("coremltools")
    from openelm_mlx.convert.coreml.verify import verify_coreml

    return verify_coreml


def export_ios(checkpoint, tmp_path_factory) -> dict:
    """The iOS static-shape bundle of `checkpoint`, with a small ladder (contexts 64 and 128, q 8
    and 16) that keeps float16 on Apple's Linux runtime quick."""
    from openelm_mlx.convert.coreai.export import export_coreai
    from openelm_mlx.convert.coreai.ios_graph import StaticShapes

    out = tmp_path_factory.mktemp("ios") / "bundle"
    return export_coreai(
        checkpoint, out, target="ios", context=128, static_shapes=StaticShapes.ladder(128, 64, (8, 16))
    )


@pytest.mark.parametrize("target", ["coreai", "coreai-ios", "coreml"])
@pytest.mark.parametrize("trigger", list(MASSIVE_TRIGGERS))
def test_float16_export_holds_the_massive_activation(massive_checkpoint, exported, tmp_path_factory, trigger, target):
    """~1e5 in one FFN channel at the trigger: a float16 proj_2 output would be inf and every
    later logit NaN. Rescaled (k = 3 in that layer alone), each export (Core AI macOS and iOS
    bundles, Core ML) is finite, within tolerance of MLX float32 and greedy identical, prefill over
    the trigger and 4 decode steps."""
    checkpoint = massive_checkpoint(trigger)
    if target == "coreai-ios":
        pytest.importorskip("coreai.runtime")
        summary, target = export_ios(checkpoint, tmp_path_factory), "coreai"
    else:
        summary = exported(target, checkpoint)
    assert summary["ffn_scale_exponents"] == [3 if i == MASSIVE_LAYER else 0 for i in range(4)]
    report = verifier(target)(summary["output"], checkpoint, steps=4, prompt=PROMPTS[trigger])
    (backend,) = [b for b in report.backends if b.backend in ("coreai", "mil-reference")]
    assert report.ok and len(backend.steps) == 5 and backend.agreement == 1.0, report
    assert max(s.max_abs_diff for s in backend.steps) < backend.tolerance


BIG = 1e5  # a weight past float16's 65504
PROJ_2 = "transformer.layers.0.ffn.proj_2.weight"
PROJ_1 = "transformer.layers.0.ffn.proj_1.weight"


def big_weight_checkpoint(tmp_path, tokenizer_file, name, where=(0, 0)):
    folder = tmp_path / "model" / name.split(".")[-2]
    return write_massive_checkpoint(folder, tokenizer_file, 1, big_weight=(name, where, BIG))


@pytest.mark.parametrize(
    "command,suffix,compress", [("export-coreai", "", "none"), ("export-coreml", ".mlpackage", "int8")]
)
def test_a_weight_float16_cannot_hold_is_refused_in_one_line(tmp_path, tokenizer_file, command, suffix, compress):
    """proj_2 cannot take a power-of-two fold (its output is what the fold scales), and an int8
    scale that fits does not help (the device decompresses to float16): refused, naming the tensor
    and what to do, with nothing written, instead of a package of inf."""
    checkpoint = big_weight_checkpoint(tmp_path, tokenizer_file, PROJ_2)
    out = tmp_path / f"big{suffix}"
    result = run_cli(command, checkpoint, "-o", out, "--context", 128, "--compress", compress)
    assert_clean_error(result, PROJ_2, "1e+05", "float16's largest 65504", "--compute-precision float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("value", [np.inf, np.nan])
def test_a_weight_of_inf_or_nan_is_refused_before_the_bounds(tmp_path, tokenizer_file, value):
    """The float16 bounds' searches (the eigenvalue's growing mu, the exponent's halving) never end
    on inf or NaN: a damaged checkpoint is one line, at once, nothing written."""
    folder = tmp_path / "model" / "damaged"
    checkpoint = write_massive_checkpoint(folder, tokenizer_file, 1, big_weight=(PROJ_1, (0, 0), value))
    result = run_cli("export-coreml", checkpoint, "-o", tmp_path / "out.mlpackage", "--context", 128, timeout=60)
    assert_clean_error(result, PROJ_1, "inf or NaN", "convert it again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def package_arrays(summary, target):
    """Every constant of an exported package's (last) function by name, weights decompressed."""
    if target == "coreai":
        from openelm_mlx.convert.coreai.weights import named_constants

        out = Path(summary["output"])  # the .aimodel, or the bundle folder that holds one
        return named_constants(next(out.glob("*.aimodel"), out))
    from openelm_mlx.convert.coreml.executor import MILExecutor

    executor = MILExecutor(summary["output"])
    return executor.constants(executor.functions[-1])  # the weights are shared: any function has them all


@pytest.mark.parametrize("target", ["coreai", "coreml"])
def test_a_weight_of_1e5_in_up_is_folded_exactly(tmp_path, tokenizer_file, exported, target):
    """1e5 in layer 0's first `up` row (ffn_dims[0] = 64): its layer's bound sets k = 8, and the
    row is stored times 2**-8 (an exact power of two; 390.625 then rounds to float16 as every
    weight does): finite, verified against MLX."""
    checkpoint = big_weight_checkpoint(tmp_path, tokenizer_file, PROJ_1, (64, 0))
    summary = exported(target, checkpoint)
    stored = package_arrays(summary, target)
    assert all(np.isfinite(a).all() for a in map(np.asarray, stored.values()) if a.dtype.kind == "f")
    k = summary["ffn_scale_exponents"][0]
    assert k == 8 and summary["ffn_scale_exponents"][1:] == [3, 0, 0]
    proj_1 = next(np.asarray(a, np.float32) for n, a in stored.items() if n in (PROJ_1, PROJ_1.replace(".", "_")))
    assert np.float16(BIG * 2.0**-k) in (proj_1[64, 0], proj_1[0, 64])  # [out, in] in Core ML, [in, out] in Core AI
    report = verifier(target)(summary["output"], checkpoint, steps=2)
    assert report.ok and report.weight_max_rel_error < 5e-4, report


@pytest.mark.parametrize(
    "name,where,value,message",
    [
        ("transformer.norm.weight", (5,), 1e4, "layer 3's logits reaches .* on the calibration text"),
        ("transformer.layers.2.attn.q_norm.weight", (0,), 1e4, "layer 2's attention scores can reach"),
        (PROJ_1, (64, 0), 1e7, r"layer 0's FFN can reach .*2\*\*-1[3-9]"),
    ],
)
def test_what_float16_cannot_hold_even_rescaled_is_refused(tmp_path, tokenizer_file, name, where, value, message):
    """The logits (calibration text within 4x of 65504), the scores (their QK-norm bound) and an
    FFN that would need k > MAX_EXPONENT: refused in one line pointing to float32."""
    from openelm_mlx.errors import OpenELMError

    checkpoint = write_massive_checkpoint(tmp_path / "m", tokenizer_file, 1, big_weight=(name, where, value))
    model, _ = load_model(checkpoint, "float32")
    tok = Tokenizer(tokenizer_file)
    with pytest.raises(OpenELMError, match=message + ".*--compute-precision float32"):
        ffn_scale_exponents(model, model_weights(model), "float16", tok)
    assert ffn_scale_exponents(model, model_weights(model), "float32", tok) == [0] * 4
