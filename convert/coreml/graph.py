"""The Core ML (MIL) program of an exported package, block by block as openelm_mlx/model.py
writes the model: attention, feed_forward, transformer_block, and the embedding and output around
them, in the stateful contract of swift-transformers' Core ML LanguageModel. convert/coreai/graph.py
is the same model in Core AI's ops; package.py describes both."""

import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Function, Program, get_new_symbol, types

from ..compression import Palettized, Quantized
from ..package import EMBEDDING, FINAL_NORM, Layer, PackageDescription, block_names

OPSET = ct.target.iOS18  # states, blockwise int4 and the fused attention op need iOS18


def weight(name: str, stored):
    """A weight as a MIL value: a const, or the constexpr op that decompresses it on the device."""
    op_name = name.replace(".", "_")  # MIL names cannot hold dots everywhere
    if isinstance(stored, Quantized):
        data = stored.data.astype(types.np_int4_dtype if stored.bits == 4 else np.int8)
        return mb.constexpr_blockwise_shift_scale(data=data, scale=stored.scale, name=op_name)
    if isinstance(stored, Palettized):
        indices = stored.indices.astype(types.nptype_from_builtin(types.string_to_builtin(f"uint{stored.bits}")))
        lut = stored.lut[:, None, :, None]  # [groups, 1, entries, 1]: one LUT per group of rows
        return mb.constexpr_lut_to_dense(indices=indices, lut=lut, name=op_name)
    return mb.const(val=stored, name=op_name)


def fp16(x):
    return mb.cast(x=x, dtype="fp16")


def fp32(x):
    return mb.cast(x=x, dtype="fp32")


def rms_norm(x, gain, eps: float):
    """float32 in, float32 out: mean(x*x) overflows float16 once |x| > 256."""
    ms = mb.reduce_mean(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True)
    return mb.mul(x=mb.mul(x=x, y=mb.rsqrt(x=ms, epsilon=eps)), y=gain)


def rope(x, cos, sin):
    """Rotate-half RoPE in float32 on [1, heads, S, hd]; sin carries the sign (package.rope_tables)."""
    x1, x2 = mb.split(x=x, num_splits=2, axis=-1)
    return mb.add(x=mb.mul(x=x, y=cos), y=mb.mul(x=mb.concat(values=[x2, x1], axis=-1), y=sin))


def attention(desc: PackageDescription, i: int, layer: Layer, w: dict, x, step: dict, caches):
    """float16 [1, q, d] -> (float32 [1, q, d], caches). Writes this call's keys (after RoPE) and
    values into layer i's rows of keyCache / valueCache at the call's positions and attends over
    the cache under the causal mask built from positions (never from the causalMask input's values).
    `caches` are (state, current value) pairs: each layer updates the value the layer before wrote,
    so the writes are ordered by data flow, not by the op order that passes may change."""
    hd, nq, nkv, ctx = desc.config.head_dim, layer.q_heads, layer.kv_heads, desc.context
    eps = desc.config.rms_norm_eps
    qkv = mb.linear(x=x, weight=w["qkv_proj"])
    qkv = mb.transpose(x=mb.reshape(x=qkv, shape=[1, -1, nq + 2 * nkv, hd]), perm=[0, 2, 1, 3])
    q, k, v = mb.split(x=qkv, split_sizes=[nq, nkv, nkv], axis=1)  # q heads | k heads | v heads
    q = fp16(rope(rms_norm(fp32(q), w["q_norm"], eps), step["cos"], step["sin"]))
    k = fp16(rope(rms_norm(fp32(k), w["k_norm"], eps), step["cos"], step["sin"]))
    # [L, 1, kv_max, ctx, hd]: layer i owns row i and its first nkv heads (the rest stay zero).
    begin = mb.concat(values=[np.array([i, 0, 0], np.int32), step["start"], np.zeros(1, np.int32)], axis=0)
    end = mb.concat(values=[np.array([i + 1, 1, nkv], np.int32), step["end"], np.array([hd], np.int32)], axis=0)
    full, updated = [], []
    for (state, value), new in zip(caches, (k, v)):
        cache = mb.slice_update(x=value, update=mb.expand_dims(x=new, axes=[0]), begin=begin, end=end)
        cache = mb.coreml_update_state(state=state, value=cache)
        updated.append((state, cache))
        mine = mb.slice_by_index(x=cache, begin=[i, 0, 0, 0, 0], end=[i + 1, 1, nkv, ctx, hd])
        mine = mb.reshape(x=mine, shape=[1, nkv, ctx, hd])
        if nq != nkv:  # GQA: query head j reads kv head j // (nq / nkv)
            mine = mb.gather(x=mine, indices=np.arange(nq, dtype=np.int32) // (nq // nkv), axis=1)
        full.append(mine)
    out = mb.scaled_dot_product_attention(query=q, key=full[0], value=full[1], attn_mask=step["mask"])
    out = mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[1, -1, nq * hd])
    return fp32(mb.linear(x=out, weight=w["out_proj"])), updated


def feed_forward(layer: Layer, w: dict, x):
    """float16 [1, S, d] -> float32 [1, S, d]: SwiGLU, its `up` stored 2**-k smaller (numerics.py)."""
    gate, up = mb.split(x=mb.linear(x=x, weight=w["proj_1"]), num_splits=2, axis=-1)  # the first half is the gate
    out = fp32(mb.linear(x=mb.mul(x=mb.silu(x=gate), y=up), weight=w["proj_2"]))
    if layer.ffn_scale_exponent:
        out = mb.mul(x=out, y=np.float32(2.0**layer.ffn_scale_exponent))
    return out


def transformer_block(desc: PackageDescription, i: int, h, weights: dict, step: dict, caches):
    """The residual stream h stays float32; each sub-layer gets a float16 input. -> (h, caches)"""
    w = {role: weights[name] for role, name in block_names(i).items()}
    layer, eps = desc.layers[i], desc.config.rms_norm_eps
    out, caches = attention(desc, i, layer, w, fp16(rms_norm(h, w["attn_norm"], eps)), step, caches)
    h = mb.add(x=h, y=out)
    return mb.add(x=h, y=feed_forward(layer, w, fp16(rms_norm(h, w["ffn_norm"], eps)))), caches


def positions(desc: PackageDescription, input_ids, causal_mask) -> dict:
    """What every block needs: cache slots, causal mask and RoPE rows of this call's q tokens.
    swift-transformers sends T+1 zeros as causalMask, T = tokens so far counting these q
    (LanguageModel.swift:516,546), so the first of them sits at T - q = mask length - q - 1 (its
    reference export, Examples/Mistral7B/export.py:161, takes mask length - q and so leaves slot 0
    empty and attends it). Only the mask's length is read; clamped so writes stay in the cache."""
    n = mb.gather(x=mb.shape(x=input_ids), indices=[1], axis=0)  # [1]: q
    m = mb.gather(x=mb.shape(x=causal_mask), indices=[3], axis=0)  # [1]: T + 1
    start = mb.sub(x=mb.sub(x=m, y=n), y=np.int32(1))
    start = mb.maximum(x=mb.minimum(x=start, y=mb.sub(x=np.int32(desc.context), y=n)), y=np.int32(0))
    end = mb.add(x=start, y=n)
    q_pos = mb.range_1d(start=mb.squeeze(x=start, axes=[0]), end=mb.squeeze(x=end, axes=[0]), step=1)
    # Key slot k is visible to the query at q_pos iff k <= q_pos: empty and stale slots never are.
    slots = np.arange(desc.context, dtype=np.int32)[None, :]
    return {
        "start": start,
        "end": end,
        "mask": mb.less_equal(x=slots, y=mb.expand_dims(x=q_pos, axes=[1]), name="causal_mask"),  # [q, context]
        "cos": mb.gather(x=mb.const(val=desc.rope_cos, name="rope_cos"), indices=q_pos, axis=0),  # [q, hd]
        "sin": mb.gather(x=mb.const(val=desc.rope_sin, name="rope_sin"), indices=q_pos, axis=0),
    }


def output_logits(desc: PackageDescription, h, weights: dict):
    """float32 [1, q, d] -> float16 [1, q, vocab] through the tied embedding: every row, as
    swift-transformers reads row q - 1 of a rank-3 output (LanguageModel.swift:554-561)."""
    x = fp16(rms_norm(h, weights[FINAL_NORM], desc.config.rms_norm_eps))
    return mb.linear(x=x, weight=weights[EMBEDDING], name="logits")


def cache_shape(desc: PackageDescription):
    """keyCache / valueCache: [L, 1, kv_max, context, head_dim], every layer padded to the most kv
    heads (the shape of Examples/Mistral7B/export.py:143-149, whose layers all have the same)."""
    kv_max = max(layer.kv_heads for layer in desc.layers)
    return (len(desc.layers), 1, kv_max, desc.context, desc.config.head_dim)


def build_program(desc: PackageDescription) -> Program:
    """The MIL program of swift-transformers' stateful LanguageModel: inputIds [1, q] and causalMask
    [1, 1, 1, T + 1] in, logits [1, q, vocab] out, keyCache / valueCache states."""
    shape = cache_shape(desc)
    specs = {
        "inputIds": mb.TensorSpec((1, get_new_symbol()), types.int32),
        "causalMask": mb.TensorSpec((1, 1, 1, get_new_symbol()), types.fp16),
        "keyCache": mb.StateTensorSpec(shape, dtype=types.fp16),
        "valueCache": mb.StateTensorSpec(shape, dtype=types.fp16),
    }

    def body(input_ids, causal_mask, *states):
        weights = {name: weight(name, stored) for name, stored in desc.weights.items()}
        step = positions(desc, input_ids, causal_mask)
        h = fp32(mb.gather(x=weights[EMBEDDING], indices=input_ids, axis=0))  # [1, q, d]
        caches = [(state, mb.read_state(input=state)) for state in states]  # read once, then chained
        for i in range(len(desc.layers)):
            h, caches = transformer_block(desc, i, h, weights, step, caches)
        return output_logits(desc, h, weights)

    with Function(specs, opset_version=OPSET) as func:
        func.set_outputs([body(*(func.inputs[n] for n in specs))])
    prog = Program()
    prog.add_function("main", func)
    return prog
