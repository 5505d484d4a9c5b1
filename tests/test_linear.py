"""CPU layers (cpu_layers.py): the dequantize-then-BLAS path is taken only where the BLAS makes it
pay off, and every path (split across threads, column-major) gives what MLX's own layers give."""

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from openelm_mlx import OpenELMConfig, blas, cpu_layers

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def cpu(layer, fast: bool = False, threads: int = 1, split_min_work: int = 0):
    """`layer` swapped for its CPU layer as swap() builds it (a fast BLAS or not, some threads)."""
    return cpu_layers.cpu_layer(layer, cpu_layers.shared_threads(threads), split_min_work, fast)


def as_linear(layer, x):
    return layer.as_linear(x) if hasattr(layer, "as_linear") else layer(x)


@pytest.fixture
def set_blas(monkeypatch):
    """Set the policy's verdict for one test (and restore the process's own afterwards)."""
    return lambda fast: monkeypatch.setattr(blas, "fast_blas", lambda: fast)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_both_paths_agree(monkeypatch, bits, kind):
    mx.random.seed(0)
    layer = nn.Linear(128, 96, bias=False) if kind == "linear" else nn.Embedding(96, 128)
    layer = layer.to_quantized(group_size=64, bits=bits)
    x = mx.random.normal((1, cpu_layers.DEQUANTIZE_MIN_TOKENS * 2, 128))
    calls = []
    dequantize = mx.dequantize
    monkeypatch.setattr(mx, "dequantize", lambda *a, **k: calls.append(1) or dequantize(*a, **k))
    out = {}
    for fast in (True, False):
        with mx.stream(mx.cpu):
            out[fast] = as_linear(cpu(layer, fast), x)
    assert calls == [1]  # the fast BLAS dequantized, the slow one kept the quantized kernel
    assert mx.abs(out[True] - out[False]).max().item() < 1e-4


def test_few_tokens_keep_the_quantized_kernel(monkeypatch):
    monkeypatch.setattr(mx, "dequantize", lambda *a, **k: pytest.fail("dequantized a single token"))
    layer = nn.Linear(128, 64, bias=False).to_quantized(group_size=64, bits=4)
    cpu(layer, fast=True)(mx.zeros((1, 1, 128)))


@pytest.mark.parametrize(
    "library, fast",
    [
        (OPENBLAS, True),
        ("/opt/intel/oneapi/mkl/lib/libmkl_rt.so.2", True),
        ("Accelerate", True),
        ("/venv/lib/python3.11/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0", False),  # reference
        ("/usr/lib/x86_64-linux-gnu/blas/libblas.so.3", False),  # Debian's reference BLAS
        ("", False),  # not found: keep mlx-lm's path
    ],
)
def test_policy_by_library(library, fast):
    assert blas.is_fast(library) is fast


@pytest.mark.skipif(sys.platform != "linux", reason="the dynamic linker's lookup is Linux's")
def test_the_library_mlx_calls_is_found():
    """Default install: the mlx[cpu] wheel's bundled BLAS; with OpenBLAS preloaded: OpenBLAS."""
    code = "from openelm_mlx import blas; print(blas.sgemm_library())"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    if "mlx_cpu.libs" not in found:
        pytest.skip(f"not the mlx[cpu] wheel: {found}")
    assert Path(found).name.startswith("libblas")
    if not os.path.exists(OPENBLAS):
        pytest.skip("OpenBLAS not installed (apt-get install libopenblas0-pthread)")
    env = {**os.environ, "LD_PRELOAD": OPENBLAS}
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert found.stdout.strip() == os.path.realpath(OPENBLAS)


@pytest.fixture
def threads(monkeypatch):
    """Set how many CPU threads the layers swap() builds split a matmul across, with no minimum size."""

    def use(n):
        monkeypatch.setattr(cpu_layers, "core_count", lambda: n)
        monkeypatch.setattr(cpu_layers, "SPLIT_MIN_WORK", 0)
        monkeypatch.setattr(cpu_layers, "BLOCK_SPLIT_MIN_WORK", 0)

    return use


@pytest.mark.parametrize("fast, same", [(False, True), (True, False)])
def test_on_one_thread_without_a_fast_blas_the_graph_is_mlx_lms(set_blas, threads, tmp_path, fast, same):
    """Where neither dequantizing nor splitting pays off, a quantized prefill runs mlx-lm's graph
    op for op (its products are mlx-lm's QuantizedMatmul)."""
    import re
    from collections import Counter

    from mlx_lm.models.cache import make_prompt_cache

    from openelm_mlx.benchmarks.subjects import build_subject, mlx_lm_twin
    from openelm_mlx.benchmarks.synthetic import random_weights
    from openelm_mlx.benchmarks.timing import prefill_logits

    set_blas(fast)
    threads(1)
    # every width a multiple of the group size 64, so that every layer quantizes
    config = OpenELMConfig.layerwise(2, 128, 16, vocab_size=384, ffn_dim_divisor=64, max_context_length=256)
    ours = build_subject(config, lambda: random_weights(config, seed=1), "q4")
    prompt = mx.array([list(range(3, 3 + 2 * cpu_layers.DEQUANTIZE_MIN_TOKENS))])
    ops = []
    for subject in (ours, mlx_lm_twin(ours)):
        dot = tmp_path / "graph.dot"
        with mx.stream(mx.cpu):
            mx.export_to_dot(str(dot), prefill_logits(subject, prompt, make_prompt_cache(subject)))
        # the model's own compiled swiglu kernel is named differently from mlx-lm's: not a CPU layer's
        ops.append(Counter(op for op in re.findall(r'label ="(\w+)"', dot.read_text()) if "Compiled" not in op))
    assert ops[0]["QuantizedMatmul"] > 0 or fast
    assert (ops[0] == ops[1]) is same


@pytest.mark.parametrize("precision", ["fp32", "q8", "q4"])
@pytest.mark.parametrize("n_threads", [2, 3])
def test_split_across_threads_gives_mlx_lms_logits_bit_for_bit(set_blas, threads, monkeypatch, precision, n_threads):
    """Column-major weights, rows and output features split across CPU threads (float
    feed-forward blocks split whole by rows, their layers not again): the same numbers as mlx-lm's
    OpenELM over the same values, to the last bit, prefill and decoding."""
    from mlx_lm.models.cache import make_prompt_cache

    from openelm_mlx.benchmarks.subjects import build_subject, mlx_lm_twin
    from openelm_mlx.benchmarks.synthetic import random_weights

    set_blas(False)
    threads(n_threads)
    splits, cuts = [], cpu_layers.cuts
    monkeypatch.setattr(cpu_layers, "cuts", lambda a, streams: splits.append(len(streams)) or cuts(a, streams))
    config = OpenELMConfig.layerwise(2, 128, 16, vocab_size=384, ffn_dim_divisor=64, max_context_length=256)
    with mx.stream(mx.cpu):
        ours = build_subject(config, lambda: random_weights(config, seed=2), precision)
        twin = mlx_lm_twin(ours)
        if precision == "fp32":  # laid out differently: ours column-major, mlx-lm's row-major
            ffn = ours.transformer.layers[0].ffn
            assert isinstance(ffn, cpu_layers.CPUFeedForward) and ffn.proj_1.split_min_work == cpu_layers.NEVER
            assert memoryview(ours.transformer.layers[0].ffn.proj_1.weight).f_contiguous
            assert memoryview(twin.transformer.layers[0].ffn.proj_1.weight).c_contiguous
        caches = [make_prompt_cache(m) for m in (ours, twin)]
        for tokens in ([list(range(5, 24))], [[7]], [[9, 11, 13]]):  # prefill, one step, a drafted block
            logits = [m(mx.array(tokens), cache=c) for m, c in zip((ours, twin), caches)]
            assert mx.array_equal(logits[0], logits[1]).item(), tokens
    assert splits and set(splits) == {n_threads}


def test_column_major_weights_are_written_as_they_read(tmp_path):
    """A file written from a column-major model holds the same values, as any reader expects."""
    from mlx.utils import tree_flatten

    layer = nn.Linear(96, 64, bias=False)
    before = mx.array(layer.weight)
    with mx.stream(mx.cpu):
        layer = cpu(layer)
    assert memoryview(layer.weight).f_contiguous
    mx.save_safetensors(str(tmp_path / "w.safetensors"), dict(tree_flatten(layer.parameters())))
    assert np.array_equal(np.array(mx.load(str(tmp_path / "w.safetensors"))["weight"]), np.array(before))


def test_another_thread_gets_its_own_streams():
    """MLX streams serve only the thread that made them: a CPU layer called from a worker thread (a
    server's handler) after the main thread, and the main thread after it, give the same numbers."""
    import threading

    layer = nn.Linear(256, 512, bias=False).to_quantized(group_size=64, bits=4)
    x = mx.random.normal((1, 3, 256))
    mx.eval(layer.parameters(), x)
    expected = np.array(layer(x))
    split = cpu(layer, threads=2)  # split on any size
    outputs = [np.array(split(x))]
    worker = threading.Thread(target=lambda: outputs.append(np.array(split(x))))
    worker.start()
    worker.join()
    outputs.append(np.array(split(x)))
    assert len(outputs) == 3 and all(np.array_equal(out, expected) for out in outputs)


@pytest.mark.parametrize("precision", ["fp32", "q4"])
def test_fewer_outputs_or_rows_than_threads(precision):
    """A product narrower than the thread count splits into as many parts as it has rows (MLX's
    quantized kernel kills the process on an empty part)."""
    layer = nn.Linear(64, 2, bias=False)
    if precision == "q4":
        layer = layer.to_quantized(group_size=64, bits=4)
    x = mx.random.normal((1, 3, 64))
    with mx.stream(mx.cpu):
        assert mx.array_equal(cpu(layer, threads=4)(x), layer(x)).item()
    assert cpu_layers.cuts(mx.zeros((2, 8)), [None] * 4) == [(0, 1), (1, 2)]


def test_column_major_needs_one_matrix_more_memory(set_blas):
    """Rewriting the layout costs the model plus one matrix at a time, not a second model."""
    set_blas(False)
    layers = nn.Sequential(*[nn.Linear(512, 512, bias=False) for _ in range(6)])
    mx.eval(layers.parameters())
    matrix = 512 * 512 * 4
    mx.synchronize()
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    with mx.stream(mx.cpu):
        cpu_layers.swap(layers)
        mx.eval(layers.parameters())
    assert mx.get_peak_memory() - start <= 1.5 * matrix
    assert all(memoryview(layer.weight).f_contiguous for layer in layers.layers)


def test_a_benchmark_subject_peaks_at_the_model_plus_one_matrix(set_blas):
    """The bench drops its float source before the layout is rewritten: its copies never hold
    a second model (they did when the source was still held: 2x the model for 270M)."""
    from mlx.utils import tree_flatten

    from openelm_mlx.benchmarks.subjects import build_subject
    from openelm_mlx.benchmarks.synthetic import random_weights

    set_blas(False)
    config = OpenELMConfig.layerwise(6, 256, 32, vocab_size=384, ffn_dim_divisor=64, max_context_length=256)
    mx.synchronize()
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    with mx.stream(mx.cpu):
        subject = build_subject(config, lambda: random_weights(config, seed=3), "fp32")
    sizes = [v.nbytes for _, v in tree_flatten(subject.parameters())]
    assert memoryview(subject.transformer.token_embeddings.weight).f_contiguous
    assert max(sizes) < sum(sizes) / 4  # a second model would not fit under the bound
    assert mx.get_peak_memory() - start <= sum(sizes) + 1.5 * max(sizes)
