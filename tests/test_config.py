import json
from pathlib import Path

import numpy as np
import pytest
from mlx.utils import tree_flatten

from openelm_mlx import Model, OpenELMConfig, OpenELMError
from openelm_mlx.config import make_divisible

# The four released config.json files (apple/OpenELM-*), kept as test data.
CONFIGS = Path(__file__).parent / "data" / "configs"
FILES = {"270M": "OpenELM-270M", "450M": "OpenELM-450M", "1.1B": "OpenELM-1_1B", "3B": "OpenELM-3B"}
PARAMS = {"270M": 271_527_168, "450M": 457_179_136, "1.1B": 1_079_891_456, "3B": 3_036_647_424}


@pytest.mark.parametrize("name", FILES)
def test_preset_equals_released_config(name):
    path = CONFIGS / f"{FILES[name]}.config.json"
    released = OpenELMConfig.from_pretrained(path)
    preset = OpenELMConfig.preset(name)
    raw = json.loads(path.read_text())
    for field in (
        "num_query_heads",
        "num_kv_heads",
        "ffn_multipliers",
        "model_dim",
        "head_dim",
        "num_transformer_layers",
        "vocab_size",
        "rope_freq_constant",
        "max_context_length",
    ):
        assert getattr(preset, field) == raw[field] == getattr(released, field), field
    assert preset.ffn_dims == released.ffn_dims
    # Every field of the released file is read (the remote-code and version keys aside).
    round_trip = released.to_dict()
    for key, value in raw.items():
        if key not in ("auto_map", "transformers_version"):
            assert round_trip[key] == value, key


@pytest.mark.parametrize("name", PARAMS)
def test_published_parameter_counts(name):
    config = OpenELMConfig.preset(name)
    assert config.num_parameters() == PARAMS[name]
    # Count the model's own (lazy, never evaluated) parameters too, not only the formula.
    model = Model(config)
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == PARAMS[name]


def test_ffn_dims_from_rule():
    c = OpenELMConfig.preset("1.1B")
    assert c.ffn_dims[0] == 1024 and c.ffn_dims[-1] == 8192
    assert c.ffn_dims.count(4608) == 2
    assert make_divisible(0.5 * 1280, 256) == 768


def corenet_make_divisible(v, divisor):
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def corenet_widths(qkv, ffn, model_dim, head_dim, ffn_dim_divisor, gqa=4):
    """Apple's corenet (GPTConfig.__post_init__, compute_heads and the FFN's make_divisible),
    written out again: (query heads, kv heads, ffn widths) per layer."""
    query_dims = [int(corenet_make_divisible(model_dim * m, head_dim * gqa)) for m in qkv]
    assert all(q % head_dim == 0 for q in query_dims)  # corenet's compute_heads raises otherwise
    q_heads = [q // head_dim for q in query_dims]
    return (
        q_heads,
        [q // gqa for q in q_heads],
        [int(corenet_make_divisible(m * model_dim, ffn_dim_divisor)) for m in ffn],
    )


def test_layerwise_widths_equal_corenets_for_every_layer_count():
    """Layer counts 1..64 x model_dim 128..6144 x head_dim 32/64/128 (9,216 shapes)."""
    python_rule_differs = 0
    for layers in range(1, 65):
        # corenet's multipliers: round() of numpy scalars over numpy's linspace
        qkv = [round(v, 2) for v in np.linspace(0.5, 1.0, num=layers, dtype=float)]
        ffn = [round(v, 2) for v in np.linspace(0.5, 4.0, num=layers, dtype=float)]
        # The rule before: Python's round() of Python floats. The grid must tell the two apart.
        python_qkv, python_ffn = (
            [round(a + (b - a) * i / max(layers - 1, 1), 2) for i in range(layers)] for a, b in ((0.5, 1.0), (0.5, 4.0))
        )
        for model_dim in range(128, 6145, 128):
            divisor = 256 if model_dim % 256 == 0 else 64
            for head_dim in (32, 64, 128):
                c = OpenELMConfig.layerwise(layers, model_dim, head_dim, ffn_dim_divisor=divisor)
                assert (c.qkv_multipliers, c.ffn_multipliers) == ([0.5, 1.0], ffn)
                widths = corenet_widths(qkv, ffn, model_dim, head_dim, divisor)
                assert (c.num_query_heads, c.num_kv_heads, c.ffn_dims) == widths, (layers, model_dim, head_dim)
                python_rule_differs += corenet_widths(python_qkv, python_ffn, model_dim, head_dim, divisor) != widths
    assert python_rule_differs == 264


def test_layerwise_keeps_the_demo_models_widths():
    """The shipped demo model was trained with layerwise(6, 256, 32, ffn_dim_divisor=64)."""
    demo = OpenELMConfig.from_pretrained(Path(__file__).parents[1] / "openelm_mlx" / "demo_model")
    rule = OpenELMConfig.layerwise(6, 256, 32, ffn_dim_divisor=64, vocab_size=4096, max_context_length=256)
    assert (rule.num_query_heads, rule.ffn_multipliers, rule.ffn_dims) == (
        demo.num_query_heads,
        demo.ffn_multipliers,
        demo.ffn_dims,
    )
    assert rule.ffn_dims == [128, 320, 512, 640, 832, 1024]


def test_from_pretrained_folder_and_file(tmp_path):
    c = OpenELMConfig.preset("270M")
    (tmp_path / "config.json").write_text(json.dumps(c.to_dict()))
    assert OpenELMConfig.from_pretrained(tmp_path) == OpenELMConfig.from_pretrained(tmp_path / "config.json") == c


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_query_heads": [12] * 15}, "'num_query_heads' must list one value per layer (16), got 15"),
        ({"num_kv_heads": [5] * 16}, "layer 0: 12 query heads are not divisible by 5 kv heads"),
        ({"model_dim": -1}, "field 'model_dim' must be an integer from 1 to 65,536, got -1"),
        ({"ffn_multipliers": [0.0] * 16}, "'ffn_multipliers' item 0 must be a number above 0 and at most 64, got 0.0"),
        ({"model_type": "llama"}, "field 'model_type' is 'llama', expected 'openelm'"),
        ({"activation_fn_name": "gelu"}, "must be 'swish' and 'rms_norm', got 'gelu' and 'rms_norm'"),
    ],
)
def test_inconsistent_config_is_named(tmp_path, change, message):
    raw = OpenELMConfig.preset("270M").to_dict() | change
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(OpenELMError, match=message.replace("(", r"\(").replace(")", r"\)")):
        OpenELMConfig.from_pretrained(tmp_path)


def test_missing_field_is_named(tmp_path):
    raw = OpenELMConfig.preset("270M").to_dict()
    del raw["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(OpenELMError, match="required field 'head_dim' is missing"):
        OpenELMConfig.from_pretrained(tmp_path)


def test_corenet_mlx_config_names_a_released_size(tmp_path):
    raw = {
        "model_name": "OpenELM-450M",
        "vocab_size": 32128,
        "max_context_length": 2048,
        "quantization": {"group_size": 64, "bits": 4},
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = OpenELMConfig.from_pretrained(tmp_path)
    preset = OpenELMConfig.preset("450M")
    assert config.num_query_heads == preset.num_query_heads and config.ffn_dims == preset.ffn_dims
    assert config.vocab_size == 32000 and config.quantization == {"group_size": 64, "bits": 4}
    with pytest.raises(OpenELMError, match="unknown corenet model_name 'OpenELM-7B'"):
        OpenELMConfig.from_dict({"model_name": "OpenELM-7B"})
