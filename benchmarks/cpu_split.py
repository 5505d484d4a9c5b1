"""CPU layers (openelm_mlx/cpu_layers.py): each matmul of the 270M shape and of the demo model run
whole on one thread (as mlx-lm runs it) against split across the CPU's threads, per precision and
number of rows, float32 weights column-major in both. This is the measurement behind SPLIT_MIN_WORK.
Then the demo model's pass over a few rows (a prompt-lookup draft's verification) with its
feed-forward blocks split by block (CPUFeedForward) against split per product.

    python -m openelm_mlx.benchmarks.cpu_split --out cpu_split.json

Whole and split alternate in each trial; the figure is the median of per-trial ratios.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from openelm_mlx import blas, cpu_layers
from openelm_mlx.cache import make_cache
from openelm_mlx.checkpoint import build_model, read_weights
from openelm_mlx.config import OpenELMConfig
from openelm_mlx.loader import DEMO_MODEL, load_model, resolve_dtype

from .machine import machine_info

ROWS = (1, 4, 9, 64)  # decoding, short drafts, a full prompt-lookup draft, a prompt chunk


def shapes(config: OpenELMConfig) -> dict:
    """(in, out) of each distinct matmul in the model, named by its layer."""
    attn, ffn = config.head_dim * (config.num_query_heads[0] + 2 * config.num_kv_heads[0]), config.ffn_dims[0]
    d = config.model_dim
    return {"qkv_proj": (d, attn), "proj_1": (d, 2 * ffn), "proj_2": (ffn, d), "output": (d, config.vocab_size)}


def layers_for(d_in: int, d_out: int, precision: str) -> tuple:
    """The CPU layer of one matmul built to run whole (one thread) and split (every core), on any
    size (split_min_work 0), both holding the same values."""
    layer = nn.Linear(d_in, d_out, bias=False)
    if precision != "fp32":
        layer = layer.to_quantized(group_size=64, bits=int(precision[1:]))
    mx.eval(layer.parameters())
    threads = [cpu_layers.shared_threads(1), cpu_layers.shared_threads(cpu_layers.core_count())]
    return tuple(cpu_layers.cpu_layer(layer, t, 0, blas.fast_blas()) for t in threads)


def seconds(fn, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    return (time.perf_counter() - start) / repeats


def measure(layers: tuple, x: mx.array, trials: int, repeats: int) -> dict:
    """Seconds per call run whole (one thread, as mlx-lm runs it) and split, and the median ratio
    whole / split."""
    one, every = layers
    whole, split = [], []
    for _ in range(trials):
        whole.append(seconds(lambda: one(x), repeats))
        split.append(seconds(lambda: every(x), repeats))
    return {
        "whole_ms": 1e3 * statistics.median(whole),
        "split_ms": 1e3 * statistics.median(split),
        "speedup": statistics.median(a / b for a, b in zip(whole, split)),
    }


def product_split():
    """The demo model with every linear layer split per product (cpu_layers.cpu_layer on each, as
    swap() built them before CPUFeedForward), feed-forward blocks as they are."""
    config = OpenELMConfig.from_pretrained(DEMO_MODEL)
    model = build_model(config, read_weights(DEMO_MODEL))
    model.set_dtype(resolve_dtype("auto", config))  # as loader.ready does
    threads, fast = cpu_layers.shared_threads(cpu_layers.core_count()), blas.fast_blas()
    cpu_layers.replace_layers(
        model, lambda path, layer: cpu_layers.cpu_layer(layer, threads, cpu_layers.SPLIT_MIN_WORK, fast)
    )
    mx.eval(model.parameters())
    return model


def blocks(trials: int) -> list:
    """The demo model's pass over 1, 5 and 9 rows after 100 cached tokens (decoding, verifying a
    prompt-lookup draft), feed-forward blocks split by block (swap()) against split per product:
    milliseconds per pass, interleaved, and the median of per-trial ratios."""
    variants = {"block": load_model(DEMO_MODEL)[0], "product": product_split()}
    caches = {}
    for name, model in variants.items():
        caches[name] = make_cache(model)
        model(mx.arange(5, 105)[None], cache=caches[name])
        mx.eval([c.state for c in caches[name]])
    out = []
    for rows in (1, 5, 9):
        times = {name: [] for name in variants}
        for _ in range(trials):
            for name, model in variants.items():
                start = time.perf_counter()
                for _ in range(8):
                    mx.eval(model(mx.arange(rows)[None] + 7, cache=caches[name]))
                    for c in caches[name]:
                        c.trim(rows)
                times[name].append((time.perf_counter() - start) / 8)
        ratios = [p / b for p, b in zip(times["product"], times["block"])]
        out.append({"rows": rows, **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()},
                    "speedup": statistics.median(ratios)})  # fmt: skip
        print(f"demo pass over {rows} rows: {out[-1]['product_ms']:.2f} ms split per product, "
              f"{out[-1]['block_ms']:.2f} ms per block, {out[-1]['speedup']:.2f}x", flush=True)  # fmt: skip
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    mx.set_default_device(mx.cpu)
    rows_out = []
    configs = {"270M": OpenELMConfig.preset("270M"), "demo": OpenELMConfig.from_pretrained(DEMO_MODEL)}
    matmuls = [(m, name, shape) for m, config in configs.items() for name, shape in shapes(config).items()]
    for model_name, name, (d_in, d_out) in matmuls:
        for precision in ("fp32", "q8", "q4"):
            layers = layers_for(d_in, d_out, precision)  # every shape, including those below the threshold
            for rows in ROWS:
                if precision == "fp32" and rows == 1:
                    continue  # one float row is never split (the column-major slice would be a copy)
                x = mx.random.normal((1, rows, d_in))
                result = measure(layers, x, args.trials, repeats=max(1, 64 // rows))
                rows_out.append({"model": model_name, "matmul": name, "in": d_in, "out": d_out, "precision": precision, "rows": rows,
                                 "multiply_adds": rows * d_in * d_out, **result})  # fmt: skip
                print(f"{model_name:4s} {name:9s} {precision} rows {rows:2d}: {result['whole_ms']:8.2f} ms whole, "
                      f"{result['split_ms']:8.2f} ms split, {result['speedup']:.2f}x", flush=True)  # fmt: skip
    report = {"threads": cpu_layers.core_count(), "machine": machine_info(), "blocks": blocks(args.trials * 4),
              "results": rows_out}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
