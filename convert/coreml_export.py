"""`openelm export-coreml`: one stateful, multifunction Core ML package (iOS18/macOS15) for apps.

Two functions share one copy of the weights: `prefill` (1..prefill_length tokens) and `decode`
(one token). The KV cache lives in Core ML states, one fp16 key/value pair per layer, each shaped
by that layer's own kv-head count. Built with the MIL builder, no PyTorch.

Numerics: weights and matmuls are fp16; the residual stream, every RMSNorm, QK-norm and RoPE run
in fp32, because OpenELM's activations can pass fp16's 65504 (and x*x overflows far sooner).
"""

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from openelm_mlx import __version__
from openelm_mlx.config import OpenELMConfig
from openelm_mlx.errors import OpenELMError
from openelm_mlx.tokenizer import CHAT_TEMPLATE, find_tokenizer

FUNCTIONS = ("prefill", "decode")
COMPRESSIONS = ("none", "int8", "int4", "palettize4", "palettize6")
# RMSNorm weights stay fp32 (they are tiny and scale fp32 activations); all others are fp16.
FP32_WEIGHTS = ("norm.weight",)
# Constants that are tables, not weights: never compressed.
UNCOMPRESSED = ("rope_cos", "rope_sin")
DESCRIPTIONS = {
    "input_ids": "token ids, int32 [1, S]: S = 1..prefill_length for prefill, 1 for decode",
    "position": "int32 [1]: cache position of input_ids[0, 0] (= tokens already in the cache)",
    "logits": "float16 [1, vocab]: next-token logits after the last input token",
}


def model_weights(model) -> Dict[str, np.ndarray]:
    """HF-named float32 numpy weights of an MLX Model; quantized layers are dequantized."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    q = model.config.quantization or {}
    out = {}
    for name, value in params.items():
        base = name.rsplit(".", 1)[0]
        if name.endswith((".scales", ".biases")):
            continue
        if f"{base}.scales" in params:
            value = mx.dequantize(
                value,
                params[f"{base}.scales"],
                params.get(f"{base}.biases"),
                group_size=q["group_size"],
                bits=q["bits"],
            )
        out[name] = np.array(value.astype(mx.float32))
    return out


def const_name(hf_name: str) -> str:
    """MIL const name of a checkpoint tensor (dots are not allowed in names everywhere)."""
    return hf_name.replace(".", "_")


def rope_tables(config: OpenELMConfig, context: int):
    """cos and sign-folded sin, [context, head_dim] fp32: rope(x) = x*cos + swap_halves(x)*sin."""
    hd = config.head_dim
    inv_freq = config.rope_freq_constant ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    angles = np.arange(context, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    return (np.concatenate([cos, cos], 1).astype(np.float32), np.concatenate([-sin, sin], 1).astype(np.float32))


def build_function(
    config: OpenELMConfig,
    weights: Dict[str, np.ndarray],
    context: int,
    seq_len: Optional[int],
    compressed: Optional[dict] = None,
):
    """The MIL program of one function: seq_len=None is prefill (flexible length), 1 is decode.
    `compressed` (from compressed_weights) replaces weight consts by the same constexpr ops."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, get_new_symbol, types

    d, hd, eps = config.model_dim, config.head_dim, config.rms_norm_eps
    L = config.num_transformer_layers
    state_specs = []
    for kv in config.num_kv_heads:
        state_specs += [mb.StateTensorSpec((1, kv, context, hd), dtype=types.fp16) for _ in "kv"]
    S = seq_len or get_new_symbol()
    specs = [mb.TensorSpec((1, S), types.int32), mb.TensorSpec((1,), types.int32)] + state_specs
    cos_table, sin_table = rope_tables(config, context)

    def W(name):
        dtype = np.float32 if name.endswith(FP32_WEIGHTS) else np.float16
        if compressed and const_name(name) in compressed:
            op_type, op_name, inputs = compressed[const_name(name)]
            return getattr(mb, op_type)(**inputs, name=op_name)
        return mb.const(val=weights[name].astype(dtype), name=const_name(name))

    def rms_norm(x, weight_name):  # fp32 in, fp32 out: mean(x*x) would overflow fp16
        ms = mb.reduce_mean(x=mb.mul(x=x, y=x), axes=[-1], keep_dims=True)
        return mb.mul(x=mb.mul(x=x, y=mb.rsqrt(x=ms, epsilon=eps)), y=W(weight_name))

    def fp16(x):
        return mb.cast(x=x, dtype="fp16")

    def fp32(x):
        return mb.cast(x=x, dtype="fp32")

    def body(input_ids, position, *states):
        n = mb.gather(x=mb.shape(x=input_ids), indices=[1], axis=0)  # [1]: S
        end_pos = mb.add(x=position, y=n)
        if seq_len == 1:
            q_pos = position
        else:
            pos0 = mb.squeeze(x=position, axes=[0])
            q_pos = mb.range_1d(start=pos0, end=mb.add(x=pos0, y=mb.squeeze(x=n, axes=[0])), step=1)
        # Causal mask over the whole cache, built from the position: key k is visible to the
        # query at q_pos iff k <= q_pos. Stale cache entries past q_pos are masked out.
        keys = np.arange(context, dtype=np.int32)[None, :]
        mask = mb.less_equal(x=keys, y=mb.expand_dims(x=q_pos, axes=[1]), name="causal_mask")  # [S, C]
        cos = mb.gather(x=mb.const(val=cos_table, name="rope_cos"), indices=q_pos, axis=0)  # [S, hd]
        sin = mb.gather(x=mb.const(val=sin_table, name="rope_sin"), indices=q_pos, axis=0)

        def rope(x):  # fp32 [1, heads, S, hd]
            x1, x2 = mb.split(x=x, num_splits=2, axis=-1)
            return mb.add(x=mb.mul(x=x, y=cos), y=mb.mul(x=mb.concat(values=[x2, x1], axis=-1), y=sin))

        emb = W("transformer.token_embeddings.weight")
        h = fp32(mb.gather(x=emb, indices=input_ids, axis=0))  # [1, S, d] residual stream, fp32
        for i in range(L):
            p = f"transformer.layers.{i}."
            nq, nkv = config.num_query_heads[i], config.num_kv_heads[i]
            x = fp16(rms_norm(h, p + "attn_norm.weight"))
            qkv = mb.linear(x=x, weight=W(p + "attn.qkv_proj.weight"))
            qkv = mb.transpose(x=mb.reshape(x=qkv, shape=[1, -1, nq + 2 * nkv, hd]), perm=[0, 2, 1, 3])
            q, k, v = mb.split(x=qkv, split_sizes=[nq, nkv, nkv], axis=1)  # q | k | v heads
            q = fp16(rope(rms_norm(fp32(q), p + "attn.q_norm.weight")))
            k = fp16(rope(rms_norm(fp32(k), p + "attn.k_norm.weight")))
            begin = mb.concat(values=[np.zeros(2, np.int32), position, np.zeros(1, np.int32)], axis=0)
            end = mb.concat(values=[np.array([1, nkv], np.int32), end_pos, np.array([hd], np.int32)], axis=0)
            caches = []
            for state, new in ((states[2 * i], k), (states[2 * i + 1], v)):
                full = mb.slice_update(x=mb.read_state(input=state), update=new, begin=begin, end=end)
                full = mb.coreml_update_state(state=state, value=full)  # [1, kv, C, hd]
                if nq != nkv:  # GQA: query head j reads kv head j // (nq / nkv)
                    heads = np.arange(nq, dtype=np.int32) // (nq // nkv)
                    full = mb.gather(x=full, indices=heads, axis=1)
                caches.append(full)
            att = mb.scaled_dot_product_attention(query=q, key=caches[0], value=caches[1], attn_mask=mask)
            att = mb.reshape(x=mb.transpose(x=att, perm=[0, 2, 1, 3]), shape=[1, -1, nq * hd])
            h = mb.add(x=h, y=fp32(mb.linear(x=att, weight=W(p + "attn.out_proj.weight"))))
            x = fp16(rms_norm(h, p + "ffn_norm.weight"))
            gate, up = mb.split(x=mb.linear(x=x, weight=W(p + "ffn.proj_1.weight")), num_splits=2, axis=-1)
            y = mb.linear(x=mb.mul(x=mb.silu(x=gate), y=up), weight=W(p + "ffn.proj_2.weight"))
            h = mb.add(x=h, y=fp32(y))
        last = mb.slice_by_index(x=h, begin=[0, -1, 0], end=[1, 0, d], end_mask=[False, True, False])
        x = fp16(rms_norm(last, "transformer.norm.weight"))
        logits = mb.linear(x=x, weight=emb)  # tied output layer
        return mb.reshape(x=logits, shape=[1, config.vocab_size], name="logits")

    names = ["input_ids", "position"] + [f"{kind}_cache_{i}" for i in range(L) for kind in ("k", "v")]
    with Function(dict(zip(names, specs)), opset_version=ct.target.iOS18) as func:
        func.set_outputs([body(*(func.inputs[n] for n in names))])
    prog = Program()
    prog.add_function("main", func)
    return prog


def compression_config(compress: str, block_size: int):
    """coremltools.optimize.coreml settings for a --compress choice (None for 'none')."""
    from coremltools.optimize import coreml as cto

    if compress == "none":
        return None
    if compress == "int8":
        op = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
    elif compress == "int4":
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=block_size
        )
    else:
        op = cto.OpPalettizerConfig(
            mode="kmeans", nbits=int(compress[-1]), granularity="per_grouped_channel", group_size=16
        )
    return cto.OptimizationConfig(global_config=op, op_name_configs={n: None for n in UNCOMPRESSED})


def _describe(spec, metadata: dict):
    for function in spec.description.functions:
        for feature in list(function.input) + list(function.output):
            feature.shortDescription = DESCRIPTIONS[feature.name]
        for feature in function.state:
            kind, _, layer = feature.name.split("_")
            feature.shortDescription = (
                f"layer {layer} {'keys (after RoPE)' if kind == 'k' else 'values'}, "
                "fp16 [1, kv_heads, context, head_dim]; make one with make_state()"
            )
    spec.description.metadata.shortDescription = "OpenELM causal LM: prefill and decode with a stateful KV cache"
    spec.description.metadata.versionString = __version__
    spec.description.metadata.userDefined.update({k: str(v) for k, v in metadata.items()})


def export_coreml(
    model_source,
    output,
    context: Optional[int] = None,
    prefill_length: int = 128,
    compress: str = "none",
    block_size: int = 32,
    force: bool = False,
    tokenizer=None,
) -> dict:
    """Export `model_source` (anything openelm_mlx.load accepts) to OUTPUT.mlpackage and its
    tokenizer to OUTPUT.tokenizer.model. Returns a summary (sizes, seconds)."""
    import coremltools as ct

    from openelm_mlx.loader import load_model

    start = time.perf_counter()
    output = Path(output)
    if output.suffix != ".mlpackage":
        raise OpenELMError(f"output '{output}' must end in .mlpackage")
    tok_path = tokenizer_path(output)
    for path in (output, tok_path):
        if path.exists() and not force:
            raise OpenELMError(f"{path} exists: pass --force to overwrite it")
    if compress not in COMPRESSIONS:
        raise OpenELMError(f"unknown compression '{compress}': choose one of {', '.join(COMPRESSIONS)}")
    model, folder = load_model(model_source, dtype="float32")
    config = model.config
    tok = find_tokenizer(folder, tokenizer)
    context = context or config.max_context_length
    if not 1 <= context <= config.max_context_length:
        raise OpenELMError(
            f"--context {context} is outside 1..{config.max_context_length} (the model's max_context_length)"
        )
    if not 1 <= prefill_length <= context:
        raise OpenELMError(f"--prefill-length {prefill_length} must be between 1 and --context ({context})")
    if compress == "int4" and block_size <= 0:
        raise OpenELMError(f"--block-size must be positive, got {block_size}")
    weights = model_weights(model)
    del model

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        tmp = Path(tmp)
        # prefill is compressed; decode reuses its compressed weights op for op (compression,
        # k-means above all, runs once), so the two functions share one deduplicated copy.
        prefill = _compress(
            _convert(build_function(config, weights, context, None), prefill_length), compress, block_size
        )
        prefill.save(str(tmp / "prefill.mlpackage"))
        shared = compressed_weights(prefill)
        del prefill
        decode = _convert(build_function(config, weights, context, 1, shared), 1)
        decode.save(str(tmp / "decode.mlpackage"))
        del decode
        desc = ct.utils.MultiFunctionDescriptor()
        for name in FUNCTIONS:
            desc.add_function(str(tmp / f"{name}.mlpackage"), src_function_name="main", target_function_name=name)
        desc.default_function_name = "decode"
        ct.utils.save_multifunction(desc, str(tmp / "multi.mlpackage"))

        multi = ct.models.MLModel(str(tmp / "multi.mlpackage"), skip_model_load=True)
        spec = multi.get_spec()
        _describe(
            spec,
            {
                "openelm.bos_token_id": tok.bos_id,
                "openelm.eos_token_id": tok.eos_id,
                "openelm.context_length": context,
                "openelm.prefill_length": prefill_length,
                "openelm.vocab_size": config.vocab_size,
                "openelm.chat_template": CHAT_TEMPLATE,
                "openelm.source_model": str(model_source),
                "openelm.compression": compress,
                "openelm.block_size": block_size if compress == "int4" else "",
                "openelm.num_parameters": config.num_parameters(),
                "openelm.toolkit_version": __version__,
                "openelm.config": json.dumps(config.to_dict()),
            },
        )
        staged = tmp / "final.mlpackage"
        ct.models.MLModel(spec, weights_dir=multi.weights_dir, skip_model_load=True).save(str(staged))
        shutil.copyfile(tok.path, tmp / "tokenizer.model")
        for path in (output, tok_path):  # --force: replace only once everything is written
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        staged.rename(output)
        (tmp / "tokenizer.model").rename(tok_path)

    size = package_size(output)
    n_params = config.num_parameters()
    return {
        "output": str(output),
        "tokenizer": str(tok_path),
        "compression": compress,
        "context": context,
        "prefill_length": prefill_length,
        "bytes": size,
        "parameters": n_params,
        "bytes_per_parameter": size / n_params,
        "seconds": time.perf_counter() - start,
    }


def _convert(prog, max_len: int):
    import coremltools as ct

    length = ct.RangeDim(1, max_len, default=max_len) if max_len > 1 else 1
    inputs = [
        ct.TensorType(name="input_ids", shape=(1, length), dtype=np.int32),
        ct.TensorType(name="position", shape=(1,), dtype=np.int32),
    ]
    # FLOAT32 means "keep the dtypes the program states": weights and matmuls are already fp16,
    # and the fp16 pass must not cast the fp32 residual stream and norms down.
    return ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32,
        inputs=inputs,
        skip_model_load=True,
    )


def _compress(mlmodel, compress: str, block_size: int):
    from coremltools.optimize import coreml as cto

    config = compression_config(compress, block_size)
    if config is None:
        return mlmodel
    if compress.startswith("palettize"):
        from threadpoolctl import threadpool_limits

        # One k-means per group of 16 channels on a few thousand values: OpenMP start-up
        # dominates, and one thread is ~30x faster than the default pool.
        with threadpool_limits(limits=1):
            return cto.palettize_weights(mlmodel, config)
    return cto.linear_quantize_weights(mlmodel, config)


def compressed_weights(mlmodel) -> dict:
    """const name -> (constexpr op type, its output name, its typed inputs) of a compressed model."""
    from coremltools.converters.mil.frontend.milproto.load import load
    from coremltools.converters.mil.mil import types

    spec = mlmodel.get_spec()
    prog = load(spec, spec.specificationVersion, mlmodel.weights_dir)
    out = {}
    for operation in prog.functions["main"].operations:
        if operation.op_type.startswith("constexpr_"):
            name = operation.outputs[0].name
            inputs = {k: v.val.astype(types.nptype_from_builtin(v.dtype)) for k, v in operation.inputs.items()}
            out[weight_const(name)] = (operation.op_type, name, inputs)
    return out


def weight_const(name: str) -> str:
    """The const name a (possibly compressed) weight op came from: coremltools adds a suffix."""
    for suffix in ("_quantized", "_palettized"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def tokenizer_path(package: Path) -> Path:
    """OUT.mlpackage -> OUT.tokenizer.model, the tokenizer written beside the package."""
    package = Path(package)
    return package.with_name(package.name[: -len(".mlpackage")] + ".tokenizer.model")


def package_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def add_arguments(parser):
    parser.add_argument("model", help="model folder or Hugging Face repo id (MLX folders may be quantized)")
    parser.add_argument(
        "-o", "--output", required=True, help="OUT.mlpackage (the tokenizer goes to OUT.tokenizer.model)"
    )
    parser.add_argument(
        "--context", type=int, default=None, help="KV-cache length in tokens (default: the model's max_context_length)"
    )
    parser.add_argument("--prefill-length", type=int, default=128, help="most tokens per prefill call (default 128)")
    parser.add_argument(
        "--compress", choices=COMPRESSIONS, default="none", help="weight compression (default none: fp16)"
    )
    parser.add_argument("--block-size", type=int, default=32, help="int4 block size along the input axis (default 32)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model if the model folder has none")
    parser.add_argument("--force", action="store_true", help="overwrite OUT if it exists")


def main(args):
    summary = export_coreml(
        args.model,
        args.output,
        context=args.context,
        prefill_length=args.prefill_length,
        compress=args.compress,
        block_size=args.block_size,
        force=args.force,
        tokenizer=args.tokenizer,
    )
    print(
        f"wrote {summary['output']} ({summary['bytes'] / 2**20:.1f} MiB, "
        f"{summary['bytes_per_parameter']:.3f} bytes/parameter, {summary['compression']}) "
        f"and {summary['tokenizer']} in {summary['seconds']:.1f} s"
    )
