"""What a user reads and what a script reads (docs/scripting.md): notices and --quiet, help for
every command and for the chat's own commands, sizes in units that fit, the reason verify gives
for a differing token, --json output, and `openelm models`. The messages that name a fix for a
wrong path or size are rows of the bad-input table (tests/bad_input_checkpoints.py, NOT_A_MODEL)."""

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_cli

from openelm_mlx.apps.chat import COMMANDS
from openelm_mlx.apps.cli import SUBCOMMANDS, build_parser, leaf_parsers, main
from openelm_mlx.apps.generate import DEMO_NOTICE
from openelm_mlx.cache import make_cache
from openelm_mlx.convert.verify import BackendReport, VerifyReport, compare, print_report
from openelm_mlx.generate import GenerationStats
from openelm_mlx.loader import DEMO_MODEL, load_model
from openelm_mlx.tokenizer import find_tokenizer
from openelm_mlx.units import count_text, size_text

# --- notices and --quiet ---------------------------------------------------------------------


def test_quiet_drops_the_notices_and_keeps_the_output():
    loud = run_cli("generate", "-p", "In the beginning", "--max-tokens", "6")
    quiet = run_cli("generate", "-p", "In the beginning", "--max-tokens", "6", "--quiet")
    assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
    assert loud.stderr.splitlines()[0] == f"openelm: {DEMO_NOTICE}"
    assert quiet.stdout == loud.stdout  # greedy: the same text
    assert not [line for line in quiet.stderr.splitlines() if line.startswith("openelm:")], quiet.stderr
    assert quiet.stderr.splitlines()[-1].startswith("prompt: ")  # the statistics are the output, not a notice


def test_quiet_keeps_warnings():
    result = run_cli("chat", "--quiet", "--max-tokens", "2", input="/quit\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "openelm: warning: this does not look like an Instruct model; chat replies may not follow"
    ]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_command_takes_quiet_and_has_a_description(command):
    _, parser = build_parser(command)
    for leaf in leaf_parsers(parser):  # eval: ppl and tasks, where the options go
        assert leaf.description, f"{leaf.prog} --help has no description"
        quiet = [a for a in leaf._actions if "--quiet" in a.option_strings]
        assert len(quiet) == 1 and quiet[0].option_strings == ["-q", "--quiet"], leaf.prog
        shown = leaf.format_help()
        for empty in ("(default: [])", "(default: None)", "(default: False)", "(default: ())"):
            assert empty not in shown, f"{leaf.prog} --help shows {empty}"


def test_chat_help_and_slash_help_list_the_chat_commands(tiny_checkpoint):
    helped = " ".join(run_cli("chat", "--help").stdout.split())  # argparse wraps the lines
    said = run_cli("chat", "--model", tiny_checkpoint, "--max-tokens", "2", input="/help\n/quit\n")
    assert said.returncode == 0, said.stderr
    for name, what in COMMANDS.items():
        assert f"{name} {what}" in helped
        assert f"{name} {what}" in said.stderr
    assert "Ctrl-C stops a reply, Ctrl-D leaves" in helped
    assert [r for r in said.stdout.split(">> ") if r.strip()] == []  # /help is no message to the model


def test_stop_shows_no_empty_default():
    shown = " ".join(run_cli("generate", "--help").stdout.split())
    assert "--stop STOP stop at this string (repeatable) --repetition-penalty" in shown


# --- units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 B"), (999, "999 B"), (1000, "1.00 KB"), (12_345, "12.3 KB"), (812_000, "812 KB"), (37.5e6, "37.5 MB")]
    + [(999_960_000, "1.00 GB"), (1.42e9, "1.42 GB"), (2.5e12, "2.50 TB")],
)
def test_size_text(n, text):
    assert size_text(n) == text


def test_released_parameter_counts_read_as_their_names():
    # /work/shared/reference/openelm.md, "The four released sizes"
    counts = [271_527_168, 457_179_136, 1_079_891_456, 3_036_647_424]
    assert [count_text(n) for n in counts] == ["272M", "457M", "1.08B", "3.04B"]


def test_convert_prints_the_size_in_a_unit_that_fits(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    result = run_cli("convert", tiny_checkpoint, "-o", out)
    assert result.returncode == 0, result.stderr
    size = (out / "model.safetensors").stat().st_size
    assert size < 10e6 and result.stdout.startswith(f"wrote {out}: {size_text(size)}, "), result.stdout
    assert re.match(r"\d+(\.\d+)? [KM]B$", size_text(size))  # where "GB" read 0.00x


def test_package_backend_reports_the_process_peak_rss(tiny_checkpoint, exported, cli_here):
    pytest.importorskip("coreai.runtime")
    bundle = exported("coreai", tiny_checkpoint, precision="float32")["output"]
    result = cli_here(
        "generate", "--model", bundle, "--backend", "coreai", "-p", "the sea", "--max-tokens", "3", "--json"
    )
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["stats"]
    assert stats["memory_source"] == "process"
    assert stats["peak_memory_bytes"] >= 50e6  # Python, MLX and the runtime: not "0.00 GB"
    assert result.stderr.splitlines()[-1].endswith(f"| process peak RSS: {size_text(stats['peak_memory_bytes'])}")


# --- verify: why a differing token passed ----------------------------------------------------


class SwappedRunner:
    """The MLX model itself as a package runner, with the top two logits of one decode step swapped:
    a greedy token that differs at a near tie."""

    def __init__(self, model, swap_at: int):
        self.model, self.swap_at, self.cache, self.calls = model, swap_at, make_cache(model), 0

    def _logits(self, ids):
        logits = np.array(self.model(mx.array([ids]), cache=self.cache)[0, -1].astype(mx.float32))
        if self.calls == self.swap_at:
            first, second = np.argsort(logits)[-1], np.argsort(logits)[-2]
            logits[[first, second]] = logits[[second, first]]
        self.calls += 1
        return logits

    def prefill(self, ids):
        return self._logits(ids)

    def decode(self, token):
        return self._logits([token])


def test_verify_says_why_a_differing_token_passed(tiny_checkpoint, capsys):
    model, _ = load_model(tiny_checkpoint, "float32")
    tokens = find_tokenizer(tiny_checkpoint).encode("the sea and the stars")
    # An independent run of the same model: the logits of decode 2, the step the runner swaps.
    cache, feed = make_cache(model), tokens
    for _ in range(3):
        logits = np.array(model(mx.array([feed]), cache=cache)[0, -1].astype(mx.float32))
        feed = [int(logits.argmax())]
    order = np.argsort(logits)
    top, second = int(order[-1]), int(order[-2])
    margin = float(logits[top]) - float(logits[second])

    rtol = 2 * margin / float(np.abs(logits).max())  # a tolerance the swap stays within
    backend = compare(SwappedRunner(model, swap_at=2), model, tokens, 4, "swapped", rtol)
    assert backend.ok and [s.package_token != s.reference_token for s in backend.steps] == [0, 0, 1, 0, 0]
    capsys.readouterr()
    assert print_report(VerifyReport("p", "none", "float32", [], 0.0, [backend], [])) == 0
    lines = capsys.readouterr().out.splitlines()
    step = backend.steps[2]
    assert step.max_abs_diff == pytest.approx(margin, rel=1e-5)
    assert lines[4] == f"      decode 2  max|Δ| {step.max_abs_diff:.4g}  token {second} (MLX {top})  <- differs"
    assert lines[5] == (
        f"                decode 2: {top} (MLX) vs {second} (package), a near tie: MLX's logits {logits[top]:.4g} vs "
        f"{logits[second]:.4g}, margin {margin:.3g} ≤ 2 × max|Δ| {2 * step.max_abs_diff:.3g} "
        f"(tolerance {backend.tolerance:.4g})"
    )
    assert lines[-1] == "OK"


def test_verify_json_keeps_the_exit_status(capsys):
    failed = BackendReport("coreai", 0.01, problem="decode 1: max |logits difference| 1 exceeds the tolerance 0.01")
    report = VerifyReport("p", "none", "float16", [], 0.0, [failed], ["coreml (macOS only)"])
    assert print_report(report, as_json=True) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["backends"][0]["ok"] is False and out["skipped"] == ["coreml (macOS only)"]
    assert out["backends"][0]["problem"] == failed.problem


# --- --json -----------------------------------------------------------------------------------


def summary_figures(line: str) -> dict:
    prompt, generated = re.match(r"prompt: (\d+) tokens.*generation: (\d+) tokens", line).groups()
    return {"prompt_tokens": int(prompt), "generation_tokens": int(generated)}


def test_generate_json_holds_the_text_tokens_and_stats(tiny_checkpoint):
    args = ("generate", "--model", tiny_checkpoint, "-p", "the sea and", "--max-tokens", "12")
    plain, scripted = run_cli(*args), run_cli(*args, "--json")
    assert plain.returncode == scripted.returncode == 0, plain.stderr + scripted.stderr
    out = json.loads(scripted.stdout)  # nothing else on stdout
    assert set(out) == {"text", "tokens", "stats"} and set(out["stats"]) == set(asdict(GenerationStats()))
    assert out["text"] + "\n" == plain.stdout
    tokenizer = find_tokenizer(tiny_checkpoint)
    assert tokenizer.decode(tokenizer.encode("the sea and") + out["tokens"]) == "the sea and" + out["text"]
    stats = out["stats"]
    assert len(out["tokens"]) == stats["generation_tokens"] - (stats["finish_reason"] == "eos")
    assert scripted.stderr.splitlines()[-1] == GenerationStats(**stats).summary()  # the same figures, as printed
    assert summary_figures(plain.stderr.splitlines()[-1]) == summary_figures(scripted.stderr.splitlines()[-1])


def test_eval_ppl_json_holds_the_printed_figures(tiny_checkpoint):
    args = ("eval", "ppl", "--model", tiny_checkpoint, "--max-tokens", "64")
    plain, scripted = run_cli(*args), run_cli(*args, "--json")
    assert plain.returncode == scripted.returncode == 0, plain.stderr + scripted.stderr
    r = json.loads(scripted.stdout)
    assert r["model"] == str(tiny_checkpoint) and r["text"] == str(DEMO_MODEL / "validation.txt")
    assert r["tokens"] == 64 and r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert plain.stdout.splitlines()[1:4] == [
        f"text: {r['text']}, {r['tokens']} tokens scored",
        f"perplexity: {r['perplexity']:.3f} (loss {r['loss']:.4f} nats/token)",
        f"unigram baseline (same tokenizer and tokens): {r['unigram']:.3f}",
    ]


def test_eval_tasks_json_is_results_json(cli_here, tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "out"
    result = cli_here("eval", "tasks", "--limit", "4", "--out", out, "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)  # the object alone: "wrote ..." goes to stderr
    assert printed == json.loads((out / "results.json").read_text())
    assert [r["items"] for r in printed["results"] if (r["task"], r["metric"]) == ("demo_cloze", "acc")] == [4]
    assert result.stderr.splitlines()[-1] == f"wrote {out}/results.json, results.csv, results.md, samples.jsonl"


def test_verify_coreml_json_is_the_printed_report(tiny_checkpoint, exported, capsys):
    pytest.importorskip("coremltools")
    package = exported("coreml", tiny_checkpoint)["output"]
    args = ("verify-coreml", package, "--model", tiny_checkpoint, "--steps", "3")
    with pytest.raises(SystemExit) as done:  # in this process: coremltools is imported once (~4 s)
        main([str(a) for a in args])
    plain, scripted = capsys.readouterr(), run_cli(*args, "--json")
    assert done.value.code == scripted.returncode == 0, plain.err + scripted.stderr
    r = json.loads(scripted.stdout)
    assert r["ok"] is True and r["package"] == str(package) and r["weight_problems"] == []
    mil = r["backends"][0]
    assert mil["backend"] == "mil-reference" and mil["agreement"] == 1.0 and len(mil["steps"]) == 4
    for s in mil["steps"]:
        row = f"  {s['name']:>12}  max|Δ| {s['max_abs_diff']:.4g}  token {s['package_token']} (MLX {s['reference_token']})"
        assert row in plain.out.splitlines()
    assert plain.out.splitlines()[-1] == "OK"


# --- openelm models ---------------------------------------------------------------------------


def fake_cache(hub: Path, repo: str, data: bytes):
    """A Hugging Face cache holding one file of `repo`, laid out as huggingface_hub writes it."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / "0a1b").write_bytes(data)
    (folder / "snapshots" / "c0ffee").mkdir(parents=True)
    (folder / "snapshots" / "c0ffee" / "config.json").symlink_to("../../blobs/0a1b")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("c0ffee")


def test_models_lists_the_released_sizes_and_the_demo_model(tmp_path):
    fake_cache(tmp_path / "hub", "apple/OpenELM-450M-Instruct", b"{}" * 700)
    result = run_cli("models", env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert result.returncode == 0 and result.stderr == "", result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["model", "size", "parameters", "context", "local", "copy"]
    by_name = {row[0]: row[1:] for row in rows[1:-1]}
    assert list(by_name) == [
        f"apple/OpenELM-{size}{kind}" for size in ("270M", "450M", "1_1B", "3B") for kind in ("", "-Instruct")
    ]
    assert by_name["apple/OpenELM-270M"] == ["270M", "272M", "2048"]
    assert by_name["apple/OpenELM-450M-Instruct"] == ["450M", "457M", "2048", "cached,", "1.40", "KB"]
    assert by_name["apple/OpenELM-1_1B"] == ["1.1B", "1.08B", "2048"]
    assert by_name["apple/OpenELM-3B-Instruct"] == ["3B", "3.04B", "2048"]
    demo = load_model(DEMO_MODEL)[0].config
    assert rows[-1] == ["demo", "model", "demo", count_text(demo.num_parameters()), "256", str(DEMO_MODEL)]
