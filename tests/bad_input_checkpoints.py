"""Bad-input rows for hostile or broken checkpoints: missing paths, non-regular files, malformed
config.json, index, safetensors headers and quantization entries, and tokenizers that do not fit
the model. Each row runs through tests/test_bad_input.py's runner."""

import os
import shutil
import struct

import mlx.core as mx
from bad_input import (
    BENCH,
    CHAT,
    CONVERT,
    DELETE,
    EVAL,
    EXPORT,
    GENERATE,
    INDEX_JSON,
    TRAIN,
    Row,
    category,
    config,
    deep,
    fifo_text,
    first_tensor_to,
    header_blob,
    index,
    move_first_tensor,
    nothing,
    pickle_only,
    quantization,
    remove,
    retensor,
    root_file,
    shift_tensor,
    special,
    tensor_field,
    tokenizer_copy,
    weight_map,
    write,
)
from sentencepiece import sentencepiece_model_pb2

OUTSIDE = "a shard must be a file in the index's own folder"

PATHS = category(
    "path",
    Row("dot-slash-typo", ("generate", "--model", "./typo", "-p", "hi"), nothing, "no model folder at './typo'"),
    Row("parent-typo", ("chat", "--model", "../typo"), nothing, "no model folder at '../typo'"),
    Row(
        "absolute",
        ("generate", "--model", "/nonexistent/model", "-p", "hi"),
        nothing,
        "no model folder at '/nonexistent/model'",
    ),
    Row(
        "home",
        ("eval", "ppl", "--model", "~/no-such-openelm-folder"),
        nothing,
        "no model folder at '~/no-such-openelm-folder'",
    ),
    Row("three-parts", ("convert", "a/b/c", "-o", "{out}"), nothing, "no model folder at 'a/b/c'"),
    Row("bare-name", ("convert", "typo", "-o", "{out}"), nothing, "no model folder at 'typo'"),
    Row("backslash", ("generate", "--model", "owner\\name", "-p", "hi"), nothing, "no model folder at 'owner\\name'"),
    Row(
        "repo-offline",
        ("generate", "--model", "nobody/no-such-openelm", "-p", "hi"),
        nothing,
        "no model folder at 'nobody/no-such-openelm', and cannot download 'nobody/no-such-openelm' from the Hugging Face Hub: offline",
    ),
    Row("bench-typo", ("bench", "--models", "./typo", "--out", "{out}"), nothing, "no model folder at './typo'"),
    Row("file-not-folder", ("generate", "--model", "{model}/config.json", "-p", "hi"), nothing, "is not a folder"),
    Row("tokenizer-typo", (*GENERATE, "--tokenizer", "./typo.model"), nothing, "no tokenizer.model at ./typo.model"),
)

# Something else the toolkit makes, or a file mistaken for a model: what it is and what to pass
# instead (checkpoint.what_else). Runs from the work folder, so the paths are relative.
CORE_AI = (
    "is a Core AI model (export-coreai), not a model folder: run its bundle folder with --backend coreai, "
    "or pass the model folder it was exported from"
)
CORE_ML = (
    "is a Core ML model (export-coreml), not a model folder: run an .mlpackage with --backend coreml (macOS) "
    "or --backend mil-reference, or pass the model folder it was exported from"
)
SIZES = (
    "not a size bench knows: choose from 270M, 450M, 1.1B, 3B (OpenELM's released sizes, random weights of "
    "their shapes), or give a checkpoint folder or Hub repo id"
)
NOT_A_MODEL = category(
    "not-a-model",
    Row(
        "bundle-folder", ("generate", "--model", "model/b", "-p", "hi"), nothing, f"model/b {CORE_AI}", base="packages"
    ),
    Row("aimodel-file", ("eval", "ppl", "--model", "m.aimodel"), root_file("m.aimodel"), f"m.aimodel {CORE_AI}"),
    Row(
        "mlpackage", ("chat", "--model", "model/p.mlpackage"), nothing, f"model/p.mlpackage {CORE_ML}", base="packages"
    ),
    Row(
        "gguf",
        ("convert", "m.gguf", "-o", "{out}"),
        root_file("m.gguf"),
        "m.gguf is a GGUF file (llama.cpp's format): openelm-mlx reads safetensors checkpoint folders, "
        "such as apple/OpenELM-270M",
    ),
    Row(
        "safetensors-file",
        ("generate", "--model", "model/model.safetensors", "-p", "hi"),
        nothing,
        "model/model.safetensors is not a folder: pass model, the folder that holds config.json and the weights",
    ),
    Row(
        "tokenizer-file",
        ("generate", "--model", "model/tokenizer.model", "-p", "hi"),
        nothing,
        "model/tokenizer.model is a tokenizer, not a model: pass the model folder instead (and this file with "
        "--tokenizer)",
    ),
    Row(
        "train-run-folder",
        ("generate", "--model", "model", "-p", "hi"),
        nothing,
        "model is a training run folder (openelm train): its model is model/model, pass that",
        base="run",
    ),
    Row("bench-size-7B", ("bench", "--models", "7B", "--out", "{out}"), nothing, f"--models 7B: {SIZES}"),
    Row("bench-size-1_1B", ("bench", "--models", "270M,1_1B", "--out", "{out}"), nothing, f"--models 1_1B: {SIZES}"),
)

SPECIAL_FILES = category(
    "special",
    Row(
        "config-fifo",
        GENERATE,
        special("config.json", "fifo"),
        "config.json is a named pipe (FIFO), not a regular file",
    ),
    Row("config-folder", CONVERT, special("config.json", "folder"), "config.json is a folder, not a regular file"),
    Row("config-device", EVAL, special("config.json", "device"), "config.json is a character device"),
    Row("config-broken-link", CHAT, special("config.json", "broken-link"), "config.json is a broken link"),
    Row("weights-fifo", CONVERT, special("model.safetensors", "fifo"), "model.safetensors is a named pipe (FIFO)"),
    Row("weights-device", BENCH, special("model.safetensors", "device"), "model.safetensors is a character device"),
    Row("weights-socket", EXPORT, special("model.safetensors", "socket"), "model.safetensors is a socket"),
    Row(
        "index-fifo",
        GENERATE,
        special(INDEX_JSON, "fifo"),
        "model.safetensors.index.json is a named pipe",
        base="sharded",
    ),
    Row(
        "shard-fifo",
        EVAL,
        special("model-00002-of-00002.safetensors", "fifo"),
        "model-00002-of-00002.safetensors is a named pipe",
        base="sharded",
    ),
    Row(
        "shard-broken-link",
        GENERATE,
        special("model-00001-of-00002.safetensors", "broken-link"),
        "model-00001-of-00002.safetensors is a broken link (to ../blobs/0123abcd)",
        base="sharded",
    ),
    Row("tokenizer-fifo", GENERATE, special("tokenizer.model", "fifo"), "tokenizer.model is a named pipe"),
    Row("tokenizer-dev-null", (*CHAT, "--tokenizer", "/dev/null"), nothing, "/dev/null is a character device"),
    Row("train-text-fifo", (*TRAIN, "--text", "text.txt"), fifo_text, "no text file at text.txt"),
)

CONFIG_JSON = category(
    "config",
    Row("empty", GENERATE, write("config.json", b""), "config.json is empty"),
    Row("array", CONVERT, write("config.json", b"[1, 2]"), "config.json must hold a JSON object, got [1, 2] (a list)"),
    Row(
        "not-utf8", CHAT, write("config.json", b'{"model_dim": "\xff\xfe"}'), "config.json is not UTF-8 text (byte 0xff"
    ),
    Row("syntax", GENERATE, write("config.json", lambda old: old[:-20]), "config.json is not valid JSON"),
    Row(
        "nan",
        GENERATE,
        config(rope_freq_constant=float("nan")),
        "config.json is not valid JSON (NaN is not a JSON number)",
    ),
    Row("infinity", CONVERT, config(rms_norm_eps=float("inf")), "(Infinity is not a JSON number)"),
    Row("overflow", EVAL, write("config.json", b'{"model_dim": 1e999}'), "(1e999 is beyond the range of a number)"),
    Row("deep", BENCH, write("config.json", deep(100_000)), "config.json nests JSON too deeply"),
    Row(
        "duplicate-key",
        CONVERT,
        write("config.json", b'{"model_dim": 1, "model_dim": 2}'),
        "key 'model_dim' appears twice",
    ),
    Row(
        "too-large",
        GENERATE,
        lambda work: os.truncate(work.model / "config.json", 17 * 1024**2),
        "config.json is 17,825,792 bytes, more than the 16,777,216",
    ),
    Row(
        "vocab-string",
        GENERATE,
        config(vocab_size="384"),
        "config.json: field 'vocab_size' must be an integer from 1 to 1,048,576, got \"384\" (a string)",
    ),
    Row(
        "vocab-bool",
        CONVERT,
        config(vocab_size=True),
        "field 'vocab_size' must be an integer from 1 to 1,048,576, got true",
    ),
    Row(
        "vocab-huge",
        GENERATE,
        config(vocab_size=10**12),
        "field 'vocab_size' must be an integer from 1 to 1,048,576, got 1000000000000",
    ),
    Row(
        "dim-negative", BENCH, config(model_dim=-128), "field 'model_dim' must be an integer from 1 to 65,536, got -128"
    ),
    Row("dim-float", CONVERT, config(head_dim=16.0), "field 'head_dim' must be an integer from 1 to 4,096, got 16.0"),
    Row(
        "layers-null",
        GENERATE,
        config(num_transformer_layers=None),
        "field 'num_transformer_layers' must be an integer from 1 to 1,024, got null",
    ),
    Row(
        "heads-object",
        GENERATE,
        config(num_query_heads={"0": 4}),
        "field 'num_query_heads' must be a list, got {\"0\": 4} (an object)",
    ),
    Row(
        "heads-float-item",
        EVAL,
        config(num_query_heads=[4.5, 4, 8, 8]),
        "field 'num_query_heads' item 0 must be an integer from 1 to 4,096, got 4.5",
    ),
    Row(
        "flag-string",
        EVAL,
        config(share_input_output_layers="yes"),
        "field 'share_input_output_layers' must be true or false",
    ),
    Row(
        "bos-outside", GENERATE, config(bos_token_id=384), "field 'bos_token_id' is 384, outside the vocabulary of 384"
    ),
    Row("field-missing", CONVERT, config(num_kv_heads=DELETE), "config.json: required field 'num_kv_heads' is missing"),
    Row(
        "layers-mismatch",
        CONVERT,
        config(ffn_multipliers=[0.5, 1, 2]),
        "'ffn_multipliers' must list one value per layer (4), got 3",
    ),
    Row("model-type", EXPORT, config(model_type="llama"), "field 'model_type' is 'llama', expected 'openelm'"),
)

INDEX = category(
    "index",
    Row("parent", GENERATE, first_tensor_to("../model-00001-of-00002.safetensors"), OUTSIDE),
    Row(
        "absolute",
        CONVERT,
        first_tensor_to("/tmp/model-00001-of-00002.safetensors"),
        "names '/tmp/model-00001-of-00002.safetensors'",
    ),
    Row("subfolder", BENCH, first_tensor_to("sub/model-00001-of-00002.safetensors"), OUTSIDE),
    Row("backslash", EVAL, first_tensor_to("..\\model-00001-of-00002.safetensors"), OUTSIDE),
    Row(
        "not-safetensors", GENERATE, first_tensor_to("config.json"), 'must name a .safetensors file, got "config.json"'
    ),
    Row("shard-null", CHAT, first_tensor_to(None), "must name a .safetensors file, got null"),
    Row(
        "map-list",
        CONVERT,
        index(weight_map=["a.safetensors"]),
        "field 'weight_map' must be an object, got [",
    ),
    Row("map-missing", GENERATE, index(weight_map=DELETE), "field 'weight_map' is missing or empty"),
    Row("not-utf8", CONVERT, write(INDEX_JSON, b'{"\xc3\x28": 1}'), "model.safetensors.index.json is not UTF-8 text"),
    Row("missing-shard", GENERATE, remove("model-00002-of-00002.safetensors"), "names shards that are not in"),
    Row("wrong-shard", CONVERT, weight_map(move_first_tensor), "which does not hold it"),
    base="sharded",
)

SAFETENSORS = category(
    "safetensors",
    Row(
        "empty",
        GENERATE,
        write("model.safetensors", b""),
        "model.safetensors is not a safetensors file or is truncated (0 bytes, no header)",
    ),
    Row(
        "length-beyond-file",
        CONVERT,
        write("model.safetensors", lambda old: struct.pack("<Q", len(old)) + old[8:]),
        "is not a safetensors file or is truncated",
    ),
    Row(
        "length-absurd",
        GENERATE,
        write("model.safetensors", lambda old: struct.pack("<Q", 2**60) + old[8:]),
        "a 1,152,921,504,606,846,976-byte header",
    ),
    Row("not-object", BENCH, header_blob(b"[1, 2, 3]"), "its header is not a JSON object"),
    Row("not-utf8", CONVERT, header_blob(b'{"w\xff": 1}'), "is not UTF-8 text"),
    Row("deep", GENERATE, header_blob(deep(100_000)), "nests JSON too deeply"),
    Row(
        "unknown-dtype",
        GENERATE,
        tensor_field("dtype", "Q7"),
        'field \'dtype\' must be one of "F32", "F16", "BF16", "U32", got "Q7"',
    ),
    Row(
        "shape-negative",
        CONVERT,
        tensor_field("shape", [-1, 128]),
        "field 'shape' item 0 must be an integer from 0 to 2,147,483,647, got -1",
    ),
    Row(
        "shape-fraction",
        GENERATE,
        tensor_field("shape", [2.5, 128]),
        "field 'shape' item 0 must be an integer from 0 to 2,147,483,647, got 2.5",
    ),
    Row("shape-huge", EVAL, tensor_field("shape", [2**31, 1]), "got 2147483648"),
    Row("offsets-mismatch", CONVERT, tensor_field("data_offsets", [0, 4]), "do not span the"),
    Row("offsets-missing", CHAT, tensor_field("data_offsets", DELETE), "field 'data_offsets' is missing"),
    Row("overlap", GENERATE, shift_tensor(1, -4), "inside tensor"),
    Row("gap", BENCH, shift_tensor(-1, 8), "after a gap of 8 bytes"),
    Row(
        "trailing-bytes",
        CONVERT,
        write("model.safetensors", lambda old: old + b"\0" * 8),
        "has 8 bytes after its last tensor",
    ),
    Row("truncated", GENERATE, write("model.safetensors", lambda old: old[: len(old) // 2]), "is truncated"),
    Row(
        "garbage",
        CONVERT,
        write("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" * 4),
        "is not a safetensors file",
    ),
    Row("no-weights", CONVERT, remove("model.safetensors"), "no *.safetensors weights"),
    Row("pickle-only", CONVERT, pickle_only, "safetensors only"),
    Row(
        "wrong-shape",
        CONVERT,
        retensor("transformer.layers.2.ffn.proj_2.weight", lambda t: t[:, :-32]),
        "wrong shapes: transformer.layers.2.ffn.proj_2.weight (128, 320) (expected (128, 352))",
    ),
    Row(
        "wrong-names",
        EVAL,
        retensor("transformer.layers.0.ffn.proj_1.weight", "model.layers.0.mlp.gate_proj.weight"),
        "missing tensors: transformer.layers.0.ffn.proj_1.weight",
    ),
    Row(
        "wrong-dtype",
        GENERATE,
        retensor("transformer.norm.weight", lambda t: t.astype(mx.uint32)),
        "wrong dtypes: transformer.norm.weight mlx.core.uint32 (expected a float)",
    ),
)

QUANTIZATION = category(
    "quantization",
    Row(
        "bits-7",
        GENERATE,
        quantization({"group_size": 64, "bits": 7}),
        "field 'quantization.bits' must be one of 1, 2, 3, 4, 5, 6, 8, got 7",
    ),
    Row("bits-bool", EVAL, quantization({"group_size": 64, "bits": True}), "got true (a boolean)"),
    Row("bits-float", BENCH, quantization({"group_size": 64, "bits": 4.0}), "got 4.0 (a number)"),
    Row(
        "group-48",
        GENERATE,
        quantization({"group_size": 48, "bits": 4}),
        "field 'quantization.group_size' must be one of 32, 64, 128, got 48",
    ),
    Row(
        "mode",
        GENERATE,
        quantization({"group_size": 64, "bits": 4, "mode": "mxfp4"}),
        "field 'quantization.mode' must be one of \"affine\"",
    ),
    Row("list", CONVERT, quantization([64, 4]), "field 'quantization' must be an object"),
    Row("bits-missing", GENERATE, quantization({"group_size": 64}), "field 'quantization.bits' is missing"),
    Row(
        "per-layer",
        EXPORT,
        quantization({"group_size": 64, "bits": 4, "transformer.layers.0": {"bits": 8}}),
        "per-layer settings are not supported",
    ),
    Row(
        "absent",
        CONVERT,
        config(quantization=DELETE),
        "the weights are quantized (*.scales tensors) but config.json has no 'quantization' entry",
    ),
    Row("bits-disagree", GENERATE, quantization({"group_size": 64, "bits": 8}), "wrong shapes"),
    base="q4",
)


def squeezing_spaces(model: bytes) -> bytes:
    """The model with sentencepiece's remove_extra_whitespaces on (LLaMA-2 keeps spaces)."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    proto.normalizer_spec.remove_extra_whitespaces = True
    return proto.SerializeToString()


TOKENIZER = category(
    "tokenizer",
    Row("larger", GENERATE, tokenizer_copy("tokenizer-512"), "has 512 pieces but the model's vocab_size is 384"),
    Row("smaller", CHAT, tokenizer_copy("tokenizer-320"), "has 320 pieces but the model's vocab_size is 384"),
    Row(
        "option-larger",
        (*EVAL, "--tokenizer", "{root}/big.model"),
        lambda w: shutil.copyfile(w.assets["tokenizer-512"], w.root / "big.model"),
        "has 512 pieces",
    ),
    Row("convert-larger", CONVERT, tokenizer_copy("tokenizer-512"), "has 512 pieces but the model's vocab_size is 384"),
    Row(
        "garbage",
        GENERATE,
        write("tokenizer.model", b"\x00garbage" * 10),
        "tokenizer.model is not a sentencepiece model",
    ),
    Row("missing", GENERATE, remove("tokenizer.model"), "LLaMA-2 tokenizer"),
    Row(
        "convert-not-llama-form",  # sentencepiece reads it; tokenizer.json could not reproduce it
        CONVERT,
        write("tokenizer.model", squeezing_spaces),
        "is not a LLaMA-2-style sentencepiece model (extra whitespace removed)",
    ),
    Row(
        "export-coreml-not-llama-form",  # the tokenizer folder beside the package needs tokenizer.json
        EXPORT,
        write("tokenizer.model", squeezing_spaces),
        "is not a LLaMA-2-style sentencepiece model (extra whitespace removed)",
    ),
)

CHECKPOINT_ROWS = PATHS + NOT_A_MODEL + SPECIAL_FILES + CONFIG_JSON + INDEX + SAFETENSORS + QUANTIZATION + TOKENIZER
