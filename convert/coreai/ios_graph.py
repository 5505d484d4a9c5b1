"""The iOS static-shape contract of Apple's Core AI LanguageBundle, function by function: what
coreai-models' StaticShapeEngine (swift/Sources/CoreAILanguageModels/InferenceEngines/
CoreAIStaticShapeEngine.swift) loads and drives, for OpenELM (static_engine.py is its Python twin).

- `load_embeddings`: no inputs; `embedding_table` int8 [V, 1, H], the tied embedding quantized per
  tensor (coreai-models models/ios/qwen3.py:290-304). Its one scale is a constant of the graphs below.
- `gather_embeddings_<q>`: `in_new_token_ids` int32 [1, q] and the table -> `out_transformer_input`
  float16 [1, q, 1, H].
- `extend_<ctx>_<q>`: `transformer_input`, `position_ids` uint16 [1, q], `in_step` int32 [1],
  `causal_mask` float16 [1, ctx, 1, q] (0 where a query may see a key, -40000 elsewhere) and the
  table; states `key_cache` / `value_cache` float16 [L, 1, kv_max * head_dim, 1, ctx]; output
  `out_logits` float16 [1, 1, q, V] for every row (the engine samples on the CPU: no argmax here,
  coreai-torch #116). The q new keys and values are written at cache columns in_step..in_step+q-1.
- `prompt_opt_<ctx>_<q>`: the same, for prompt windows whose logits the engine never reads
  (CoreAIStaticShapeEngine.swift:386-388, 439): the caches only, `out_logits` a dummy [1].

OpenELM's kv-head count differs per layer; the caches hold the largest, layer i uses the first
kv_i * head_dim rows of its slice. Every (ctx, q) function is built explicitly with static shapes
(graph.py's helpers do the math). Both ways run on Apple's Linux runtime (coreai-core 1.0.0b3):
AIProgram.set_static_shape_config({'"64"': ..., '"128"': ...}) turned a graph with a dynamic
state into extend_64 and extend_128 that ran and updated their states; but it clones one graph
traced with dynamic ctx and q, so every reshape, slice end and broadcast shape here would have
to be computed from get_shape at run time. Explicit functions keep them constants, and their
identical weight constants are still stored once (a bundle holds one copy of the weights)."""

from dataclasses import dataclass
from functools import partial
from typing import List, Tuple

import numpy as np
from coreai.authoring import DebugInfo  # noqa: F401  first: coreai's dialect modules import coreai.authoring

# isort: split
from coreai._compiler.dialects import _coreai_ops_gen as G
from coreai._compiler.dialects import coreai as C
from coreai._compiler.ir import F16Type, IntegerType, RankedTensorType
from coreai.authoring.graph_builder import GraphOp

from openelm_mlx.errors import OpenELMError

from ..compression import Quantized
from ..package import EMBEDDING, FINAL_NORM, PackageDescription, is_norm
from .graph import named_constant, qkv_heads, rms_norm, transformer_block, u32, weight

QUERY_LENGTHS = (8, 16, 64)  # Apple's IOS_STATIC_QUERY_LENS (coreai-models models/base.py:864)
SMALLEST_CONTEXT = 256  # IOS_STATIC_MIN_CACHE_LEN, doubling up to the context (base.py:867, 1008-1030)
MASKED = -40000.0  # what the engine writes where a query may not look (CoreAIStaticShapeEngine.swift:312)


@dataclass
class StaticShapes:
    """The (ctx, q) ladder of the extend and prompt_opt functions."""

    contexts: Tuple[int, ...]
    query_lengths: Tuple[int, ...]

    @classmethod
    def ladder(cls, context: int, smallest: int = SMALLEST_CONTEXT, query_lengths=QUERY_LENGTHS) -> "StaticShapes":
        """smallest, 2*smallest, ... below `context`, then `context` itself: the engine refuses a
        model without an extend at metadata's max_context_length (CoreAIStaticShapeEngine.swift:94-105),
        and Apple's own ladder (powers of two times 256) misses any other context."""
        q_max = max(query_lengths)
        if context % q_max:
            raise OpenELMError(
                f"--context {context} is not a multiple of the largest query length {q_max}: the engine's "
                f"windows start at multiples of q and must end inside the cache; choose a multiple of {q_max}"
            )
        contexts, c = [], smallest
        while c < context:
            contexts.append(c)
            c *= 2
        return cls(tuple(contexts) + (context,), tuple(sorted(query_lengths)))

    def function_names(self) -> List[str]:
        names = ["load_embeddings"] + [f"gather_embeddings_{q}" for q in self.query_lengths]
        for kind in ("extend", "prompt_opt"):
            names += [f"{kind}_{c}_{q}" for c in self.contexts for q in self.query_lengths]
        return names


def embedding_table(desc: PackageDescription) -> Quantized:
    """The tied embedding as stored: int8 data [V, H] and one scale (repeated per row)."""
    table = desc.weights[EMBEDDING]
    if not (isinstance(table, Quantized) and table.bits == 8 and np.all(table.scale == table.scale.flat[0])):
        raise ValueError("the iOS contract needs the embedding quantized int8 per tensor (package.describe)")
    return table


def kv_rows(desc: PackageDescription) -> int:
    """Cache rows per layer: the largest kv-head count times head_dim."""
    return max(layer.kv_heads for layer in desc.layers) * desc.config.head_dim


def tensor(shape, element_type):
    return RankedTensorType.get(list(shape), element_type)


def load_embeddings(desc: PackageDescription) -> GraphOp:
    v, h = desc.config.vocab_size, desc.config.model_dim
    int8 = IntegerType.get_signed(8)
    graph = GraphOp("load_embeddings", [], [tensor([v, 1, h], int8)], input_names=[], result_names=["embedding_table"])
    with graph.block:
        table = embedding_table(desc)
        C.output([named_constant(EMBEDDING + ".data", table.data.reshape(v, 1, h))])
    return graph


def embedding_scale(desc: PackageDescription):
    return named_constant(EMBEDDING + ".scale", embedding_table(desc).scale[:1, :1].astype(np.float32))


def gather_embeddings(desc: PackageDescription, q: int) -> GraphOp:
    """Rows of the int8 table times its scale, float16 [1, q, 1, H]."""
    v, h = desc.config.vocab_size, desc.config.model_dim
    graph = GraphOp(
        f"gather_embeddings_{q}",
        [tensor([1, q], IntegerType.get_signed(32)), tensor([v, 1, h], IntegerType.get_signed(8))],
        [tensor([1, q, 1, h], F16Type.get())],
        input_names=["in_new_token_ids", "embedding_table"],
        result_names=["out_transformer_input"],
    )
    with graph.block:
        ids, table = graph.arguments
        rows = C.gather_nd(C.reshape(table, [v, h]), C.reshape(ids, [q, 1]))  # [q, H] int8
        x = C.broadcasting_mul(C.cast(rows, np.float32), embedding_scale(desc))
        C.output([C.reshape(C.cast(x, np.float16), [1, q, 1, h])])
    return graph


def attention(desc: PackageDescription, i: int, w: dict, x, step: dict, caches: list):
    """compute-dtype [q, d] -> float32 [q, d]. Layer i's new keys (after RoPE) and values go into
    `caches` (the whole [L, 1, rows, 1, ctx] values, updated functionally) at columns
    in_step..in_step+q-1; the layer then attends over its own kv_i * head_dim rows under the mask."""
    layer, hd, dtype = desc.layers[i], desc.config.head_dim, desc.compute_dtype
    nq, nkv, q_len, ctx = layer.q_heads, layer.kv_heads, step["q"], step["ctx"]
    q, k, v = qkv_heads(desc, i, w, x, step, q_len)  # [1, heads, q, hd]
    begin = C.concat(np.int32(0), [C.constant(np.array([i, 0, 0, 0], np.int32)), step["in_step"]])
    end = C.concat(np.int32(0), [C.constant(np.array([i + 1, 1, nkv * hd, 1], np.int32)), step["end"]])
    mine = []  # this layer's keys and values: [1, nq, hd, ctx] (GQA-expanded)
    for j, new in enumerate((k, v)):
        new = C.reshape(C.transpose(C.cast(new, np.float16), u32([0, 1, 3, 2])), [1, 1, nkv * hd, 1, q_len])
        caches[j] = C.slice_update(caches[j], begin, end, np.ones(5, np.int32), new)
        own = C.slice_(caches[j], [i, 0, 0, 0, 0], [i + 1, 1, nkv * hd, 1, ctx], [1, 1, 1, 1, 1])
        own = C.cast(C.reshape(own, [1, nkv, hd, ctx]), dtype)
        if nq != nkv:  # GQA: query head j reads kv head j // (nq / nkv)
            own = C.reshape(
                C.broadcast_to(C.reshape(own, [1, nkv, 1, hd, ctx]), u32([1, nkv, nq // nkv, hd, ctx])),
                [1, nq, hd, ctx],
            )
        mine.append(own)
    scores = C.broadcasting_add(C.batch_matmul(q, mine[0]), step["mask"])  # [1, nq, q, ctx]
    out = C.batch_matmul(C.softmax(scores, np.int32(3)), C.transpose(mine[1], u32([0, 1, 3, 2])))  # [1, nq, q, hd]
    out = C.reshape(C.transpose(out, u32([0, 2, 1, 3])), [q_len, nq * hd])
    return C.cast(C.batch_matmul(out, w["out_proj"]), np.float32)


def window(desc: PackageDescription, ctx: int, q: int, position_ids, in_step, causal_mask) -> dict:
    """What every block needs from the engine's inputs. RoPE rows are gathered in the graph from
    the uint16 positions, as Apple does (primitives/ios/rope.py:22-29, 114-116), after a cast to
    int32: it runs on Apple's Linux runtime, keeps the engine's inputs exactly the stock ones (no
    cos/sin inputs, which StaticShapeEngine.buildInputs would not fill: :466-531), and nothing
    found says a gather from positions fails on devices (apple-runners.md section 3)."""
    rows = C.reshape(C.cast(position_ids, np.int32), [q, 1])
    mask = C.transpose(C.reshape(causal_mask, [ctx, q]), u32([1, 0]))  # [ctx, 1, q] layout -> [q, ctx]
    return {
        "q": q,
        "ctx": ctx,
        # [q, hd]; resources, so that every function shares one copy (inline constants are not shared)
        "rope": [
            C.gather_nd(named_constant(f"rope.{n}", t), rows)
            for n, t in (("cos", desc.rope_cos), ("sin", desc.rope_sin))
        ],
        "in_step": in_step,
        "end": C.add(in_step, C.constant(np.array([q], np.int32))),
        "mask": C.reshape(C.cast(mask, desc.compute_dtype), [1, 1, q, ctx]),
    }


def output_logits(desc: PackageDescription, h, table, weights: dict, q: int):
    """float32 [q, d] -> float16 [1, 1, q, V] through the tied int8 table. The per-tensor scale
    multiplies the normed activations (float32) rather than the table: the int8 products then
    sum to the logits' own size, where table values up to 127 would overflow float16 sums."""
    v, d = desc.config.vocab_size, desc.config.model_dim
    x = C.transpose(rms_norm(h, weights[FINAL_NORM], desc.config.rms_norm_eps), u32([1, 0]))  # [d, q]
    # Not next to the norm's gain: coreai's rewrite would fold the two constants into one
    # nameless one, which verify could no longer read back.
    x = C.cast(C.broadcasting_mul(x, embedding_scale(desc)), desc.compute_dtype)
    logits = C.batch_matmul(C.cast(C.reshape(table, [v, d]), desc.compute_dtype), x)  # [V, q]
    return C.reshape(C.cast(C.transpose(logits, u32([1, 0])), np.float16), [1, 1, q, v])


def extend(desc: PackageDescription, ctx: int, q: int, prompt_only: bool) -> GraphOp:
    """extend_<ctx>_<q>, or prompt_opt_<ctx>_<q> when prompt_only (no output layer)."""
    config, rows = desc.config, kv_rows(desc)
    f16, int8 = F16Type.get(), IntegerType.get_signed(8)
    cache = C.HandleType.get(tensor([len(desc.layers), 1, rows, 1, ctx], f16))
    graph = GraphOp(
        f"{'prompt_opt' if prompt_only else 'extend'}_{ctx}_{q}",
        [
            tensor([1, q, 1, config.model_dim], f16),
            tensor([1, q], IntegerType.get_unsigned(16)),
            tensor([1], IntegerType.get_signed(32)),
            tensor([1, ctx, 1, q], f16),
            tensor([config.vocab_size, 1, config.model_dim], int8),
            cache,
            cache,
        ],
        [tensor([1], f16) if prompt_only else tensor([1, 1, q, config.vocab_size], f16)] + [C.TokenType.get()] * 2,
        input_names=["transformer_input", "position_ids", "in_step", "causal_mask", "embedding_table"]
        + ["key_cache", "value_cache"],
        result_names=["out_logits", "written_key_cache", "written_value_cache"],  # the runtime drops the tokens
    )
    with graph.block:
        x, position_ids, in_step, causal_mask, table, k_handle, v_handle = graph.arguments
        weights = {n: weight(n, w, transpose=not is_norm(n)) for n, w in desc.weights.items() if n != EMBEDDING}
        step = window(desc, ctx, q, position_ids, in_step, causal_mask)
        # One read and one write per cache per call, every layer updating its slice in between:
        # several writes to one state in one call were seen dropped on the GPU delegate
        # (coreai-model-zoo knowledge/pipelined-engine.md:174-182).
        (k_old, k_read), (v_old, v_read) = (
            G.read_handle(k_handle, C.create_token()),
            G.read_handle(v_handle, C.create_token()),
        )
        caches = [k_old, v_old]
        h = C.cast(C.reshape(x, [q, config.model_dim]), np.float32)
        attend = partial(attention, desc, step=step, caches=caches)
        for i in range(len(desc.layers)):
            h = transformer_block(desc, i, h, weights, attend)
        written = [G.write_handle(k_handle, caches[0], k_read), G.write_handle(v_handle, caches[1], v_read)]
        if prompt_only:  # Apple returns one cache element (models/ios/qwen3.py:217-218)
            out = C.reshape(C.slice_(caches[0], [0] * 5, [1] * 5, [1] * 5), [1])
        else:
            out = output_logits(desc, h, table, weights, q)
        C.output([out] + written)
    return graph


def build_functions(desc: PackageDescription, shapes: StaticShapes):
    """Every function of the contract, built into the current module (identical constants are
    stored once)."""
    largest = max(len(desc.layers), kv_rows(desc))
    if largest > shapes.contexts[-1]:
        # The engine takes a function's context to be key_cache's largest dimension
        # (CoreAIStaticShapeEngine.swift:254-264), so the full-context extend would not be found.
        raise OpenELMError(
            f"--context {shapes.contexts[-1]} is below the key cache's {largest} rows (layers, or the largest "
            f"kv-head count times head_dim), which Apple's static-shape engine would read as the context: "
            f"use a --context of at least {largest}"
        )
    load_embeddings(desc)
    for q in shapes.query_lengths:
        gather_embeddings(desc, q)
    for prompt_only in (False, True):
        for ctx in shapes.contexts:
            for q in shapes.query_lengths:
                extend(desc, ctx, q, prompt_only)
