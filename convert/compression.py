"""Weight compression, the same math for both exporters: symmetric linear quantization (int8 and
int4 per block of --block-size, 32 by default, along the input axis, as Apple's presets do: per
output channel int8 returns garbage on Core AI's GPU delegate, apple-runners.md section 8) and
palettization (a k-means look-up table per group of 16 output channels). Weights are [out, in] as
in the checkpoint; each exporter lays the arrays out the way its decompression op wants them.
A weight the compute dtype cannot hold (float16: |w| > 65504) is refused in one line naming the
tensor (check_stored), never written as inf; the float16 guard (numerics.py) has already folded
what it can (proj_1's `up` rows, times 2**-k)."""

from dataclasses import dataclass

import numpy as np

from openelm_mlx.errors import OpenELMError

BITS = {"int8": 8, "int4": 4, "palettize4": 4, "palettize6": 6}  # bits per stored value
BLOCKWISE = ("int8", "int4")  # one scale per --block-size inputs
PALETTE_GROUP = 16  # output channels sharing one LUT (coremltools' per_grouped_channel default)
# Apple's iOS preset `4bit_weight_palettized_group32` (coreai-models export/presets.py, export/
# compression.py:301-341): 4-bit k-means LUTs per group of 32 output channels (axis 0); its
# embedding is int8 per tensor (models/ios/qwen3.py:290-304), which package.describe applies.
IOS_PRESET = "ios-preset"
BITS[IOS_PRESET] = 4
IOS_PALETTE_GROUP = 32
KMEANS_ITERATIONS = 30


@dataclass
class Quantized:
    """weight = data * scale, one scale per block of `block` input values in an output row."""

    data: np.ndarray  # int8 [out, in], values in -(2**(bits-1) - 1) .. 2**(bits-1) - 1
    scale: np.ndarray  # [out, in // block], in the compute precision
    bits: int

    @property
    def block(self) -> int:
        return self.data.shape[1] // self.scale.shape[1]


@dataclass
class Palettized:
    """weight[r, c] = lut[r // group, indices[r, c]] (group: PALETTE_GROUP, or IOS_PALETTE_GROUP)."""

    indices: np.ndarray  # uint8 [out, in], values < 2**bits
    lut: np.ndarray  # [out // group, 2**bits], in the compute precision
    bits: int

    @property
    def group(self) -> int:
        return self.indices.shape[0] // self.lut.shape[0]


def compress(name: str, weight: np.ndarray, compression: str, block_size: int, scale_dtype):
    """The stored form of the float32 [out, in] weight `name`: itself in `scale_dtype` for "none",
    else a Quantized or Palettized whose scales or LUT are `scale_dtype`."""
    out, n = weight.shape
    if compression in BLOCKWISE and n % block_size:
        raise OpenELMError(f"--block-size {block_size} does not divide the {n} inputs of {name}: choose another")
    if compression.startswith("palettize") and out % PALETTE_GROUP:
        raise OpenELMError(f"{name} has {out} rows, not a multiple of {PALETTE_GROUP}: it cannot be palettized")
    with np.errstate(over="ignore"):  # a value beyond scale_dtype becomes inf here and is refused below
        if compression == "none":
            stored = weight.astype(scale_dtype)
        elif compression == IOS_PRESET:
            if out % IOS_PALETTE_GROUP:
                raise OpenELMError(
                    f"{name} has {out} rows, not a multiple of {IOS_PALETTE_GROUP}: use another --compress"
                )
            stored = palettize(weight, 4, scale_dtype, IOS_PALETTE_GROUP)
        elif compression.startswith("palettize"):
            stored = palettize(weight, BITS[compression], scale_dtype)
        else:
            stored = quantize(weight, BITS[compression], block_size, scale_dtype)
    check_stored(name, weight, stored, scale_dtype)
    return stored


def check_stored(name: str, weight: np.ndarray, stored, dtype):
    """Refuse a stored form the package cannot compute with: every form is decompressed to the
    compute dtype on the device, so a weight past its range is inf there, whether it is stored
    plainly or as int8/int4 data times a scale that fits, or as a LUT entry. Checked without
    decompressing (a copy of the weight in float32): a block's largest |data| times its scale is
    finite in dtype exactly when every product in the block is (rounding is monotonic); a LUT's
    entries lie within the weights they were fitted to, so its extreme entries (where an inf would
    be) are the ones its extreme weights use: the LUT is finite exactly when the weights it gives are."""
    if isinstance(stored, Quantized):
        peaks = np.abs(stored.data.reshape(len(stored.data), -1, stored.block)).max(axis=-1)  # |int8| <= 127
        largest = peaks.astype(np.float32) * stored.scale.astype(np.float32)
    else:
        largest = stored.lut if isinstance(stored, Palettized) else stored
    with np.errstate(over="ignore", invalid="ignore"):
        finite = np.isfinite(np.asarray(largest, np.float32).astype(dtype)).all()
    if not finite:
        raise OpenELMError(
            f"{name} holds a weight of {float(np.abs(weight).max()):.3g}, past {np.dtype(dtype).name}'s largest "
            f"{float(np.finfo(dtype).max):.0f} (compressed or not, the package computes with {np.dtype(dtype).name} "
            "weights): export with --compute-precision float32 (export-coreai)"
        )


def decompress(stored) -> np.ndarray:
    """float32 [out, in] of a stored weight (what the package computes with)."""
    if isinstance(stored, Quantized):
        scale = np.repeat(stored.scale.astype(np.float32), stored.block, axis=1)
        return stored.data.astype(np.float32) * scale
    if isinstance(stored, Palettized):
        rows = np.arange(stored.indices.shape[0]) // stored.group
        return stored.lut.astype(np.float32)[rows[:, None], stored.indices]
    return np.asarray(stored, np.float32)


def quantize(weight: np.ndarray, bits: int, block: int, scale_dtype) -> Quantized:
    out, n = weight.shape
    qmax = 2 ** (bits - 1) - 1
    blocks = weight.reshape(out, n // block, block)
    scale = (np.abs(blocks).max(axis=-1) / qmax).astype(scale_dtype)
    # Round with the stored (rounded) scale, so data * scale is the closest the package can hold.
    safe = np.where(scale == 0, 1, scale).astype(np.float32)[..., None]
    data = np.clip(np.round(blocks / safe), -qmax, qmax).astype(np.int8).reshape(out, n)
    return Quantized(data, scale, bits)


def palettize(weight: np.ndarray, bits: int, lut_dtype, group: int = PALETTE_GROUP) -> Palettized:
    """1-D k-means (Lloyd's algorithm) per group of `group` rows, all groups at once.
    Written here rather than taken from scikit-learn: in one dimension each cluster is an interval
    of the sorted values, so an iteration is a vectorized search and prefix sums (seconds for a
    270M model, where one KMeans per group takes minutes), and the coreai extra needs no sklearn."""
    out, n = weight.shape
    k = 2**bits
    groups = weight.reshape(out // group, group * n).astype(np.float64)
    ordered = np.sort(groups, axis=1)
    prefix = np.concatenate([np.zeros((len(groups), 1)), np.cumsum(ordered, axis=1)], axis=1)
    lut = np.quantile(ordered, (np.arange(k) + 0.5) / k, axis=1).T  # [groups, k], ascending
    rows = np.arange(len(groups))[:, None]
    for _ in range(KMEANS_ITERATIONS):
        # cluster j holds the sorted values between the midpoints around lut[:, j]
        ends = _search_rows(ordered, (lut[:, 1:] + lut[:, :-1]) / 2)
        ends = np.concatenate([np.zeros((len(groups), 1), int), ends, np.full((len(groups), 1), ordered.shape[1])], 1)
        counts = np.diff(ends, axis=1)
        sums = prefix[rows, ends[:, 1:]] - prefix[rows, ends[:, :-1]]
        new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), lut), axis=1)
        if np.array_equal(new, lut):
            break
        lut = new
    lut = lut.astype(lut_dtype)
    midpoints = (lut[:, 1:].astype(np.float64) + lut[:, :-1]) / 2
    indices = _search_rows(groups, midpoints, sorted_rows=False).astype(np.uint8)  # value -> its nearest entry
    return Palettized(indices.reshape(out, n), lut, bits)


def _search_rows(values: np.ndarray, edges: np.ndarray, sorted_rows: bool = True) -> np.ndarray:
    """Per row (np.searchsorted row by row, in one call: row r is shifted by r * span so that rows
    do not overlap): for sorted rows, how many values lie below each edge; otherwise, for each
    value, how many edges lie at or below it (a value on a midpoint goes up in both)."""
    low = min(values.min(), edges.min())
    span = max(values.max(), edges.max()) - low + 1.0
    shift = np.arange(len(values))[:, None] * span
    if sorted_rows:
        flat = (values - low + shift).ravel()
        return np.searchsorted(flat, edges - low + shift) - np.arange(len(values))[:, None] * values.shape[1]
    flat = (edges - low + shift).ravel()
    return np.searchsorted(flat, values - low + shift, side="right") - np.arange(len(values))[:, None] * edges.shape[1]


def quantize_per_tensor(weight: np.ndarray, scale_dtype) -> Quantized:
    """int8 with one symmetric scale for the whole tensor (Apple's iOS embedding table,
    primitives/ios/quantization.py:20-74), held as a Quantized whose per-row scales are equal."""
    scale = np.asarray(max(float(np.abs(weight).max()), 1e-6) / 127, scale_dtype)
    data = np.clip(np.round(weight / scale.astype(np.float32)), -127, 127).astype(np.int8)
    return Quantized(data, np.full((weight.shape[0], 1), scale, scale_dtype), 8)
