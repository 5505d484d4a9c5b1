"""The Core ML (MIL) program of one package function, block by block as openelm_mlx/model.py
writes the model: attention, feed_forward, transformer_block, and the embedding and output around
them. convert/coreai/graph.py is the same program in Core AI's ops; package.py describes both."""

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


def attention(desc: PackageDescription, layer: Layer, w: dict, x, step: dict, k_state, v_state):
    """float16 [1, S, d] -> float32 [1, S, d]. Writes this call's keys (after RoPE) and values into
    the cache states at `position` and attends over the whole cache under the causal mask."""
    hd, nq, nkv = desc.config.head_dim, layer.q_heads, layer.kv_heads
    eps = desc.config.rms_norm_eps
    qkv = mb.linear(x=x, weight=w["qkv_proj"])
    qkv = mb.transpose(x=mb.reshape(x=qkv, shape=[1, -1, nq + 2 * nkv, hd]), perm=[0, 2, 1, 3])
    q, k, v = mb.split(x=qkv, split_sizes=[nq, nkv, nkv], axis=1)  # q heads | k heads | v heads
    q = fp16(rope(rms_norm(fp32(q), w["q_norm"], eps), step["cos"], step["sin"]))
    k = fp16(rope(rms_norm(fp32(k), w["k_norm"], eps), step["cos"], step["sin"]))
    begin = mb.concat(values=[np.zeros(2, np.int32), step["position"], np.zeros(1, np.int32)], axis=0)
    end = mb.concat(values=[np.array([1, nkv], np.int32), step["end"], np.array([hd], np.int32)], axis=0)
    caches = []
    for state, new in ((k_state, k), (v_state, v)):
        full = mb.slice_update(x=mb.read_state(input=state), update=new, begin=begin, end=end)
        full = mb.coreml_update_state(state=state, value=full)  # [1, kv, context, hd]
        if nq != nkv:  # GQA: query head j reads kv head j // (nq / nkv)
            full = mb.gather(x=full, indices=np.arange(nq, dtype=np.int32) // (nq // nkv), axis=1)
        caches.append(full)
    out = mb.scaled_dot_product_attention(query=q, key=caches[0], value=caches[1], attn_mask=step["mask"])
    out = mb.reshape(x=mb.transpose(x=out, perm=[0, 2, 1, 3]), shape=[1, -1, nq * hd])
    return fp32(mb.linear(x=out, weight=w["out_proj"]))


def feed_forward(layer: Layer, w: dict, x):
    """float16 [1, S, d] -> float32 [1, S, d]: SwiGLU, its `up` stored 2**-k smaller (numerics.py)."""
    gate, up = mb.split(x=mb.linear(x=x, weight=w["proj_1"]), num_splits=2, axis=-1)  # the first half is the gate
    out = fp32(mb.linear(x=mb.mul(x=mb.silu(x=gate), y=up), weight=w["proj_2"]))
    if layer.ffn_scale_exponent:
        out = mb.mul(x=out, y=np.float32(2.0**layer.ffn_scale_exponent))
    return out


def transformer_block(desc: PackageDescription, i: int, h, weights: dict, step: dict, states):
    """The residual stream h stays float32; each sub-layer gets a float16 input."""
    w = {role: weights[name] for role, name in block_names(i).items()}
    layer, eps = desc.layers[i], desc.config.rms_norm_eps
    h = mb.add(x=h, y=attention(desc, layer, w, fp16(rms_norm(h, w["attn_norm"], eps)), step, *states))
    return mb.add(x=h, y=feed_forward(layer, w, fp16(rms_norm(h, w["ffn_norm"], eps))))


def positions(desc: PackageDescription, input_ids, position, seq_len) -> dict:
    """What every block needs from `position`: cache slots, causal mask, RoPE rows."""
    n = mb.gather(x=mb.shape(x=input_ids), indices=[1], axis=0)  # [1]: S
    if seq_len == 1:
        q_pos = position
    else:
        pos0 = mb.squeeze(x=position, axes=[0])
        q_pos = mb.range_1d(start=pos0, end=mb.add(x=pos0, y=mb.squeeze(x=n, axes=[0])), step=1)
    # Key slot k is visible to the query at q_pos iff k <= q_pos; stale slots past it are masked.
    slots = np.arange(desc.context, dtype=np.int32)[None, :]
    return {
        "position": position,
        "end": mb.add(x=position, y=n),
        "mask": mb.less_equal(x=slots, y=mb.expand_dims(x=q_pos, axes=[1]), name="causal_mask"),  # [S, context]
        "cos": mb.gather(x=mb.const(val=desc.rope_cos, name="rope_cos"), indices=q_pos, axis=0),  # [S, hd]
        "sin": mb.gather(x=mb.const(val=desc.rope_sin, name="rope_sin"), indices=q_pos, axis=0),
    }


def output_logits(desc: PackageDescription, h, weights: dict):
    """float32 [1, S, d] -> float16 [1, vocab] of the last token, through the tied embedding."""
    config = desc.config
    last = mb.slice_by_index(x=h, begin=[0, -1, 0], end=[1, 0, config.model_dim], end_mask=[False, True, False])
    x = fp16(rms_norm(last, weights[FINAL_NORM], config.rms_norm_eps))
    logits = mb.linear(x=x, weight=weights[EMBEDDING])
    return mb.reshape(x=logits, shape=[1, config.vocab_size], name="logits")


def build_function(desc: PackageDescription, seq_len) -> Program:
    """The MIL program of one function: seq_len=None is prefill (flexible length), 1 is decode."""
    config = desc.config
    state_specs = []
    for layer in desc.layers:
        shape = (1, layer.kv_heads, desc.context, config.head_dim)
        state_specs += [mb.StateTensorSpec(shape, dtype=types.fp16) for _ in "kv"]
    specs = [mb.TensorSpec((1, seq_len or get_new_symbol()), types.int32), mb.TensorSpec((1,), types.int32)]
    names = ["input_ids", "position"] + [f"{kind}_cache_{i}" for i in range(len(desc.layers)) for kind in "kv"]

    def body(input_ids, position, *states):
        weights = {name: weight(name, stored) for name, stored in desc.weights.items()}
        step = positions(desc, input_ids, position, seq_len)
        h = fp32(mb.gather(x=weights[EMBEDDING], indices=input_ids, axis=0))  # [1, S, d]
        for i in range(len(desc.layers)):
            h = transformer_block(desc, i, h, weights, step, states[2 * i : 2 * i + 2])
        return output_logits(desc, h, weights)

    with Function(dict(zip(names, specs + state_specs)), opset_version=OPSET) as func:
        func.set_outputs([body(*(func.inputs[n] for n in names))])
    prog = Program()
    prog.add_function("main", func)
    return prog
