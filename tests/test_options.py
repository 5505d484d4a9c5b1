"""The option table (openelm_mlx/options.py) seen from Python, and the checks that moved without
changing their verdict: check_stored without decompressing, outputs.check_outputs' probe. The
command-line rows of every option are in tests/bad_input_options.py and bad_input_generation.py."""

import math

import numpy as np
import pytest

from openelm_mlx import outputs
from openelm_mlx.convert.compression import Quantized, check_stored, decompress, palettize, quantize
from openelm_mlx.convert.hf_to_mlx import convert
from openelm_mlx.errors import OpenELMError
from openelm_mlx.generate import GenerationOptions
from openelm_mlx.options import TRAIN_RULES, check_options, generation_rules
from openelm_mlx.sample import Sampling


@pytest.mark.parametrize(
    "values, rules, message",
    [
        ({"temp": math.nan}, generation_rules(384, 256), "--temp must be finite and >= 0 (0 is greedy), got nan"),
        ({"top_p": 1.5}, generation_rules(384, 256), "--top-p must be in [0, 1], got 1.5"),
        ({"repetition_penalty": 0}, generation_rules(384, 256), "--repetition-penalty must be > 0 (1 turns it off)"),
        ({"temp": True}, generation_rules(384, 256), "--temp must be >= 0 (0 is greedy), got True"),
        ({"learning_rate": math.inf}, TRAIN_RULES, "--learning-rate must be finite and in (0, 10], got inf"),
        ({"min_lr_ratio": -0.5}, TRAIN_RULES, "--min-lr-ratio must be in [0, 1], got -0.5"),
        ({"head_dim": 7}, TRAIN_RULES, "--head-dim must be an even integer from 2 to 4,096"),
    ],
)
def test_a_value_out_of_range_is_one_line_naming_the_option(values, rules, message):
    with pytest.raises(OpenELMError) as e:
        check_options(values, rules)
    assert str(e.value).startswith(message)


def test_the_bounds_themselves_pass():
    check_options({"temp": 0, "top_p": 1.0, "min_p": 0.0, "repetition_penalty": 1e-9}, generation_rules(384, 256))
    check_options({"learning_rate": 10, "min_lr_ratio": 1, "weight_decay": 0, "head_dim": 4096}, TRAIN_RULES)


def test_generation_options_are_the_sampling_fields_and_the_rest():
    """One definition of the sampling fields: GenerationOptions is a Sampling."""
    options = GenerationOptions(temp=0.7, top_k=5, max_tokens=3)
    assert isinstance(options, Sampling) and (options.temp, options.top_k, options.greedy) == (0.7, 5, False)


def test_convert_refuses_bits_before_reading_anything(tmp_path):
    with pytest.raises(OpenELMError, match="--bits must be one of 4, 8, got 3"):
        convert(tmp_path / "no-such-model", tmp_path / "out", bits=3)
    assert list(tmp_path.iterdir()) == []


def dense_is_finite(stored, dtype) -> bool:
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(decompress(stored).astype(dtype)).all())


def refused(stored) -> bool:
    try:
        check_stored("w", np.zeros((1, 1), np.float32), stored, np.float16)
    except OpenELMError:
        return True
    return False


def test_check_stored_judges_as_the_decompressed_weight_would():
    """Blocks and LUTs whose largest values sit around float16's 65504: refused exactly when the
    decompressed float16 weight would hold an inf. (A float16 LUT with an inf cannot even be
    decompressed, its indices come out of range: its reference is the same LUT fitted in float32.)"""
    rng = np.random.default_rng(0)
    verdicts = []
    for _ in range(60):
        peak = 65504 * rng.uniform(0.98, 1.02)
        weight = rng.uniform(-1, 1, (32, 64)).astype(np.float32) * 100
        weight[rng.integers(32), rng.integers(64)] = peak * rng.choice([-1, 1])
        for stored in (quantize(weight, 8, 32, np.float16), quantize(weight, 4, 16, np.float16)):
            verdicts.append((refused(stored), not dense_is_finite(stored, np.float16)))
        with np.errstate(invalid="ignore", over="ignore"):
            lut16 = palettize(weight, 4, np.float16)
        verdicts.append((refused(lut16), not dense_is_finite(palettize(weight, 4, np.float32), np.float16)))
        scale = rng.uniform(400, 600, (2, 2)).astype(np.float16)  # int8 127 x ~516: around the bound
        data = rng.integers(-127, 128, (2, 64)).astype(np.int8)
        stored = Quantized(data, scale, 8)
        verdicts.append((refused(stored), not dense_is_finite(stored, np.float16)))
    assert all(a == b for a, b in verdicts)
    assert 0 < sum(b for _, b in verdicts) < len(verdicts)  # both verdicts occur


def test_the_bench_probe_leaves_nothing_and_names_what_is_there(tmp_path):
    out = tmp_path / "a" / "b"
    outputs.check_outputs([out / "results.json", out / "results.csv"], False, room=4096)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.csv").write_text("mine")
    with pytest.raises(OpenELMError, match="r/results.csv already exists: choose another output or pass --force"):
        outputs.check_outputs([tmp_path / "r" / "results.json", tmp_path / "r" / "results.csv"], False, room=4096)
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["results.csv"]
