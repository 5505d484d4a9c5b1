"""What the float16 guard's rescaling costs (convert/numerics.py), measured:

1. precision: the FFN of each layer of a trained model (the demo model, or MODEL) run in float16
   with `up` stored times 2**-k, against float32, on the calibration text, for k = 0..20, with
   float16 subnormals kept (IEEE, as Apple's Linux runtime and numpy do) and flushed to zero (as
   some accelerators do);
2. the bound: each layer's weight bound of its FFN outputs against the peak the text reaches,
   summing every unit's worst case against the bound numerics.py uses, and the k each gives;
3. the bound's time on a layer of OpenELM-270M's and 3B's widest shapes (random weights).

    python -m openelm_mlx.benchmarks.float16_rescaling [MODEL]
"""

import sys
import time

import mlx.core as mx
import numpy as np

from openelm_mlx.convert.numerics import calibration_tokens, exponent_for, ffn_bounds, normed_rows
from openelm_mlx.convert.package import model_weights
from openelm_mlx.loader import DEMO_MODEL, load_model
from openelm_mlx.tokenizer import find_tokenizer

TINY = 2.0**-14  # float16's smallest normal


def fp16(x, flush: bool):
    y = np.asarray(x, np.float32).astype(np.float16).astype(np.float32)
    return np.where(np.abs(y) < TINY, 0, y) if flush else y


def ffn_float16(x, proj_1, proj_2, k: int, flush: bool):
    """The package's FFN: float16 operands and outputs (float32 sums), `up` stored times 2**-k."""
    gate_w, up_w = np.split(proj_1, 2)
    x = fp16(x, flush)
    gate = fp16(x @ fp16(gate_w, flush).T, flush)
    up = fp16(x @ fp16(up_w * 2.0**-k, flush).T, flush)
    product = fp16(gate / (1 + np.exp(-gate)) * up, flush)
    return fp16(product @ fp16(proj_2, flush).T, flush) * 2.0**k


def summed_bound(proj_1, proj_2, gain) -> float:
    """proj_2's bound summing every unit's worst case (what numerics.ffn_bounds improves on)."""
    d = gain.shape[0]
    a, b = np.split(normed_rows(proj_1, gain), 2)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    return float((np.abs(proj_2) @ (d * (na * nb + np.abs((a * b).sum(1))) / 2)).max())


def ffn_inputs(model, tokens):
    """Each layer's FFN input (after ffn_norm) on `tokens`, float32 [S, d]."""
    h = model.transformer.token_embeddings(mx.array([tokens]))
    inputs = []
    for layer in model.layers:
        h = h + layer.attn(layer.attn_norm(h), "causal")
        x = layer.ffn_norm(h)
        inputs.append(np.array(x[0]))
        h = h + layer.ffn(x)
    return inputs


def main(source=None):
    model, folder = load_model(source or DEMO_MODEL, dtype="float32")
    tok = find_tokenizer(folder, None)
    tokens = calibration_tokens(tok, model.config.max_context_length)[0]
    w = model_weights(model)
    inputs = ffn_inputs(model, tokens)
    print(f"1. FFN relative error, float16 vs float32, {len(tokens)} calibration tokens, worst layer")
    print("    k   subnormals kept   flushed to zero")
    for k in (0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20):
        errs = {False: 0.0, True: 0.0}
        for i, x in enumerate(inputs):
            p = f"transformer.layers.{i}.ffn."
            ref = x @ w[p + "proj_1.weight"].T
            gate, up = np.split(ref, 2, axis=-1)
            ref = (gate / (1 + np.exp(-gate)) * up) @ w[p + "proj_2.weight"].T
            for flush in errs:
                out = ffn_float16(x, w[p + "proj_1.weight"], w[p + "proj_2.weight"], k, flush)
                errs[flush] = max(errs[flush], float(np.linalg.norm(out - ref) / np.linalg.norm(ref)))
        print(f"  {k:3d}   {errs[False]:15.2e}   {errs[True]:15.2e}")

    print("2. proj_2 output: text's peak, bound summing every unit's worst case, numerics.py's bound (k)")
    for i, x in enumerate(inputs):
        p = f"transformer.layers.{i}."
        proj_1, proj_2, gain = w[p + "ffn.proj_1.weight"], w[p + "ffn.proj_2.weight"], w[p + "ffn_norm.weight"]
        gate, up = np.split(x @ proj_1.T, 2, axis=-1)
        peak = float(np.abs((gate / (1 + np.exp(-gate)) * up) @ proj_2.T).max())
        summed = summed_bound(proj_1, proj_2, gain)
        used = ffn_bounds(proj_1, proj_2, gain)["proj_2"]
        print(
            f"  layer {i}: {peak:9.3g}  {summed:9.3g} (k={exponent_for(summed)})  {used:9.3g} (k={exponent_for(used)})"
        )

    print("3. one layer of random weights (variance 1/fan_in): ffn_bounds' time, its bound, the summed one")
    rng = np.random.default_rng(0)
    for name, d, ffn in (("270M widest", 1280, 5120), ("3B widest", 3072, 12288)):
        proj_1 = (rng.standard_normal((2 * ffn, d)) / np.sqrt(d)).astype(np.float32)
        proj_2 = (rng.standard_normal((d, ffn)) / np.sqrt(ffn)).astype(np.float32)
        start = time.perf_counter()
        gain = np.ones(d, np.float32)
        bound = ffn_bounds(proj_1, proj_2, gain)["proj_2"]
        seconds = time.perf_counter() - start
        print(f"  {name} (d={d}, ffn={ffn}): {seconds:.1f} s, {bound:.3g}, {summed_bound(proj_1, proj_2, gain):.3g}")


if __name__ == "__main__":
    main(*sys.argv[1:])
