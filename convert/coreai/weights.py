"""Read the weights back from a saved Core AI model's main.mlirb, for verify-coreai.

The program is loaded with coreai's own IR (coreai._compiler.ir); each weight constant is found by
the name its location carries (graph.named_constant), and its type tells shape and element type.
The bytes themselves sit in the bytecode's resource section, which the Python bindings cannot hand
out, so they are read from the file by resources() below (MLIR's documented bytecode format:
mlir.llvm.org/docs/BytecodeFormat). Identical constants are stored once and may share a resource
under another weight's name, hence the lookup through the program rather than by resource key."""

import re
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from openelm_mlx.errors import OpenELMError

from ..compression import Palettized, Quantized, decompress
from ..package import EMBEDDING, is_norm

MAGIC = b"ML\xefR"
STRING_SECTION, RESOURCE_SECTION, RESOURCE_OFFSET_SECTION = 0, 5, 6
ELEMENT_TYPES = {"f16": np.float16, "f32": np.float32, "i8": np.int8, "si8": np.int8, "si4": "int4", "ui4": "uint4"}


class _Reader:
    def __init__(self, data: memoryview, pos: int = 0):
        self.data, self.pos = data, pos

    def byte(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        """MLIR's PrefixVarInt: the trailing zero bits of the first byte count the extra bytes."""
        first = self.data[self.pos]
        if first == 0:
            value, n = int.from_bytes(self.data[self.pos + 1 : self.pos + 9], "little"), 9
        else:
            extra = (first & -first).bit_length() - 1
            n = extra + 1
            value = int.from_bytes(self.data[self.pos : self.pos + n], "little") >> n
        self.pos += n
        return value

    def align(self, alignment: int):
        while self.pos % alignment:
            if self.byte() != 0xCB:  # the format's padding byte
                raise ValueError("bad padding")


def resources(path: Path) -> Dict[str, memoryview]:
    """Resource key -> its bytes, from an MLIR bytecode file."""
    data = memoryview(Path(path).read_bytes())
    if bytes(data[:4]) != MAGIC:
        raise ValueError("not MLIR bytecode")
    r = _Reader(data, 4)
    r.varint()  # version
    r.pos = bytes(data).index(b"\0", r.pos) + 1  # producer string
    sections = {}
    while r.pos < len(data):
        id_and_aligned = r.byte()
        length = r.varint()
        if id_and_aligned & 0x80:
            r.align(r.varint())
        sections[id_and_aligned & 0x7F] = (r.pos, length)
        r.pos += length
    s = _Reader(data, sections[STRING_SECTION][0])
    lengths = [s.varint() for _ in range(s.varint())][::-1]  # stored in reverse, each with its NUL
    strings = []
    for n in lengths:
        strings.append(bytes(data[s.pos : s.pos + n - 1]).decode())
        s.pos += n
    offsets = _Reader(data, sections[RESOURCE_OFFSET_SECTION][0])
    end = offsets.pos + sections[RESOURCE_OFFSET_SECTION][1]
    entry = sections[RESOURCE_SECTION][0]
    out = {}
    for _ in range(offsets.varint()):  # external resource groups: keyed by a string
        offsets.varint()
        entry = _read_group(offsets, data, entry, strings, out)
    while offsets.pos < end:  # dialect resource groups: keyed by a dialect
        offsets.varint()
        entry = _read_group(offsets, data, entry, strings, out)
    return out


def _read_group(offsets: _Reader, data, entry: int, strings, out) -> int:
    for _ in range(offsets.varint()):
        key, size, _kind = strings[offsets.varint()], offsets.varint(), offsets.byte()
        blob = _Reader(data, entry)
        alignment, n = blob.varint(), blob.varint()
        blob.align(alignment)
        out[key] = data[blob.pos : blob.pos + n]
        entry += size
    return entry


def named_constants(package: Path, function: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Weight name -> its array (sub-byte values unpacked) in `function` of a saved model (default:
    its first function; identical constants are shared between functions)."""
    from coreai.authoring import AIModelAsset  # first: coreai's dialect modules import coreai.authoring

    # isort: split
    from coreai._compiler._mlir_libs._coreaiIR._bindings.mlir.dialects.debuginfo import (
        DILocationAttr,
        MetadataLocationAttr,
    )

    # The parsed main.mlirb; coreai-core 1.0.0b3 has no public accessor to the module inside.
    program = AIModelAsset.load(package).program._module._mlir_module
    blobs = resources(package / "main.mlirb")
    graph = [op for op in program.body.operations if function in (None, op.attributes["sym_name"].value)][0]
    out = {}
    for op in graph.regions[0].blocks[0].operations:
        attr = op.location.attr
        if op.operation.name != "coreai.constant" or not (
            DILocationAttr.isinstance(attr) or MetadataLocationAttr.isinstance(attr)
        ):
            continue
        cls = DILocationAttr if DILocationAttr.isinstance(attr) else MetadataLocationAttr
        names = [m.name for m in cls(attr).metadata if m.name != "op_id"]
        match = re.fullmatch(r"dense_resource<(.+)> : tensor<([0-9x]+)x(\w+)>", str(op.attributes["value"]))
        if names and match:
            key, dims, element = match.groups()
            out[names[0]] = _array(blobs[key], [int(d) for d in dims.split("x")], ELEMENT_TYPES[element])
    return out


def _array(blob, shape, dtype) -> np.ndarray:
    if dtype in ("int4", "uint4"):
        packed = np.frombuffer(blob, np.uint8)
        values = np.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)[: int(np.prod(shape))]
        if dtype == "int4":
            values = values.astype(np.int8)
            values[values >= 8] -= 16
        return values.reshape(shape)
    return np.frombuffer(blob, dtype).reshape(shape)


def package_weights(package: Path, names: Sequence[str], bits: int, functions=(None,)) -> Dict[str, np.ndarray]:
    """The named weights of a saved model's `functions`, decompressed to float32 in the
    checkpoint's [out, in] layout (graph.weight transposes linear weights to [in, out]; the iOS
    embedding table is [V, 1, H], its scale one value)."""
    try:
        constants = {k: v for function in functions for k, v in named_constants(Path(package), function).items()}
    except (ValueError, KeyError, IndexError, RuntimeError) as e:
        raise OpenELMError(f"{package}: the weights cannot be read from main.mlirb ({e}): re-export it") from None
    out = {}
    for name in names:
        flip = (lambda a: a.T) if name != EMBEDDING and not is_norm(name) else (lambda a: a)
        if name in constants:
            stored = flip(constants[name])
        elif f"{name}.data" in constants:
            data = constants[f"{name}.data"]
            stored = Quantized(flip(data.reshape(len(data), -1)), flip(constants[f"{name}.scale"]), bits)
        elif f"{name}.indices" in constants:
            lut = constants[f"{name}.lut"]  # [1, groups, n, 1] transposed, [groups, 1, n, 1] not
            stored = Palettized(flip(constants[f"{name}.indices"]), lut.reshape(-1, lut.shape[2]), bits)
        else:
            continue
        out[name] = decompress(stored)
    return out
