"""The kit of the table-driven bad-input tests (tests/test_bad_input.py): a Row is one case
(command, setup, expected exit status, a fragment of the message); a setup damages the Work, a
private copy of a fixture checkpoint in a work folder; tree() fingerprints that folder, so the
runner can check that a failing run changed nothing and left nothing behind."""

import hashlib
import json
import os
import shutil
import stat
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, Tuple

from conftest import tiny_config

from openelm_mlx.benchmarks.synthetic import random_weights, write_checkpoint


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
    base: str = "tiny"  # which fixture is copied: tiny, sharded, q4, massive or run (a train run folder)
    stdin: str = "hi\n"
    env: Tuple[Tuple[str, str], ...] = ()  # (name, value) for the run's environment; "{root}" filled in


INDEX_JSON = "model.safetensors.index.json"
# The commands that read a checkpoint, each as cheap as it can be if a case wrongly succeeds.
GENERATE = ("generate", "--model", "{model}", "-p", "hi", "--max-tokens", "2")
CHAT = ("chat", "--model", "{model}", "--max-tokens", "2")
CONVERT = ("convert", "{model}", "-o", "{out}")
EVAL = ("eval", "ppl", "--model", "{model}", "--max-tokens", "16")
EXPORT = ("export-coreml", "{model}", "-o", "{out}.mlpackage")
BENCH = ("bench", "--models", "{model}", "--out", "{out}", "-p", "4", "-g", "2", "--trials", "1", "--warmup", "0")
TRAIN = ("train", "{out}", "--steps", "1", "--warmup", "0")


def category(name: str, *rows: Row, base: str = "", exit: int = 0) -> list:
    """The rows of one category, ids prefixed with its name; `base` and `exit` for all of them if given."""
    return [replace(row, id=f"{name}.{row.id}", base=base or row.base, exit=exit or row.exit) for row in rows]


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


# --- setups in the work folder, beside the model ------------------------------------------------


def root_file(name: str, data: bytes = b"mine\n"):
    """root/NAME (a path that may hold folders, made as needed) holding `data`."""

    def setup(work: Work):
        path = work.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return setup


def both(*setups):
    def setup(work: Work):
        for one in setups:
            one(work)

    return setup


def root_folder(name: str):
    return lambda work: (work.root / name).mkdir(parents=True)


def root_link(name: str, target: str):
    return lambda work: (work.root / name).symlink_to(target)


def missing_module(module: str):
    """root/shadow/MODULE, a package whose import fails as a missing one does: with PYTHONPATH
    at root/shadow (Row.env: SHADOW), the run sees MODULE as not installed."""
    return root_file(
        f"shadow/{module}/__init__.py",
        f'raise ModuleNotFoundError("No module named {module!r}", name={module!r})\n'.encode(),
    )


SHADOW = (("PYTHONPATH", "{root}/shadow"), ("PYTHONDONTWRITEBYTECODE", "1"))
