"""Matrix products on a CPU, as module swaps: `swap(model)` replaces each linear layer (and the tied
embedding, which is also the output layer) once, after loading, by a CPU layer that decides its
BLAS path, threads and weight layout when it is built, as gpt-fast's WeightOnlyInt8Linear and MLX's
own nn.quantize replace layers. model.py stays the model; each CPU layer gives the values its base
class gives, bit for bit (tests/test_linear.py).

Measured on a 2-core EPYC, 270M, ours / mlx-lm (benchmarks/results/linux-cpu-*-2026-11-30*):
- Dequantize-then-BLAS pays off only with an optimised BLAS: q4, 64-token prompt, 16x mlx-lm's
  prefill with OpenBLAS preloaded, 0.81x with the mlx[cpu] wheel's bundled reference BLAS.
- MLX runs each CPU op on one thread. Split across threads (one CPU stream per core), a quantized
  matmul ran ~1.8x faster; so did a float one over several rows with the reference BLAS (an
  optimised BLAS splits its own work). With column-major float32 weights: 270M pp64 / tg16
  1.5-2.9x mlx-lm's in fp32, q8 and q4, the logits bit for bit the same.
"""

import contextlib
import os
import threading
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from . import blas
from .model import FeedForward

# Below this many tokens a quantized matmul is cheaper than dequantizing its weight.
DEQUANTIZE_MIN_TOKENS = 16
# From this many multiply-adds on, a matmul split across 2 CPU threads ran 0.99-2.0x as fast as
# whole (median 1.77x, 62 cases of 270M and demo-model shapes); below it, 13 of 26 cases ran slower,
# down to 0.56x (benchmarks/cpu_split.py, results/cpu-split-linux-cpu-2026-11-30.json).
SPLIT_MIN_WORK = 1 << 20
MAX_THREADS = 4  # measured: 2
NEVER = 1 << 62
BLOCK_SPLIT_MIN_WORK = 1 << 20  # of a float feed-forward block (CPUFeedForward); measured below


class Threads:
    """A stream (a thread) per core used. The first is the caller's own (None): handing every part
    to new streams made a 9-token pass 20% slower. MLX streams serve only the thread that made
    them, so each calling thread (a server's handler) gets its own."""

    def __init__(self, count: int):
        self.count = count
        self.local = threading.local()

    def streams(self) -> list:
        if not hasattr(self.local, "streams"):
            self.local.streams = [None] + [mx.new_stream(mx.cpu) for _ in range(self.count - 1)]
        return self.local.streams


@lru_cache(maxsize=None)
def shared_threads(count: int) -> Threads:
    """One Threads of each count per process: each MLX stream is a thread of its own, so every
    model loaded shares them."""
    return Threads(count)


def core_count() -> int:
    """Cores this process may use, at most MAX_THREADS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, MAX_THREADS)


def cuts(a: mx.array, streams: list) -> list:
    """(start, stop) of near-equal runs of `a`'s rows, one per stream, none empty (MLX's quantized
    kernel crashes the process on an empty weight)."""
    n = a.shape[0]
    k = min(len(streams), n)
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


class Split:
    """How a CPU layer runs its product, fixed when it is built."""

    def setup(self, threads: Threads, split_min_work: int, dequantize: bool):
        self.threads, self.split_min_work, self.dequantize = threads, split_min_work, dequantize

    def split(self, rows: int, x: mx.array) -> list:
        """The streams to split x's product across, or [] to run it whole."""
        streams = self.threads.streams()
        work = rows * x.shape[-1] * self.weight.shape[0]  # multiply-adds
        return streams if len(streams) > 1 and work >= self.split_min_work else []


class FloatSplit(Split):
    """A float product on the reference BLAS: float32 weights column-major (its sgemm computes
    x @ W.T as a dot product per output, but as vector updates, 2x faster, when W.T is
    contiguous; files written from the model hold the values row-major all the same), several
    rows split by rows (a slice of a column-major weight would be a copy)."""

    def lay_out(self):
        if self.weight.dtype == mx.float32:
            self.weight = mx.contiguous(self.weight.T).T
            mx.eval(self.weight)  # one at a time: peak memory is the model plus one matrix

    def product(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        streams = self.split(rows, x) if rows > 1 else []
        if not streams:
            return x @ self.weight.T
        flat = x.reshape(rows, x.shape[-1])
        parts = [mx.matmul(flat[i:j], self.weight.T, stream=s) for (i, j), s in zip(cuts(flat, streams), streams)]
        return mx.concatenate(parts, 0).reshape(*x.shape[:-1], -1)


class QuantizedSplit(Split):
    """A quantized product: dequantized then through a fast BLAS for a long prompt, else split by
    output features, so that one row (decoding) splits too."""

    def product(self, x: mx.array, whole) -> mx.array:
        rows = x.size // x.shape[-1]
        if self.dequantize and rows >= DEQUANTIZE_MIN_TOKENS:
            w = mx.dequantize(self.weight, self.scales, self.biases, self.group_size, self.bits, self.mode)
            return x @ w.T.astype(x.dtype)
        streams = self.split(rows, x)
        if not streams:
            return whole(x)
        return mx.concatenate([self.rows(x, *r, s) for r, s in zip(cuts(self.weight, streams), streams)], -1)

    def rows(self, x: mx.array, start: int, stop: int, stream) -> mx.array:
        """x times the output features [start, stop), computed on `stream`."""
        biases = self.get("biases")
        return mx.quantized_matmul(
            x,
            self.weight[start:stop],
            self.scales[start:stop],
            None if biases is None else biases[start:stop],
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            stream=stream,
        )


class CPULinear(FloatSplit, nn.Linear):
    def __call__(self, x: mx.array) -> mx.array:
        return self.product(x)


class CPUEmbedding(FloatSplit, nn.Embedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return self.product(x)


class CPUQuantizedLinear(QuantizedSplit, nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        return self.product(x, super().__call__)


class CPUQuantizedEmbedding(QuantizedSplit, nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        return self.product(x, super().as_linear)


class CPUFeedForward(FeedForward):
    """A feed-forward block over several rows split by rows across the CPU's threads, each thread
    running the whole block (both products and the gating) on its rows, its linear layers whole: a
    hand-over per block instead of two (each hand-over between threads costs about what the second
    thread gains on a product this small). Measured on a 2-core EPYC VM whose second core comes and
    goes (benchmarks/cpu_split.py): the demo model's pass over 5 and 9 rows 1.03-1.10x as fast as
    split per product, the same logits; its six blocks alone over 9 rows, 20.5 ms on one thread,
    12.0 split by block at best."""

    def __init__(self, proj_1: nn.Module, proj_2: nn.Module, threads: Threads, split_min_work: int):
        nn.Module.__init__(self)  # FeedForward's own makes new layers from a config: these are the loaded ones
        self.proj_1, self.proj_2 = proj_1, proj_2
        self.threads, self.split_min_work = threads, split_min_work

    def __call__(self, x: mx.array) -> mx.array:
        rows = x.size // x.shape[-1]
        streams = self.threads.streams()
        work = rows * (self.proj_1.weight.size + self.proj_2.weight.size)  # multiply-adds
        if rows < 2 or len(streams) < 2 or work < self.split_min_work:
            return super().__call__(x)
        flat = x.reshape(rows, x.shape[-1])
        parts = []
        for (i, j), stream in zip(cuts(flat, streams), streams):
            with mx.stream(stream) if stream is not None else contextlib.nullcontext():
                parts.append(super().__call__(flat[i:j]))
        return mx.concatenate(parts, 0).reshape(*x.shape[:-1], -1)


def cpu_layer(layer: nn.Module, threads: Threads, split_min_work: int, fast_blas: bool) -> nn.Module:
    """The CPU form of a bias-free linear layer or embedding, holding the same values; any other
    module as it is. With a fast BLAS float layers stay as they are (the BLAS splits its own work)."""
    kind = type(layer)
    if kind not in (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding) or "bias" in layer:
        return layer
    out_dims, in_dims = layer.weight.shape
    if kind is nn.Linear and not fast_blas:
        new = CPULinear(in_dims, out_dims, bias=False)
    elif kind is nn.Embedding and not fast_blas:
        new = CPUEmbedding(out_dims, in_dims)
    elif kind is nn.QuantizedLinear:  # a packed row holds 32 // bits values per uint32
        new = CPUQuantizedLinear(in_dims * 32 // layer.bits, out_dims, False, layer.group_size, layer.bits, layer.mode)
    elif kind is nn.QuantizedEmbedding:
        new = CPUQuantizedEmbedding(layer.num_embeddings, layer.dims, layer.group_size, layer.bits, layer.mode)
    else:  # a float layer with a fast BLAS
        return layer
    new.update(layer.parameters())  # the initial weights above are lazy, never computed
    new.setup(threads, split_min_work, dequantize=fast_blas)
    if isinstance(new, FloatSplit):
        new.lay_out()
    return new


def swap(model: nn.Module) -> nn.Module:
    """On a CPU, each linear layer and embedding of `model` replaced in place by its CPU form, one
    at a time (a re-laid-out weight frees the old one before the next is copied); elsewhere the
    model as it is."""
    if mx.default_device() != mx.cpu:
        return model
    threads, fast = shared_threads(core_count()), blas.fast_blas()
    blocks = []  # split as wholes: their layers are not split again (parents come before children)

    def cpu_form(path: str, layer: nn.Module) -> nn.Module:
        if type(layer) is FeedForward and type(layer.proj_1) is nn.Linear and not fast:
            blocks.append(path + ".")
            return CPUFeedForward(layer.proj_1, layer.proj_2, threads, BLOCK_SPLIT_MIN_WORK)
        whole = any(path.startswith(block) for block in blocks)
        return cpu_layer(layer, threads, NEVER if whole else SPLIT_MIN_WORK, fast)

    return replace_layers(model, cpu_form)


def replace_layers(model: nn.Module, new_form) -> nn.Module:
    """Each submodule of `model` (parents before children) replaced in place by new_form(path,
    module) where that differs, one at a time (a re-laid-out weight frees the old one before the
    next is copied)."""
    paths = [path for path, m in model.named_modules() if path]  # paths only: no module kept alive here
    for path in paths:
        layer = module_at(model, path)
        new = new_form(path, layer)
        if new is not layer:
            model.update_modules(tree_unflatten([(path, new)]))
        del layer, new
    return model


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path such as 'transformer.layers.3.attn.qkv_proj'."""
    for key in path.split("."):
        model = model[int(key)] if isinstance(model, list) else model[key]
    return model
