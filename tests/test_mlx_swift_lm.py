"""Converted folders against mlx-swift-lm's loader rules (ml-explore/mlx-swift-lm 14414441):
the config keys OpenELM.swift decodes, the parameters it builds (strict load, Load.swift:197),
the quantization entry, the tied head, the files it reads; and the notice for configs it would
rebuild differently. mlx_lm.load still reads the same folders."""

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from conftest import tiny_config

from openelm_mlx import load
from openelm_mlx.benchmarks.synthetic import write_checkpoint
from openelm_mlx.config import OpenELMConfig
from openelm_mlx.convert.hf_to_mlx import convert
from openelm_mlx.mlx_swift_lm import mlx_swift_lm_differences, swift_linspace, swift_make_divisible

ROOT = Path(__file__).resolve().parent.parent
# OpenELM.swift:250-262 decodes these (required), 289-297 the flags (optional, default true).
SWIFT_INT_KEYS = ("head_dim", "num_transformer_layers", "model_dim", "vocab_size", "ffn_dim_divisor")
SWIFT_FLAGS = ("ffn_with_glu", "normalize_qk_projections", "share_input_output_layers")


def swift_parameters(raw: dict) -> dict:
    """{name: shape} of the module OpenELM.swift builds from config.json (only the keys it reads)."""
    n, dim, hd = raw["num_transformer_layers"], raw["model_dim"], raw["head_dim"]
    qkv, ffn = swift_linspace(0.5, 1.0, n), swift_linspace(0.5, 4.0, n)
    params = {"transformer.token_embeddings.weight": (raw["vocab_size"], dim), "transformer.norm.weight": (dim,)}
    for i in range(n):
        q = swift_make_divisible(dim * qkv[i], hd * 4) // hd  # :270-281
        kv = q // 4
        inner = swift_make_divisible(ffn[i] * dim, raw["ffn_dim_divisor"])  # :105-111
        p = f"transformer.layers.{i}."
        params.update(
            {
                p + "attn.qkv_proj.weight": ((q + 2 * kv) * hd, dim),
                p + "attn.out_proj.weight": (dim, q * hd),
                p + "attn.q_norm.weight": (hd,),
                p + "attn.k_norm.weight": (hd,),
                p + "ffn.proj_1.weight": (2 * inner, dim),
                p + "ffn.proj_2.weight": (dim, inner),
                p + "attn_norm.weight": (dim,),
                p + "ffn_norm.weight": (dim,),
            }
        )
    return params  # share_input_output_layers true: no lm_head (:194-206)


def quantized(params: dict, group_size: int, bits: int) -> dict:
    """A module with `.scales` in the weights is quantized (Load.swift:181-193): the Linears and
    the Embedding whose rows split into whole groups (mlx-lm's rule, which our writer follows)."""
    out = {}
    for name, shape in params.items():
        if len(shape) == 2 and shape[1] % group_size == 0:
            module = name.removesuffix(".weight")
            rows, cols = shape
            out.update(
                {
                    name: (rows, cols * bits // 32),
                    module + ".scales": (rows, cols // group_size),
                    module + ".biases": (rows, cols // group_size),
                }
            )
        else:
            out[name] = shape
    return out


@pytest.mark.parametrize("bits", [None, 4])
def test_converted_folder_loads_in_mlx_swift_lm(tiny_checkpoint, tmp_path, bits):
    out = convert(tiny_checkpoint, tmp_path / f"swift-{bits}", dtype="float32", bits=bits, chat_template="instruct")
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "openelm" and raw["eos_token_id"] == 2
    assert all(type(raw[k]) is int for k in SWIFT_INT_KEYS) and all(raw[k] is True for k in SWIFT_FLAGS)
    weights = {}
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files and all(re.fullmatch(r"model.*\.safetensors", f) for f in files)
    for f in files:
        weights.update(mx.load(str(out / f)))
    expected = swift_parameters(raw)
    if bits:
        assert {k: raw["quantization"][k] for k in ("group_size", "bits")} == {"group_size": 64, "bits": 4}
        assert raw["quantization"]["mode"] == "affine"
        expected = quantized(expected, 64, 4)
        packed = [k.replace(".scales", ".weight") for k in weights if k.endswith(".scales")]
        assert "transformer.token_embeddings.weight" in packed and len(packed) > 10
        assert all(weights[k].dtype == mx.uint32 for k in packed)
    else:
        assert "quantization" not in raw
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    # The tokenizer swift-transformers' AutoTokenizer.from(modelFolder:) reads; EOS for the stop set.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model"):
        assert (out / name).is_file(), name
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    # mlx-lm reads the same folder, tokenizer.json included, as our loader does.
    model, their_tokenizer = mlx_lm.load(str(out))
    ours, tokenizer = load(out)
    text = "  Once upon a time,\n\tcafé 🙂</s> end"
    assert their_tokenizer.encode(text) == tokenizer.encode(text)
    tokens = mx.array([tokenizer.encode(text)])
    assert mx.abs(model(tokens) - ours(tokens)).max().item() <= 1e-4


def custom_config() -> OpenELMConfig:
    """Uniform widths and a longer rope: a valid OpenELM that mlx-swift-lm would rebuild otherwise."""
    return OpenELMConfig(
        num_transformer_layers=2,
        model_dim=128,
        head_dim=16,
        num_query_heads=[8, 8],
        num_kv_heads=[2, 2],
        ffn_multipliers=[1.0, 1.0],
        ffn_dim_divisor=32,
        vocab_size=384,
        max_context_length=256,
        rope_freq_constant=500000,
    )


def test_released_configs_match_what_mlx_swift_lm_rebuilds():
    for name in ("270M", "450M", "1.1B", "3B"):
        assert mlx_swift_lm_differences(OpenELMConfig.preset(name)) == []
    for path in sorted((ROOT / "tests" / "data" / "configs").glob("*.json")):
        assert mlx_swift_lm_differences(OpenELMConfig.from_dict(json.loads(path.read_text()))) == [], path
    assert mlx_swift_lm_differences(tiny_config()) == []  # the released recipe at a tiny size
    assert mlx_swift_lm_differences(custom_config()) == [
        "num_query_heads [8, 8] (it uses [4, 8])",
        "num_kv_heads [2, 2] (it uses [1, 2])",
        "ffn widths [128, 128] (it uses [64, 512])",
        "rope_freq_constant 500000 (it uses 10000)",
    ]


def test_convert_notes_a_config_mlx_swift_lm_rebuilds_differently(tmp_path, tokenizer_file, cli_here):
    custom = write_checkpoint(tmp_path / "custom", custom_config(), tokenizer=tokenizer_file)
    result = cli_here("convert", custom, "-o", tmp_path / "out", "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "mlx-swift-lm" in line]
    assert len(lines) == 1 and lines[0].startswith("openelm: note: mlx-swift-lm rebuilds"), result.stderr
    assert "num_query_heads [8, 8] (it uses [4, 8])" in lines[0] and "rope_freq_constant 500000" in lines[0]


def test_convert_is_silent_for_the_released_recipe(tiny_checkpoint, tmp_path, cli_here):
    result = cli_here("convert", tiny_checkpoint, "-o", tmp_path / "out", "--dtype", "float32")
    assert result.returncode == 0 and "mlx-swift-lm" not in result.stderr, result.stderr
