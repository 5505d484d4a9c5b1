"""The macOS Core AI program (`main`, the dynamic contract of Apple's stock LLM engines), block by
block as openelm_mlx/model.py writes the model: attention, feed_forward, transformer_block, and the
embedding and output around them. The helpers (u32, named_constant, pack_nibbles, weight, rms_norm,
rope), the attention preamble (qkv_heads), feed_forward and transformer_block are shared with the
iOS graph (ios_graph.py): keep their names and signatures.

The contract (docs/apps.md; Apple's `models/macos/qwen3.py:83-101` and the Swift engines that drive
it, `CoreAISequentialEngine.swift:110-146`): inputs `input_ids` int32 [1, S] (the new tokens) then
`position_ids` int32 [1, P] (0..P-1, everything so far); states `keyCache`, `valueCache`
[L, 1, kv_max, T, head_dim] with T = the context; output `logits` float16 [1, S, vocab], every
position. OpenELM's per-layer KV heads share the one pair padded to the largest count: layer i
reads and writes only its first kv_i heads (the stock engines accept 2 to 4 states, not 2 per layer).

Core AI's differences in spelling: activations are [S, width] (batch 1), linear weights are stored
[in, out] for batch_matmul, states are handles read and written with tokens, and the attention is
composed (scores, mask, softmax). Every weight constant carries its name in its location, and
its data in a resource of that name, so verify.py can read it back from main.mlirb."""

from functools import partial

import numpy as np
from coreai.authoring import DebugInfo  # first: coreai's dialect modules import coreai.authoring

# isort: split
from coreai._compiler.dialects import _coreai_ops_gen as G
from coreai._compiler.dialects import coreai as C
from coreai._compiler.ir import (
    DenseElementsAttr,
    DenseResourceElementsAttr,
    F16Type,
    F32Type,
    IntegerAttr,
    IntegerType,
    RankedTensorType,
    ShapedType,
)
from coreai.authoring.graph_builder import GraphOp

from ..compression import Palettized, Quantized
from ..package import EMBEDDING, FINAL_NORM, Layer, PackageDescription, block_names, is_norm

DYNAMIC = ShapedType.get_dynamic_size()
STATES = ("keyCache", "valueCache")  # the names the stock engines bind by index (first K, then V)


def u32(values):
    """Permutations, split sizes and broadcast shapes are uint32 in Core AI."""
    return np.asarray(values, np.uint32)


def named_constant(name: str, array: np.ndarray, element_type=None, shape=None):
    """A constant whose location names it and whose data is the resource `name`. Sub-byte values
    come packed (pack_nibbles), with their element type and shape given."""
    if element_type is None:
        element_type = {np.float16: F16Type.get(), np.float32: F32Type.get(), np.int8: IntegerType.get_signed(8)}[
            array.dtype.type
        ]
    mlir_type = RankedTensorType.get(list(array.shape if shape is None else shape), element_type)
    with DebugInfo.metadata_only([name]).activate():
        attr = DenseResourceElementsAttr.get_from_buffer(np.ascontiguousarray(array), name, mlir_type)
        return C.ConstantOp(value=attr).result


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """4-bit values, two per byte, low nibble first. coreai-core 1.0.0b3 stores an ml_dtypes.int4
    array one value per byte while its runtime reads packed nibbles (silently wrong weights), so
    sub-byte constants are packed here and typed explicitly (named_constant)."""
    flat = values.astype(np.uint8).reshape(-1) & 0xF
    flat = np.concatenate([flat, np.zeros(len(flat) % 2, np.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


def integer_zeros(shape, element_type):
    """A splat constant (one value stored) of an integer type numpy cannot spell, e.g. int4."""
    attr = IntegerAttr.get(element_type, 0)
    return C.ConstantOp(value=DenseElementsAttr.get_splat(RankedTensorType.get(list(shape), element_type), attr)).result


def weight(name: str, stored, transpose: bool):
    """A weight as a Core AI value: a constant, or the op that decompresses it. Linear weights are
    [out, in] in the checkpoint and transposed to [in, out] for batch_matmul; the embedding stays
    [vocab, d] (gathered by rows, and the output layer multiplies by it from the left)."""
    if isinstance(stored, Quantized):  # scale * (data - offset1) + offset2, symmetric: both offsets 0
        data, scale = (stored.data.T, stored.scale.T) if transpose else (stored.data, stored.scale)
        if stored.bits == 4:
            int4 = IntegerType.get_signed(4)
            data_value = named_constant(name + ".data", pack_nibbles(data), int4, data.shape)
            offset1 = integer_zeros(scale.shape, int4)
        else:
            data_value = named_constant(name + ".data", data)
            offset1 = integer_zeros(scale.shape, IntegerType.get_signed(8))
        offset2 = C.constant(np.zeros(scale.shape, scale.dtype))
        return C.blockwise_shift_scale(data_value, named_constant(name + ".scale", scale), offset1, offset2)
    if isinstance(stored, Palettized):
        indices = stored.indices.T if transpose else stored.indices
        lut = stored.lut[None, :, :, None] if transpose else stored.lut[:, None, :, None]  # one LUT per row group
        indices = named_constant(name + ".indices", pack_nibbles(indices), IntegerType.get_unsigned(4), indices.shape)
        return C.lut_to_dense(indices, named_constant(name + ".lut", lut), C.constant(np.int16(0)))
    return named_constant(name, np.ascontiguousarray(stored.T if transpose else stored))


def rms_norm(x, gain, eps: float):
    """float32 in, float32 out over the last axis: mean(x*x) overflows float16 once |x| > 256."""
    shape = RankedTensorType(x.type).shape
    kept = [-1 if dim == DYNAMIC else dim for dim in shape[:-1]] + [1]  # the mean over the last axis, kept
    ms = C.reshape(C.reduce_mean(C.mul(x, x), np.array([len(shape) - 1], np.int32)), kept)
    return C.broadcasting_mul(C.broadcasting_mul(x, C.rsqrt(C.broadcasting_add(ms, np.float32(eps)))), gain)


def rope(x, cos, sin):
    """Rotate-half RoPE in float32 on [1, heads, S, hd]; sin carries the sign (package.rope_tables)."""
    x1, x2 = C.split(x, u32([RankedTensorType(x.type).shape[-1] // 2] * 2), np.int32(3))
    return C.broadcasting_add(C.broadcasting_mul(x, cos), C.broadcasting_mul(C.concat(np.int32(3), [x2, x1]), sin))


def qkv_heads(desc: PackageDescription, i: int, w: dict, x, step: dict, length: int = -1):
    """The attention preamble both contracts share: compute-dtype [S, d] -> q [1, nq, S, hd] (normed,
    RoPE at step["rope"], scaled by hd**-0.5, compute dtype), k [1, nkv, S, hd] (normed, RoPE,
    float32: each contract casts it for its cache) and v [1, nkv, S, hd]. `length`: S, -1 if dynamic."""
    layer, hd, eps = desc.layers[i], desc.config.head_dim, desc.config.rms_norm_eps
    nq, nkv = layer.q_heads, layer.kv_heads
    qkv = C.reshape(C.batch_matmul(x, w["qkv_proj"]), [1, length, nq + 2 * nkv, hd])
    q, k, v = C.split(C.transpose(qkv, u32([0, 2, 1, 3])), u32([nq, nkv, nkv]), np.int32(1))  # q | k | v heads
    scale = np.float32(hd**-0.5)  # folded into q, in float32
    q = rope(rms_norm(C.cast(q, np.float32), w["q_norm"], eps), *step["rope"])
    q = C.cast(C.broadcasting_mul(q, scale), desc.compute_dtype)
    return q, rope(rms_norm(C.cast(k, np.float32), w["k_norm"], eps), *step["rope"]), v


def attention(desc: PackageDescription, i: int, w: dict, x, step: dict, caches, updated: list):
    """compute-dtype [S, d] -> float32 [S, d]; this layer's updated cache slices appended to
    `updated`. As Apple's qwen3.py:83-101: RoPE at the new tokens' positions, their keys (after
    RoPE) and values written at cache[offset:P], attention over cache[:P] under the causal mask."""
    layer, hd, kv_max = desc.layers[i], desc.config.head_dim, kv_heads(desc)
    nq, nkv, ctx, dtype = layer.q_heads, layer.kv_heads, desc.context, desc.compute_dtype
    q, k, v = qkv_heads(desc, i, w, x, step)
    k = C.cast(k, dtype)
    written, attended = [], []
    for cache, new in zip(caches, (k, v)):
        # Layer i's slice of the shared state, all kv_max heads: [1, kv_max, T, hd]. Only its first
        # nkv heads at positions offset..P-1 change; the padding heads keep their (zero) contents.
        own = C.reshape(C.slice_(cache, [i, 0, 0, 0, 0], [i + 1, 1, kv_max, ctx, hd], [1] * 5), [1, kv_max, ctx, hd])
        own = C.slice_update(own, step["write_begin"], step["extent"][nkv], np.ones(4, np.int32), new)
        written.append(C.reshape(own, [1, 1, kv_max, ctx, hd]))
        attended.append(C.slice_(own, C.constant(np.zeros(4, np.int32)), step["extent"][nkv], [1] * 4))  # [1,nkv,P,hd]
    updated.append(written)
    # GQA without copying K/V: query head j reads kv head j // g, so the g query heads of one kv
    # head become g * S rows of one matmul against that head's keys.
    q = C.reshape(q, [1, nkv, -1, hd])  # [1, nkv, g * S, hd]
    scores = C.batch_matmul(q, C.transpose(attended[0], u32([0, 1, 3, 2])))  # [1, nkv, g * S, P]
    scores = C.broadcasting_where(step["future"][nq // nkv], np.array(-np.inf, dtype), scores)
    out = C.batch_matmul(C.softmax(scores, np.int32(3)), attended[1])  # [1, nkv, g * S, hd]
    out = C.reshape(C.transpose(C.reshape(out, [1, nq, -1, hd]), u32([0, 2, 1, 3])), [-1, nq * hd])
    return C.cast(C.batch_matmul(out, w["out_proj"]), np.float32)


def feed_forward(layer: Layer, w: dict, x):
    """compute-dtype [S, d] -> float32 [S, d]: SwiGLU, its `up` stored 2**-k smaller (numerics.py)."""
    gate, up = C.split(C.batch_matmul(x, w["proj_1"]), u32([layer.ffn_dim] * 2), np.int32(1))  # first half: gate
    out = C.cast(C.batch_matmul(C.mul(C.silu(gate), up), w["proj_2"]), np.float32)
    if layer.ffn_scale_exponent:
        out = C.broadcasting_mul(out, np.float32(2.0**layer.ffn_scale_exponent))
    return out


def transformer_block(desc: PackageDescription, i: int, h, weights: dict, attend):
    """Both contracts' block: the residual stream h stays float32; each sub-layer gets a
    compute-dtype input. `attend(i, w, x)` is the contract's attention over its own caches."""
    w = {role: weights[name] for role, name in block_names(i).items()}
    layer, eps, dtype = desc.layers[i], desc.config.rms_norm_eps, desc.compute_dtype
    h = C.broadcasting_add(h, attend(i, w, C.cast(rms_norm(h, w["attn_norm"], eps), dtype)))
    return C.broadcasting_add(h, feed_forward(layer, w, C.cast(rms_norm(h, w["ffn_norm"], eps), dtype)))


def sizes(x):
    """A tensor's dimensions as an int32 [rank] value (dynamic ones known only at run time)."""
    return C.cast(C.get_shape(x), np.int32)


def positions(desc: PackageDescription, input_ids, position_ids) -> dict:
    """What every block needs from the two inputs: S new tokens, P tokens in all, offset = P - S
    (Apple's qwen3.py:83-88), RoPE rows, cache write and read extents, the causal mask."""
    hd = desc.config.head_dim
    s = C.slice_(sizes(input_ids), [1], [2], [1])  # [1]
    p = C.slice_(sizes(position_ids), [1], [2], [1])  # [1]
    offset = C.sub(p, s)
    # RoPE at the position values of the new tokens, position_ids[offset:P] (Apple: narrow(-1, offset, S)).
    new_positions = C.slice_(
        position_ids,
        C.concat(np.int32(0), [C.constant(np.zeros(1, np.int32)), offset]),
        C.concat(np.int32(0), [C.constant(np.ones(1, np.int32)), p]),
        [1, 1],
    )
    rows = C.reshape(new_positions, [-1, 1])  # [S, 1]
    # Key slot k is hidden from the new token at slot offset + j iff k > offset + j. Rows repeat
    # per query head of a group (attention's GQA layout): row r is token r mod S.
    keys = C.range_(C.constant(np.int32(0)), C.reshape(p, []), C.constant(np.int32(1)))  # [P]
    queries = C.range_(C.reshape(offset, []), C.reshape(p, []), C.constant(np.int32(1)))  # [S]
    groups = {layer.q_heads // layer.kv_heads for layer in desc.layers}
    zero, one = C.constant(np.zeros(1, np.int32)), C.constant(np.ones(1, np.int32))
    return {
        "rope": [C.gather_nd(C.constant(table), rows) for table in (desc.rope_cos, desc.rope_sin)],  # [S, hd]
        # [1, 1, g*S, P] (a rank-2 mask reshaped to rank 4 came out wrong from coreai's rewrites)
        "future": {
            g: C.broadcasting_greater(keys, C.reshape(C.concat(np.int32(0), [queries] * g), [1, 1, -1, 1]))
            for g in groups
        },
        "write_begin": C.concat(np.int32(0), [zero, zero, offset, zero]),
        "extent": {  # end of the first kv heads, positions up to P: where a layer writes and what it reads
            kv: C.concat(
                np.int32(0), [one, C.constant(np.array([kv], np.int32)), p, C.constant(np.array([hd], np.int32))]
            )
            for kv in {layer.kv_heads for layer in desc.layers}
        },
    }


def output_logits(desc: PackageDescription, h, weights: dict):
    """float32 [S, d] -> float16 [1, S, vocab] for every position (the stock engines read float16
    logits: CoreAISequentialEngine.swift:146), through the tied embedding ([vocab, d], multiplied
    from the left, so it is stored once for the lookup and the output)."""
    x = C.cast(rms_norm(h, weights[FINAL_NORM], desc.config.rms_norm_eps), desc.compute_dtype)
    logits = C.transpose(C.batch_matmul(weights[EMBEDDING], C.transpose(x, u32([1, 0]))), u32([1, 0]))  # [S, vocab]
    return C.cast(C.reshape(logits, [1, -1, desc.config.vocab_size]), np.float16)


def kv_heads(desc: PackageDescription) -> int:
    """Heads per layer in the shared cache: the largest layer's (the others are padded to it)."""
    return max(layer.kv_heads for layer in desc.layers)


def cache_shape(desc: PackageDescription) -> list:
    """[L, 1, kv_max, T, head_dim] of keyCache and valueCache, T = the context."""
    return [len(desc.layers), 1, kv_heads(desc), desc.context, desc.config.head_dim]


def build_main(desc: PackageDescription) -> GraphOp:
    """The function `main`, built into the current module."""
    ftype = F16Type.get() if desc.compute_dtype == np.float16 else F32Type.get()
    int32 = IntegerType.get_signed(32)
    handle = C.HandleType.get(RankedTensorType.get(cache_shape(desc), ftype))
    graph = GraphOp(
        "main",
        [RankedTensorType.get([1, DYNAMIC], int32)] * 2 + [handle] * 2,
        [RankedTensorType.get([1, DYNAMIC, desc.config.vocab_size], F16Type.get())] + [C.TokenType.get()] * 2,
        input_names=["input_ids", "position_ids", *STATES],
        result_names=["logits"] + [f"written_{n}" for n in STATES],  # the runtime drops the tokens
    )
    with graph.block:
        input_ids, position_ids, *handles = graph.arguments
        weights = {n: weight(n, w, transpose=n != EMBEDDING and not is_norm(n)) for n, w in desc.weights.items()}
        step = positions(desc, input_ids, position_ids)
        # One read and one write per state and call: the coreai-model-zoo notes several per-slot
        # writes to one state dropped on the GPU delegate (knowledge/pipelined-engine.md:174-182).
        # The price: each call copies the cache (each layer's slice, then the concatenation).
        reads = [G.read_handle(handle, C.create_token()) for handle in handles]  # (value, token) each
        h = C.cast(C.gather_nd(weights[EMBEDDING], C.reshape(input_ids, [-1, 1])), np.float32)  # [S, d]
        layers = []  # each layer's updated (keys, values) slices
        attend = partial(attention, desc, step=step, caches=[value for value, _ in reads], updated=layers)
        for i in range(len(desc.layers)):
            h = transformer_block(desc, i, h, weights, attend)
        written = [
            G.write_handle(handle, C.concat(np.int32(0), [u[j] for u in layers]), token)
            for j, (handle, (_, token)) in enumerate(zip(handles, reads))
        ]
        C.output([output_logits(desc, h, weights)] + written)
    return graph
