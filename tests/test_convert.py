"""`openelm convert`: every source form, 4/8-bit, loading the output in both toolkits, the chat
template of Instruct models, and what the folder records about its source."""

import json
import shutil

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from conftest import tiny_config
from mlx_lm.utils import load_model as mlx_lm_load_model

from openelm_mlx import generate, load
from openelm_mlx.benchmarks.synthetic import random_weights, write_checkpoint
from openelm_mlx.convert.hf_to_mlx import convert
from openelm_mlx.errors import OpenELMError
from openelm_mlx.hf_tokenizer import TOKENIZER_CHAT_TEMPLATE
from openelm_mlx.loader import load_model
from openelm_mlx.model_folder import source_name
from openelm_mlx.tokenizer import chat_prompt, is_instruct_model

TOKENS = mx.array(np.random.default_rng(3).integers(0, 384, (1, 20)))


def logits(model):
    return model(TOKENS).astype(mx.float32)


def diff(a, b):
    return mx.abs(a - b).max().item()


@pytest.fixture(scope="module")
def reference_logits(tiny_checkpoint):
    return logits(load_model(tiny_checkpoint, "float32")[0])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_output_loads_in_both_with_equal_logits(tiny_checkpoint, tmp_path, reference_logits, bits):
    out = convert(tiny_checkpoint, tmp_path / f"q{bits}", dtype="float32", bits=bits)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}
    assert config["converted_by"]["tool"] == "openelm-mlx" and config["converted_by"]["source"] == "OpenELM-tiny"
    assert (out / "tokenizer.model").read_bytes() == (tiny_checkpoint / "tokenizer.model").read_bytes()
    ours, _ = load_model(out, "float32")
    theirs, _ = mlx_lm_load_model(out)
    assert diff(logits(ours), logits(theirs)) <= 1e-4  # 20 tokens: our dequantize-then-BLAS path on a CPU
    assert diff(ours(TOKENS[:, :4]), theirs(TOKENS[:, :4])) <= 1e-4  # few tokens: the quantized kernel
    # Error relative to the logits' range on random weights (measured: 0.036 at 8 bits, 0.50 at 4).
    rel = diff(logits(ours), reference_logits) / mx.abs(reference_logits).max().item()
    assert 0 < rel < (0.08 if bits == 8 else 1.0), rel
    weights = mx.load(str(out / "model.safetensors"))
    assert weights["transformer.layers.0.attn.qkv_proj.weight"].dtype == mx.uint32
    assert weights["transformer.token_embeddings.weight"].dtype == mx.uint32


def test_no_quantize_embedding_and_group_size(tiny_checkpoint, tmp_path):
    out = convert(tiny_checkpoint, tmp_path / "q4", dtype="float32", bits=4, group_size=32, quantize_embedding=False)
    weights = mx.load(str(out / "model.safetensors"))
    assert weights["transformer.token_embeddings.weight"].dtype == mx.float32
    assert "transformer.token_embeddings.scales" not in weights
    assert weights["transformer.layers.1.ffn.proj_1.scales"].shape[-1] == 128 // 32
    ours, _ = load_model(out, "float32")
    theirs, _ = mlx_lm_load_model(out)
    assert diff(logits(ours), logits(theirs)) <= 1e-4


def test_float_conversion_is_exact_and_auto_dtype_is_16_bit(tiny_checkpoint, tmp_path, reference_logits):
    out = convert(tiny_checkpoint, tmp_path / "f32", dtype="float32")
    assert diff(logits(load_model(out, "float32")[0]), reference_logits) == 0
    out16 = convert(tiny_checkpoint, tmp_path / "auto")
    assert json.loads((out16 / "config.json").read_text())["torch_dtype"] == "float16"
    assert mx.load(str(out16 / "model.safetensors"))["transformer.norm.weight"].dtype == mx.float16
    model, _ = load_model(out16)  # auto on a CPU: float32 activations
    assert model.transformer.norm.weight.dtype == mx.float32
    assert diff(logits(model), reference_logits) < 0.05


def test_sharded_source_and_output_index(tmp_path, tokenizer_file, monkeypatch):
    config = tiny_config()
    src = write_checkpoint(tmp_path / "sharded", config, random_weights(config, seed=5), tokenizer_file, shards=3)
    assert len(list(src.glob("model-*.safetensors"))) == 3
    monkeypatch.setattr("openelm_mlx.model_folder.MAX_SHARD_BYTES", 400_000)
    out = convert(src, tmp_path / "out", dtype="float32")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    a, b = load_model(src, "float32")[0], load_model(out, "float32")[0]
    assert diff(logits(a), logits(b)) == 0
    assert diff(logits(b), logits(mlx_lm_load_model(out)[0])) <= 1e-4


def test_corenet_mlx_export(tmp_path):
    """Apple's corenet export: no `transformer.` prefix, a 32128-row embedding, weights.safetensors."""
    config = tiny_config(vocab_size=32000, layers=2)
    weights = random_weights(config, seed=6)
    hf = write_checkpoint(tmp_path / "hf", config, weights)
    corenet = tmp_path / "corenet"
    corenet.mkdir()
    (corenet / "config.json").write_text((hf / "config.json").read_text())
    padded = {k.removeprefix("transformer."): mx.array(v) for k, v in weights.items()}
    emb = padded["token_embeddings.weight"]
    padded["token_embeddings.weight"] = mx.concatenate([emb, mx.ones((128, emb.shape[1]))])
    mx.save_safetensors(str(corenet / "weights.safetensors"), padded)
    tokens = mx.array([[1, 500, 31999, 7]])
    a = load_model(hf, "float32")[0](tokens)
    b = load_model(corenet, "float32")[0](tokens)
    assert diff(a, b) == 0
    out = convert(corenet, tmp_path / "mlx", dtype="float32")
    assert diff(mlx_lm_load_model(out)[0](tokens), a) <= 1e-4


def test_cli_convert_and_generate(tiny_checkpoint, tmp_path, cli_here):
    out = tmp_path / "q8"
    result = cli_here(
        "convert", tiny_checkpoint, "-o", out, "--bits", "8", "--dtype", "float32", "--chat-template", "instruct"
    )
    assert result.returncode == 0, result.stderr
    assert "bits per weight (Instruct: chat template in tokenizer_config.json)" in result.stdout
    assert chat_template_of(out) == TOKENIZER_CHAT_TEMPLATE
    gen = cli_here("generate", "--model", out, "--max-tokens", "12", "--prompt", "Once upon a time")
    assert gen.returncode == 0, gen.stderr
    model, tokenizer = load(out)
    assert gen.stdout == generate(model, tokenizer, "Once upon a time", max_tokens=12) + "\n"
    stats = gen.stderr.strip().splitlines()[-1]
    assert stats.startswith("prompt: 5 tokens") or "prompt:" in stats
    assert "generation:" in stats and "time to first token" in stats and "peak memory" in stats


def test_mlx_lm_load_reads_the_output_with_the_same_tokenizer(tiny_checkpoint, tmp_path):
    out = convert(tiny_checkpoint, tmp_path / "q4", dtype="float32", bits=4)
    model, mlx_lm_tokenizer = mlx_lm.load(str(out))
    ours, tokenizer = load(out)
    text = "Once upon a time, café 🙂"
    assert mlx_lm_tokenizer.encode(text) == tokenizer.encode(text)
    tokens = mx.array([tokenizer.encode(text)])
    assert diff(model(tokens), ours(tokens)) <= 1e-4


MESSAGES = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Name a sea."},
    {"role": "assistant", "content": "The North Sea."},
    {"role": "user", "content": "Another one?"},
]


def chat_template_of(folder):
    return json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")


def test_instruct_models_carry_apples_chat_template(tiny_checkpoint, tmp_path):
    instruct = shutil.copytree(tiny_checkpoint, tmp_path / "OpenELM-tiny-Instruct")
    out = convert(instruct, tmp_path / "instruct", dtype="float32")
    assert chat_template_of(out) == TOKENIZER_CHAT_TEMPLATE
    # mlx-lm renders it (and tokenizes the result without adding BOS): BOS, then Apple's template.
    _, tokenizer = mlx_lm.load(str(out))
    assert tokenizer.has_chat_template
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text == "<s>" + chat_prompt(MESSAGES)
    assert text.endswith("</s>\n<|user|>\nAnother one?</s>\n<|assistant|>\n")
    assert tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)[0] == 1

    # A base model gets none, unless asked; an Instruct one keeps it through a second conversion.
    base = convert(tiny_checkpoint, tmp_path / "base", dtype="float32")
    assert chat_template_of(base) is None and not is_instruct_model("base", base)
    assert chat_template_of(convert(out, tmp_path / "again", dtype="float32")) == TOKENIZER_CHAT_TEMPLATE
    assert chat_template_of(convert(base, tmp_path / "forced", dtype="float32", chat_template="instruct"))
    assert chat_template_of(convert(instruct, tmp_path / "none", dtype="float32", chat_template="none")) is None
    with pytest.raises(OpenELMError, match="--chat-template must be one of auto, instruct, none, got 'chatml'"):
        convert(instruct, tmp_path / "bad", chat_template="chatml")
    # Every other field is the same for both: the LLaMA tokenizer, BOS added, the model's context.
    config = json.loads((base / "tokenizer_config.json").read_text())
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    assert config == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
        "added_tokens_decoder": {str(i): {"content": t, **special} for i, t in enumerate(["<unk>", "<s>", "</s>"])},
    }
    assert not (base / "chat_template.jinja").exists()
    assert (out / "chat_template.jinja").read_text() == TOKENIZER_CHAT_TEMPLATE


def test_converted_by_source_is_a_repo_id_or_a_folder_name(tiny_checkpoint, tmp_path, monkeypatch):
    """Folders get uploaded: no absolute path of the converting machine may be in them."""
    # A folder of the Hugging Face cache is recorded as the repo id it caches, and is known as Instruct.
    snapshot = tmp_path / "hub" / "models--apple--OpenELM-tiny-Instruct" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_checkpoint, snapshot)
    out = convert(snapshot, tmp_path / "from-cache", dtype="float32")
    assert json.loads((out / "config.json").read_text())["converted_by"]["source"] == "apple/OpenELM-tiny-Instruct"
    assert chat_template_of(out) == TOKENIZER_CHAT_TEMPLATE
    # A relative path, or ".", is recorded by the folder's name.
    monkeypatch.chdir(tiny_checkpoint)
    out = convert(".", tmp_path / "from-dot", dtype="float32")
    assert json.loads((out / "config.json").read_text())["converted_by"]["source"] == "OpenELM-tiny"
    for file in [*out.glob("*.json"), *(tmp_path / "from-cache").glob("*.json")]:
        assert str(tmp_path) not in file.read_text() and str(tiny_checkpoint) not in file.read_text(), file
    assert source_name("apple/OpenELM-270M-Instruct") == "apple/OpenELM-270M-Instruct"
