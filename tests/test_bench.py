"""`openelm bench` on tiny checkpoints: the results schema, every derived figure recomputed from
the raw trials, failures recorded per configuration, Ctrl-C, outputs, and the CLI."""

import csv
import json
import statistics
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_config

from openelm_mlx.apps.cli import main as cli_main
from openelm_mlx.benchmarks import bench, machine, report, timing
from openelm_mlx.benchmarks.subjects import build_subject, mlx_lm_twin
from openelm_mlx.benchmarks.synthetic import random_weights, write_checkpoint
from openelm_mlx.config import OpenELMConfig
from openelm_mlx.errors import OpenELMError

P, G, TRIALS = 8, 4, 2
IMPL_METRICS = {
    "prefill_s",
    "prefill_tps",
    "ttft_s",
    "decode_s",
    "decode_tps",
    "itl_median_s",
    "itl_p90_s",
    "peak_memory_bytes",
    "inter_token_s",
}


def quantizable_config() -> OpenELMConfig:
    # every width a multiple of 64, so 4/8-bit quantization with group size 64 applies everywhere
    return OpenELMConfig.layerwise(4, 128, 16, vocab_size=384, ffn_dim_divisor=64, max_context_length=256)


@pytest.fixture(scope="module")
def quantizable_checkpoint(tmp_path_factory):
    config = quantizable_config()
    return write_checkpoint(tmp_path_factory.mktemp("q") / "tiny64", config, random_weights(config))


@pytest.fixture(scope="module")
def results(tiny_checkpoint, quantizable_checkpoint):
    """One run compared with mlx-lm: the tiny model in fp32 and q8 (q8 fails: an ffn width of 224
    is not a multiple of the group size 64), the quantizable model in fp32 and q8, and a folder
    that does not exist; each model also gets mlx-lm's default fp16."""
    return bench.run_benchmark(
        models=[str(tiny_checkpoint), str(quantizable_checkpoint), "/no/such/model"],
        precisions=["fp32", "q8"],
        prompt_tokens=P,
        generation_tokens=G,
        trials=TRIALS,
        warmup=1,
        compare="mlx-lm",
        progress=False,
    )


def configs(results, model=None, precision=None):
    return [
        c
        for c in results["configurations"]
        if (model is None or c["model"] == model) and (precision is None or c["precision"] == precision)
    ]


# --- pure arithmetic ---------------------------------------------------------------------------


def test_percentile_and_spread_match_numpy():
    values = [0.3, 0.1, 0.7, 0.2, 0.5, 0.9, 0.4]
    for q in (0, 50, 90, 100):
        assert timing.percentile(values, q) == pytest.approx(np.percentile(values, q))
    s = timing.spread([1.0, 2.0, 4.0])
    assert s == {
        "median": 2.0,
        "mean": pytest.approx(7 / 3),
        "stdev": pytest.approx(np.std([1, 2, 4], ddof=1)),
        "min": 1.0,
        "max": 4.0,
        "n": 3,
    }
    assert timing.spread([5.0])["stdev"] == 0.0


def test_trial_metrics_arithmetic():
    t = timing.trial_metrics(128, prefill_s=0.5, ttft_s=0.52, inter_token_s=[0.1, 0.2, 0.1, 0.4], peak_memory_bytes=7)
    assert t["prefill_tps"] == 256
    assert t["decode_s"] == pytest.approx(0.8)
    assert t["decode_tps"] == pytest.approx(4 / 0.8)
    assert t["itl_median_s"] == pytest.approx(0.15)
    assert t["itl_p90_s"] == pytest.approx(np.percentile([0.1, 0.2, 0.1, 0.4], 90))


def test_roofline_and_bytes_per_token():
    # 270M-sized example from performance.md: 0.17 GB at 400 GB/s bounds decode near 2,353 tok/s
    assert timing.roofline(2353, 0.17e9, 400) == pytest.approx(2353 / (400e9 / 0.17e9))
    assert timing.roofline(400e9 / 0.17e9, 0.17e9, 400) == pytest.approx(1.0)
    config = tiny_config()
    kv = timing.kv_bytes_per_position(config, mx.float32)
    assert kv == 2 * sum(config.num_kv_heads) * config.head_dim * 4
    # decode step j (1..g) attends to p + j positions: the mean is p + (g + 1) / 2
    assert timing.decode_bytes_per_token(1000, kv, 8, 4) == pytest.approx(
        1000 + statistics.mean(kv * (8 + j) for j in range(1, 5))
    )


def test_paired_ratios_are_per_trial():
    ours = [{"prefill_tps": 10, "decode_tps": 2}, {"prefill_tps": 30, "decode_tps": 4}]
    theirs = [{"prefill_tps": 5, "decode_tps": 4}, {"prefill_tps": 60, "decode_tps": 4}]
    r = timing.paired_ratios(ours, theirs)
    assert r["prefill_tps_ratio"]["median"] == pytest.approx(1.25)  # median of 2.0 and 0.5
    assert (r["decode_tps_ratio"]["min"], r["decode_tps_ratio"]["max"]) == (0.5, 1.0)


def test_weight_bytes_of_quantized_model_and_shared_twin():
    config = quantizable_config()
    weights = {k: mx.array(v) for k, v in random_weights(config).items()}
    model = build_subject(config, lambda: dict(weights), "q8")
    # 8-bit: one byte per weight, plus a float32 scale and bias per group of 64; norms stay float32
    matrices = [v.size for k, v in weights.items() if not k.endswith("norm.weight")]
    norms = [v.size for k, v in weights.items() if k.endswith("norm.weight")]
    assert timing.weight_bytes(model) == sum(n + 2 * 4 * n // 64 for n in matrices) + 4 * sum(norms)
    twin = mlx_lm_twin(model)
    tokens = mx.array([[1, 5, 9, 200]])
    assert mx.array_equal(model(tokens), twin(tokens)).item()  # the same arrays, the same logits
    assert timing.weight_bytes(twin) == timing.weight_bytes(model)


def test_apple_bandwidth_table():
    assert machine.apple_bandwidth("Apple M2 Max") == (400, "Apple's specification (M2 Max)")
    assert machine.apple_bandwidth("Apple M4 Pro")[0] == 273
    assert machine.apple_bandwidth("Apple M1")[0] == 68
    assert machine.apple_bandwidth("AMD EPYC") is None
    assert machine.apple_bandwidth("Apple M9 Max") is None


# --- a whole run -------------------------------------------------------------------------------


def test_results_schema(results):
    assert results["schema"] == bench.SCHEMA
    assert results["interrupted"] is False
    assert results["settings"] == {
        "models": results["settings"]["models"],
        "precisions": ["fp32", "q8"],
        "prompt_tokens": P,
        "generation_tokens": G,
        "trials": TRIALS,
        "warmup": 1,
        "compare": "mlx-lm",
        "backend": "mlx",
        "seed": 0,
        "group_size": 64,
        "speculation": None,
    }
    env = results["environment"]
    for key in (
        "chip",
        "cpu_count",
        "memory_bytes",
        "os",
        "mlx",
        "mlx_lm",
        "device",
        "blas",
        "memory_bandwidth_gbs",
        "memory_bandwidth_source",
    ):
        assert env[key] is not None, key
    assert env["memory_bandwidth_gbs"] > 0 and env["mlx"] == mx.__version__
    # 3 models x (fp32, q8, mlx-lm's default fp16) configurations
    assert [(c["model"], c["precision"]) for c in results["configurations"]] == [
        (m, p) for m in ("OpenELM-tiny", "tiny64", "model") for p in ("fp32", "q8", "fp16")
    ]
    json.dumps(results)  # plain JSON all the way down


def test_every_derived_figure_recomputes(results):
    bandwidth = results["environment"]["memory_bandwidth_gbs"]
    done = [c for c in results["configurations"] if not c["error"]]
    assert len(done) == 5  # tiny fp32 and fp16 (mlx-lm's default), tiny64 fp32, q8 and fp16
    for c in done:
        for r in c["implementations"].values():
            assert len(r["trials"]) == TRIALS
            for t in r["trials"]:
                assert set(t) == IMPL_METRICS and len(t["inter_token_s"]) == G
                assert t["prefill_tps"] == pytest.approx(P / t["prefill_s"])
                assert t["decode_tps"] == pytest.approx(G / sum(t["inter_token_s"]))
                assert t["itl_median_s"] == pytest.approx(np.median(t["inter_token_s"]))
                assert t["itl_p90_s"] == pytest.approx(np.percentile(t["inter_token_s"], 90))
                assert t["ttft_s"] >= t["prefill_s"] > 0
                assert t["peak_memory_bytes"] >= c["weight_bytes"]
            for metric, s in r["summary"].items():
                values = [t[metric] for t in r["trials"]]
                assert s["median"] == pytest.approx(np.median(values))
                assert s["stdev"] == pytest.approx(np.std(values, ddof=1))
            decode = r["summary"]["decode_tps"]["median"]
            assert r["roofline"] == pytest.approx(decode * c["decode_bytes_per_token"] / (bandwidth * 1e9))
            assert r["achieved_gbs"] == pytest.approx(decode * c["decode_bytes_per_token"] / 1e9)
        if "ratios" in c:
            ours, theirs = (c["implementations"][n]["trials"] for n in ("openelm_mlx", "mlx_lm"))
            for metric in ("prefill_tps", "decode_tps"):
                expected = np.median([a[metric] / b[metric] for a, b in zip(ours, theirs)])
                assert c["ratios"][f"{metric}_ratio"]["median"] == pytest.approx(expected)


def test_figures_of_a_float_configuration(results):
    c = configs(results, "OpenELM-tiny", "fp32")[0]
    config = tiny_config()
    assert set(c["implementations"]) == {"openelm_mlx", "mlx_lm"}
    assert c["parameters"] == config.num_parameters()
    assert c["weight_bytes"] == 4 * config.num_parameters()
    assert c["kv_bytes_per_position"] == 2 * sum(config.num_kv_heads) * config.head_dim * 4
    assert c["activation_dtype"] == "float32"
    default = configs(results, "OpenELM-tiny", "fp16")[0]
    assert default["role"] == "mlx-lm default conversion" and set(default["implementations"]) == {"mlx_lm"}
    assert default["weight_bytes"] == 2 * config.num_parameters()


def test_failed_configurations_are_reported_not_fatal(results):
    assert "divisible by the quantization group size 64" in configs(results, "OpenELM-tiny", "q8")[0]["error"]
    missing = configs(results, "model")
    assert len(missing) == 3 and all("no model folder at '/no/such/model'" in c["error"] for c in missing)
    q8 = configs(results, "tiny64", "q8")[0]
    assert q8["error"] is None and q8["activation_dtype"] == "float32"  # CPU: float32 activations
    assert q8["weight_bytes"] < configs(results, "tiny64", "fp32")[0]["weight_bytes"] / 3
    text = report.markdown(results)
    assert "- OpenELM-tiny q8: ValueError" in text and "- model fp32: no model folder" in text


def test_best_setting_against_mlx_lm_default(results):
    best = {b["model"]: b for b in results["best_vs_mlx_lm_default"]}
    assert set(best) == {"OpenELM-tiny", "tiny64"}
    b = best["tiny64"]
    candidates = [c for c in configs(results, "tiny64") if "openelm_mlx" in c["implementations"]]
    fastest = max(candidates, key=lambda c: c["implementations"]["openelm_mlx"]["summary"]["decode_tps"]["median"])
    ref = configs(results, "tiny64", "fp16")[0]["implementations"]["mlx_lm"]["summary"]
    assert b["openelm_mlx_precision"] == fastest["precision"]
    assert b["decode_tps_ratio"] == pytest.approx(
        fastest["implementations"]["openelm_mlx"]["summary"]["decode_tps"]["median"] / ref["decode_tps"]["median"]
    )


def test_outputs_json_csv_markdown_chart(results, tmp_path):
    written = report.write_results(results, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == ["chart.png", "results.csv", "results.json", "results.md"]
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
    assert (tmp_path / "out" / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    # one row per timed implementation, one per failed configuration
    assert len(rows) == 2 + 1 + 1 + 2 + 2 + 1 + 3
    ours = next(
        r for r in rows if r["model"] == "tiny64" and r["precision"] == "q8" and r["implementation"] == "openelm_mlx"
    )
    c = configs(results, "tiny64", "q8")[0]
    assert float(ours["decode_tps_ratio"]) == pytest.approx(c["ratios"]["decode_tps_ratio"]["median"])
    assert float(ours["decode_tps_median"]) == pytest.approx(
        c["implementations"]["openelm_mlx"]["summary"]["decode_tps"]["median"]
    )
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| tiny64 | q8 (float32 activations) | openelm-mlx |" in text
    assert "| tiny64 | q8 |" in text  # the ratio table
    with pytest.raises(OpenELMError, match="--force"):
        report.write_results(results, tmp_path / "out")


def test_ctrl_c_keeps_what_was_gathered(tiny_checkpoint, monkeypatch):
    real, calls = timing.time_generation, []

    def interrupt_on_fifth(*args):
        calls.append(1)
        if len(calls) == 5:  # warm-up + 2 trials of the first configuration, then the next one
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(timing, "time_generation", interrupt_on_fifth)
    r = bench.run_benchmark(
        [str(tiny_checkpoint)],
        ["fp32", "bf16"],
        prompt_tokens=P,
        generation_tokens=G,
        trials=2,
        warmup=1,
        progress=False,
    )
    assert r["interrupted"] is True
    first, second = r["configurations"]
    assert first["error"] is None and len(first["implementations"]["openelm_mlx"]["trials"]) == 2
    assert second["error"] == "interrupted" and second["implementations"]["openelm_mlx"]["trials"] == []
    assert "**Interrupted**" in report.markdown(r)


def test_cli_writes_outputs_and_refuses_to_overwrite(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = [
        "bench",
        "--models",
        str(tiny_checkpoint),
        "--precisions",
        "fp32",
        "-p",
        "4",
        "-g",
        "2",
        "--trials",
        "1",
        "--warmup",
        "0",
        "--out",
        str(out),
    ]
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 0
    stdout = capsys.readouterr().out
    assert "| OpenELM-tiny | fp32 (float32 activations) | openelm-mlx |" in stdout
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["prompt_tokens"] == 4 and len(saved["configurations"]) == 1
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 1
    assert "results.json already exists: choose another output or pass --force" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--precisions", "fp8"], "unknown precision"),
        (["--trials", "0"], "--trials must be an integer from 1 to"),
        (["-p", "4000"], "exceeds the model's context"),
    ],
)
def test_cli_bad_settings(tiny_checkpoint, tmp_path, capsys, args, message):
    argv = [
        "bench",
        "--models",
        str(tiny_checkpoint),
        "--out",
        str(tmp_path / "o"),
        "--warmup",
        "0",
        "--trials",
        "1",
    ] + args
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    captured = capsys.readouterr()
    assert e.value.code == 1 and message in captured.out + captured.err


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs on macOS")
def test_coreml_backend_needs_macos(tmp_path):
    with pytest.raises(OpenELMError, match="only on macOS"):
        bench.run_benchmark([str(tmp_path / "x.mlpackage")], backend="coreml", progress=False)


def test_quantized_checkpoint_runs_at_its_own_precision(quantizable_checkpoint, tmp_path):
    from openelm_mlx.convert.hf_to_mlx import convert

    folder = convert(quantizable_checkpoint, tmp_path / "tiny64-4bit", bits=4)
    r = bench.run_benchmark(
        [str(folder)],
        ["q4", "fp32"],
        prompt_tokens=P,
        generation_tokens=G,
        trials=1,
        warmup=0,
        compare="mlx-lm",
        progress=False,
    )
    q4, fp32, fp16 = r["configurations"]
    assert q4["error"] is None and set(q4["implementations"]) == {"openelm_mlx", "mlx_lm"}
    config = quantizable_config()
    # 4-bit: half a byte per weight plus a float32 scale and bias per 64 (the packed checkpoint as read)
    matrices = (
        config.num_parameters()
        - config.model_dim * (2 * config.num_transformer_layers + 1)
        - 2 * config.head_dim * config.num_transformer_layers
    )
    assert q4["weight_bytes"] == matrices // 2 + 8 * matrices // 64 + 4 * (config.num_parameters() - matrices)
    assert "holds 4-bit weights: benchmark it as q4" in fp32["error"]
    assert "holds 4-bit weights" in fp16["error"]  # mlx-lm's 16-bit conversion needs float weights


def test_coreml_trial_feeds_greedy_tokens_back():
    from openelm_mlx.benchmarks.package_bench import time_package

    class Runner:  # the interface of convert.package_runner.PackageRunner
        calls = []

        def reset(self):
            self.calls.append("reset")

        def prefill(self, tokens):
            self.calls.append(("prefill", len(tokens)))
            return np.eye(10)[3]

        def decode(self, token):
            self.calls.append(("decode", token))
            return np.eye(10)[(token + 1) % 10]

    runner = Runner()
    t = time_package(runner, [1, 2, 3, 4], 3)
    assert runner.calls == ["reset", ("prefill", 4), ("decode", 3), ("decode", 4), ("decode", 5)]
    assert t["prefill_tps"] == pytest.approx(4 / t["prefill_s"]) and len(t["inter_token_s"]) == 3
