"""The Core AI program of one package function, block by block as openelm_mlx/model.py writes the
model: attention, feed_forward, transformer_block, and the embedding and output around them.
convert/coreml/graph.py is the same program in Core ML's ops; package.py describes both.

Core AI's differences in spelling: activations are [S, width] (batch 1), linear weights are stored
[in, out] for batch_matmul, states are handles read and written with tokens, and the attention is
composed (scores, mask, softmax). Every weight constant carries its name in its location, and
its data in a resource of that name, so verify.py can read it back from main.mlirb."""

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


def attention(desc: PackageDescription, layer: Layer, w: dict, x, step: dict, k_handle, v_handle):
    """compute-dtype [S, d] -> (float32 [S, d], the two cache write tokens). Writes this call's keys
    (after RoPE) and values into the cache handles at `position` and attends over the whole cache
    under the causal mask."""
    hd, nq, nkv, ctx = desc.config.head_dim, layer.q_heads, layer.kv_heads, desc.context
    eps, dtype = desc.config.rms_norm_eps, desc.compute_dtype
    qkv = C.reshape(C.batch_matmul(x, w["qkv_proj"]), [1, -1, nq + 2 * nkv, hd])
    q, k, v = C.split(C.transpose(qkv, u32([0, 2, 1, 3])), u32([nq, nkv, nkv]), np.int32(1))  # q | k | v heads
    scale = np.float32(hd**-0.5)  # folded into q, in float32
    q = C.cast(C.broadcasting_mul(rope(rms_norm(C.cast(q, np.float32), w["q_norm"], eps), *step["rope"]), scale), dtype)
    k = C.cast(rope(rms_norm(C.cast(k, np.float32), w["k_norm"], eps), *step["rope"]), dtype)
    caches, tokens = [], []
    for handle, new in ((k_handle, k), (v_handle, v)):
        old, read = G.read_handle(handle, C.create_token())
        full = C.slice_update(old, step["start"], C.add(step["start"], step["extent"][nkv]), np.ones(4, np.int32), new)
        tokens.append(G.write_handle(handle, full, read))
        if nq != nkv:  # GQA: query head j reads kv head j // (nq / nkv)
            full = C.reshape(
                C.broadcast_to(C.reshape(full, [1, nkv, 1, ctx, hd]), u32([1, nkv, nq // nkv, ctx, hd])),
                [1, nq, ctx, hd],
            )
        caches.append(full)
    scores = C.batch_matmul(q, C.transpose(caches[0], u32([0, 1, 3, 2])))  # [1, nq, S, context]
    scores = C.broadcasting_where(step["future"], np.array(-np.inf, dtype), scores)
    out = C.batch_matmul(C.softmax(scores, np.int32(3)), caches[1])  # [1, nq, S, hd]
    out = C.reshape(C.transpose(out, u32([0, 2, 1, 3])), [-1, nq * hd])
    return C.cast(C.batch_matmul(out, w["out_proj"]), np.float32), tokens


def feed_forward(layer: Layer, w: dict, x):
    """compute-dtype [S, d] -> float32 [S, d]: SwiGLU, its `up` stored 2**-k smaller (numerics.py)."""
    gate, up = C.split(C.batch_matmul(x, w["proj_1"]), u32([layer.ffn_dim] * 2), np.int32(1))  # first half: gate
    out = C.cast(C.batch_matmul(C.mul(C.silu(gate), up), w["proj_2"]), np.float32)
    if layer.ffn_scale_exponent:
        out = C.broadcasting_mul(out, np.float32(2.0**layer.ffn_scale_exponent))
    return out


def transformer_block(desc: PackageDescription, i: int, h, weights: dict, step: dict, handles):
    """The residual stream h stays float32; each sub-layer gets a compute-dtype input."""
    w = {role: weights[name] for role, name in block_names(i).items()}
    layer, eps, dtype = desc.layers[i], desc.config.rms_norm_eps, desc.compute_dtype
    attn, tokens = attention(desc, layer, w, C.cast(rms_norm(h, w["attn_norm"], eps), dtype), step, *handles)
    h = C.broadcasting_add(h, attn)
    return C.broadcasting_add(h, feed_forward(layer, w, C.cast(rms_norm(h, w["ffn_norm"], eps), dtype))), tokens


def positions(desc: PackageDescription, input_ids, position, seq_len) -> dict:
    """What every block needs from `position`: S, cache slots, causal mask, RoPE rows."""
    if seq_len == 1:  # decode: static shapes throughout
        n, q_pos = C.constant(np.array([1], np.int32)), C.reshape(position, [1, 1])
    else:
        n = C.slice_(C.cast(C.get_shape(input_ids), np.int32), [1], [2], [1])  # [1]: S
        end = C.reshape(C.add(position, n), [])
        q_pos = C.reshape(C.range_(C.reshape(position, []), end, C.constant(np.int32(1))), [-1, 1])  # [S, 1]
    # Key slot k is hidden from the query at q_pos iff k > q_pos: later tokens and stale slots.
    future = C.broadcasting_greater(np.arange(desc.context, dtype=np.int32)[None, :], q_pos)  # [S, context]
    hd = desc.config.head_dim
    return {
        "n": n,
        "future": C.reshape(future, [1, 1, -1, desc.context]),
        "rope": [C.gather_nd(C.constant(table), q_pos) for table in (desc.rope_cos, desc.rope_sin)],  # [S, hd]
        "start": C.concat(
            np.int32(0), [C.constant(np.zeros(2, np.int32)), position, C.constant(np.zeros(1, np.int32))]
        ),
        "extent": {
            kv: C.concat(
                np.int32(0), [C.constant(np.array([1, kv], np.int32)), n, C.constant(np.array([hd], np.int32))]
            )
            for kv in {layer.kv_heads for layer in desc.layers}
        },
    }


def output_logits(desc: PackageDescription, h, weights: dict, n):
    """float32 [S, d] -> [1, vocab] of the last token, through the tied embedding ([vocab, d],
    multiplied from the left, so it is stored once for the lookup and the output)."""
    d = desc.config.model_dim
    last = C.slice_(
        h,
        C.concat(np.int32(0), [C.sub(n, C.constant(np.array([1], np.int32))), C.constant(np.zeros(1, np.int32))]),
        C.concat(np.int32(0), [n, C.constant(np.array([d], np.int32))]),
        [1, 1],
    )
    x = C.cast(rms_norm(C.reshape(last, [1, d]), weights[FINAL_NORM], desc.config.rms_norm_eps), desc.compute_dtype)
    logits = C.batch_matmul(weights[EMBEDDING], C.transpose(x, u32([1, 0])))  # [vocab, 1]
    return C.reshape(logits, [1, desc.config.vocab_size])


def build_function(desc: PackageDescription, name: str, seq_len) -> GraphOp:
    """One function of the package, built into the current module: seq_len None is prefill (any
    length; runners keep each call within prefill_length), 1 is decode."""
    config = desc.config
    ftype = F16Type.get() if desc.compute_dtype == np.float16 else F32Type.get()
    int32 = IntegerType.get_signed(32)
    state_names, handle_types = [], []
    for i, layer in enumerate(desc.layers):
        for kind in "kv":
            state_names.append(f"{kind}_cache_{i}")
            cache = RankedTensorType.get([1, layer.kv_heads, desc.context, config.head_dim], ftype)
            handle_types.append(C.HandleType.get(cache))
    graph = GraphOp(
        name,
        [RankedTensorType.get([1, seq_len or DYNAMIC], int32), RankedTensorType.get([1], int32)] + handle_types,
        [RankedTensorType.get([1, config.vocab_size], ftype)] + [C.TokenType.get()] * len(state_names),
        input_names=["input_ids", "position"] + state_names,
        result_names=["logits"] + [f"written_{n}" for n in state_names],  # the runtime drops the tokens
    )
    with graph.block:
        input_ids, position, *handles = graph.arguments
        weights = {n: weight(n, w, transpose=n != EMBEDDING and not is_norm(n)) for n, w in desc.weights.items()}
        step = positions(desc, input_ids, position, seq_len)
        h = C.cast(C.gather_nd(weights[EMBEDDING], C.reshape(input_ids, [-1, 1])), np.float32)  # [S, d]
        written = []
        for i in range(len(desc.layers)):
            h, tokens = transformer_block(desc, i, h, weights, step, handles[2 * i : 2 * i + 2])
            written += tokens
        C.output([output_logits(desc, h, weights, step["n"])] + written)
    return graph
