"""Bad input, table-driven: one Row per case (command, setup, expected exit status, a fragment
of the message). One runner holds every row to the same promise, in a subprocess (a case may
not crash or hang the test process): the exit status, exactly one line on stderr reading
`openelm <command>: error: ...` with the fragment, no traceback, and every file under the work
folder byte-identical before and after the run (nothing damaged, nothing left beside an output).

To add a case, append a Row to its category's list (or add a list to ROWS). A setup receives the
Work: a private copy of a fixture checkpoint (`base`) in a work folder that is also the current
folder of the run, and the output path `out` that a failing run must not create.
"""

import hashlib
import json
import os
import shutil
import stat
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Tuple

import mlx.core as mx
import pytest
from conftest import assert_clean_error, run_cli, tiny_config

from openelm_mlx.benchmarks.synthetic import random_weights, train_tokenizer, write_checkpoint
from openelm_mlx.files import is_repo_id


@dataclass
class Work:
    root: Path  # the work folder: the run's current folder, hashed before and after
    model: Path  # root/model: a private copy of the row's base checkpoint
    out: Path  # root/out: where a command would write; a failing run must not create it
    assets: Dict[str, Path]  # session-wide files (tokenizers) that setups may copy

    def fields(self) -> dict:
        return {"root": self.root, "model": self.model, "out": self.out}


@dataclass(frozen=True)
class Row:
    id: str
    argv: Tuple[str, ...]  # "{model}", "{out}" and "{root}" are filled in from the Work
    setup: Callable[[Work], None]
    message: str  # a fragment of the one error line
    exit: int = 1
    base: str = "tiny"  # which fixture checkpoint is copied: tiny, sharded or q4
    stdin: str = "hi\n"
    category: str = ""


INDEX_JSON = "model.safetensors.index.json"
OUTSIDE = "a shard must be a file in the index's own folder"
# The commands that read a checkpoint, each as cheap as it can be if a case wrongly succeeds.
GENERATE = ("generate", "--model", "{model}", "-p", "hi", "--max-tokens", "2")
CHAT = ("chat", "--model", "{model}", "--max-tokens", "2")
CONVERT = ("convert", "{model}", "-o", "{out}")
EVAL = ("eval", "ppl", "--model", "{model}", "--max-tokens", "16")
EXPORT = ("export-coreml", "{model}", "-o", "{out}.mlpackage")
BENCH = ("bench", "--models", "{model}", "--out", "{out}", "-p", "4", "-g", "2", "--trials", "1", "--warmup", "0")
TRAIN = ("train", "{out}", "--steps", "1")


def category(name: str, *rows: Row, base: str = "") -> list:
    """The rows of one category, ids prefixed with its name; `base` for all of them if given."""
    return [replace(row, category=name, id=f"{name}.{row.id}", base=base or row.base) for row in rows]


def nothing(work: Work):
    pass


# --- setups: each returns a function of the Work --------------------------------------------


def write(name: str, data):
    """Replace model/NAME by `data` (bytes, or a function of the old bytes)."""

    def setup(work: Work):
        path = work.model / name
        new = data(path.read_bytes()) if callable(data) else data
        path.unlink(missing_ok=True)
        path.write_bytes(new)

    return setup


def remove(name: str):
    return lambda work: (work.model / name).unlink()


DELETE = object()  # a field value that removes the field


def assign(fields: dict, changes: dict):
    for key, value in changes.items():
        fields.pop(key) if value is DELETE else fields.__setitem__(key, value)


def edit_json(name: str, edit: Callable[[object], None]):
    """Edit the parsed JSON of model/NAME in place."""

    def change(old: bytes) -> bytes:
        raw = json.loads(old)
        edit(raw)
        return json.dumps(raw).encode()

    return write(name, change)


def config(**changes):
    """Set (or with DELETE remove) fields of config.json."""
    return edit_json("config.json", lambda raw: assign(raw, changes))


def index(**changes):
    return edit_json(INDEX_JSON, lambda raw: assign(raw, changes))


def weight_map(edit: Callable[[dict], None]):
    return edit_json(INDEX_JSON, lambda raw: edit(raw["weight_map"]))


def first_tensor_to(shard: str):
    def edit(wm):
        wm[sorted(wm)[0]] = shard

    return weight_map(edit)


def move_first_tensor(wm: dict):
    """The index puts the first tensor in the other shard than the one that holds it."""
    first = sorted(wm)[0]
    wm[first] = next(shard for shard in wm.values() if shard != wm[first])


def pickle_only(work: Work):
    (work.model / "model.safetensors").unlink()
    (work.model / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a pickle that is never opened")


def special(name: str, kind: str):
    """Replace model/NAME by a FIFO, a folder, a socket, a link to a device, or a broken link."""

    def setup(work: Work):
        path = work.model / name
        path.unlink(missing_ok=True)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "folder":
            path.mkdir()
        elif kind == "socket":
            os.mknod(path, 0o600 | stat.S_IFSOCK)
        elif kind == "device":
            path.symlink_to("/dev/zero")
        elif kind == "broken-link":
            path.symlink_to("../blobs/0123abcd")

    return setup


def split(data: bytes):
    """(header dict, tensor bytes) of a safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def joined(header, body: bytes) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + body


def header(edit: Callable[[dict], None], name: str = "model.safetensors"):
    """Edit the parsed header of model/NAME; the tensor bytes stay as they are."""

    def change(old: bytes) -> bytes:
        head, body = split(old)
        edit(head)
        return joined(head, body)

    return write(name, change)


def header_blob(blob: bytes):
    """Replace the header of model.safetensors by raw bytes."""
    return write("model.safetensors", lambda old: joined(blob, split(old)[1]))


def tensors_by_offset(head: dict) -> list:
    return sorted((k for k in head if k != "__metadata__"), key=lambda k: head[k]["data_offsets"][0])


def tensor_field(key: str, value, which: int = 0):
    """Set (or with DELETE remove) field `key` of the `which`-th tensor in file order."""
    return header(lambda h: assign(h[tensors_by_offset(h)[which]], {key: value}))


def shift_tensor(which: int, by: int):
    def edit(h):
        entry = h[tensors_by_offset(h)[which]]
        entry["data_offsets"] = [o + by for o in entry["data_offsets"]]

    return header(edit)


def retensor(name: str, change):
    """A checkpoint of tiny_config() whose tensor NAME is change(tensor), or is renamed to
    `change` if that is a string, written over model/."""

    def setup(work: Work):
        w = random_weights(tiny_config())
        if isinstance(change, str):
            w[change] = w.pop(name)
        else:
            w[name] = change(w[name])
        write_checkpoint(work.model, tiny_config(), w)

    return setup


def tokenizer_copy(asset: str):
    return lambda work: shutil.copyfile(work.assets[asset], work.model / "tokenizer.model")


def quantization(value):
    return config(quantization=value)


def fifo_text(work: Work):
    """root/text.txt as a FIFO, for --text: opening it to read would wait for a writer forever."""
    os.mkfifo(work.root / "text.txt")


def deep(depth: int) -> bytes:
    return b'{"a": ' + b"[" * depth + b"]" * depth + b"}"


# --- the table ------------------------------------------------------------------------------

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
)

LONG_PROMPT = "the sea and the stars " * 60  # > 256 tokens, the tiny model's context

OPTIONS = category(
    "option",
    Row("temp-negative", (*GENERATE, "--temp", "-0.5"), nothing, "--temp must be >= 0"),
    Row("top-p-above-1", (*GENERATE, "--top-p", "1.5"), nothing, "--top-p must be in [0, 1]"),
    Row("top-k-negative", (*GENERATE, "--top-k", "-3"), nothing, "--top-k must be >= 0"),
    Row("min-p-above-1", (*GENERATE, "--min-p", "2"), nothing, "--min-p must be in [0, 1]"),
    Row("repetition-penalty-0", (*GENERATE, "--repetition-penalty", "0"), nothing, "--repetition-penalty must be > 0"),
    Row("max-tokens-0", (*GENERATE, "--max-tokens", "0"), nothing, "--max-tokens must be at least 1"),
    Row(
        "prompt-too-long",
        (*GENERATE, "-p", LONG_PROMPT, "--max-tokens", "20"),
        nothing,
        "exceeds the model's context of 256",
    ),
)

ROWS = PATHS + SPECIAL_FILES + CONFIG_JSON + INDEX + SAFETENSORS + QUANTIZATION + TOKENIZER + OPTIONS


# --- the runner -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(tmp_path_factory, tiny_checkpoint, tokenizer_file) -> Dict[str, Path]:
    """The fixture checkpoints rows start from, and the files setups may copy."""
    from openelm_mlx.convert.hf_to_mlx import convert

    root = tmp_path_factory.mktemp("bases")
    weights = dict(mx.load(str(tiny_checkpoint / "model.safetensors")))
    sharded = write_checkpoint(root / "sharded", tiny_config(), weights, tokenizer_file, shards=2)
    q4 = convert(tiny_checkpoint, root / "q4", bits=4)
    return {
        "tiny": tiny_checkpoint,
        "sharded": sharded,
        "q4": q4,
        "tokenizer-512": train_tokenizer(root / "t512", vocab_size=512),
        "tokenizer-320": train_tokenizer(root / "t320", vocab_size=320),
    }


def tree(root: Path) -> dict:
    """Every entry under root: a hash for a file, the target for a link, the kind for the rest.
    Nothing but regular files is opened (a FIFO would hang the reader)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(mode):
                out[str(path.relative_to(root))] = f"link to {os.readlink(path)}"
            else:
                out[str(path.relative_to(root))] = stat.S_IFMT(mode)
    return out


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
def test_bad_input(row: Row, bases, tmp_path):
    work = Work(tmp_path / "work", tmp_path / "work" / "model", tmp_path / "work" / "out", bases)
    work.root.mkdir()
    shutil.copytree(bases[row.base], work.model, symlinks=True)
    row.setup(work)
    before = tree(work.root)
    argv = [arg.format(**work.fields()) for arg in row.argv]
    # An empty Hub cache outside the work folder: a repo id is never found, nothing is downloaded.
    env = {"HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path / "home")}
    result = run_cli(*argv, input=row.stdin, cwd=work.root, env=env, timeout=60)

    assert_clean_error(result, row.message, exit=row.exit)
    assert tree(work.root) == before, "a file changed, or something was left beside the output"


def test_output_exists_needs_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_error(run_cli("convert", tiny_checkpoint, "-o", out), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli("convert", tiny_checkpoint, "-o", out, "--force").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_truncate_fits_a_long_prompt(tiny_checkpoint):
    ok = run_cli("generate", "--model", tiny_checkpoint, "-p", LONG_PROMPT, "--max-tokens", "20", "--truncate")
    assert ok.returncode == 0, ok.stderr
    assert "prompt: 236 tokens" in ok.stderr  # BOS + the last 235: 236 + 20 fill the 256 exactly


def test_interrupted_conversion_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    from openelm_mlx.convert import hf_to_mlx

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_to_mlx, "to_bytes", interrupt)
    with pytest.raises(KeyboardInterrupt):
        hf_to_mlx.convert(tiny_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_rows_are_unique_and_many():
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids))
    assert len(ROWS) >= 70


# Which strings are Hub repo ids and which are paths (openelm_mlx.files.is_repo_id).
@pytest.mark.parametrize(
    "text, repo",
    [
        ("apple/OpenELM-270M", True),
        ("mlx-community/OpenELM-270M-Instruct-4bit", True),
        ("user_1/model.v2", True),
        ("./typo", False),
        ("../x", False),
        ("/abs/path", False),
        ("~/x", False),
        ("a/b/c", False),
        ("typo", False),
        ("owner\\name", False),
        (".hidden/name", False),
        ("owner/..", False),
        ("owner/", False),
    ],
)
def test_repo_id_shape(text, repo):
    assert is_repo_id(text) is repo
