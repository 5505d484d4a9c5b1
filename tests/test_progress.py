"""Progress as a person sees it: on a terminal every long job's bar moves (per trial and inside a
trial, per step and inside a step, per batch and per layer, per verify step), a long job first says
what it will do and about how long it will take; on a pipe nothing of it is printed. Stopping in the
middle of work is in test_faults.py (STOP_ROWS)."""

import io
import re

import pytest
from conftest import run_cli
from terminal import Terminal
from tqdm import tqdm

from openelm_mlx.benchmarks import bench
from openelm_mlx.benchmarks.synthetic import TEXT
from openelm_mlx.progress import LONG_S, announce, duration

# tqdm draws at most every 0.1 s by default: every update is drawn here, so that counting the
# bar's states counts the job's steps on any machine, however fast
EVERY_UPDATE = {"TQDM_MININTERVAL": "0"}
BENCH = ("bench", "-p", "16", "-g", "8", "--trials", "3", "--warmup", "1", "--precisions", "fp32", "--out", "out")
TRAIN = ("train", "run", "--text", "text.txt", "--steps", "3", "--layers", "2", "--model-dim", "64")
TRAIN_SIZES = ("--head-dim", "16", "--vocab-size", "320", "--context", "16", "--batch-size", "3")


def test_announce_says_the_plan_and_how_long_only_for_a_long_job(capsys):
    bar = tqdm(total=18, file=io.StringIO(), disable=False)  # as on a terminal
    announce(bar, "bench: 3 configurations x 6 trials (1 warm-up)", 31.0, 18, "trial")
    announce(bar, "a short one", (LONG_S - 1) / 18, 18, "trial")
    bar.close()
    said = capsys.readouterr().err.splitlines()
    assert said == ["bench: 3 configurations x 6 trials (1 warm-up); about 9 min on this machine (first trial 31 s)"]
    assert [duration(s) for s in (40, 540, 5.5 * 3600)] == ["40 s", "9 min", "5.5 h"]


def states(terminal: Terminal, pattern: str) -> list:
    """The distinct screens that match `pattern`, in order."""
    return list(dict.fromkeys(s for s in terminal.screens() if re.search(pattern, s)))


def test_bench_bar_moves_per_trial_and_inside_a_trial_on_a_terminal_only(tiny_checkpoint, tmp_path):
    run = Terminal((*BENCH, "--models", tiny_checkpoint), tmp_path, EVERY_UPDATE)
    assert run.finish() == 0, run.text
    counts = {int(n) for n in re.findall(r"(\d)/4 \[", run.text)}
    assert counts == {0, 1, 2, 3, 4}, run.text  # the warm-up and each of the 3 timed trials
    # where each trial is: a prefill layer or a decode token (drawn at most every 0.5 s, and at each trial's end)
    assert len(states(run, r"(warm-up|trial [123]/3): (prefill layer \d/4|decode \d/[48])")) >= 4, run.text
    assert states(run, r"checking the logits: layer \d/4"), run.text
    piped = run_cli(*BENCH, "--models", tiny_checkpoint, "--force", cwd=tmp_path)
    assert piped.returncode == 0 and "\r" not in piped.stderr and "trial" not in piped.stderr, piped.stderr


def test_bench_defaults_fit_the_device(tiny_checkpoint):
    """A bare `openelm bench` on this CPU: pp64/tg16, 3 trials (a few minutes for 270M here), the
    GPU's stay llama-bench's pp512/tg128; the help says both."""
    r = bench.run_benchmark([str(tiny_checkpoint)], ["fp32"], progress=False)
    s = r["settings"]
    assert (s["prompt_tokens"], s["generation_tokens"], s["trials"]) == (64, 16, 3)
    assert len(r["configurations"][0]["implementations"]["openelm_mlx"]["trials"]) == 3
    assert bench.GPU_DEFAULTS == {"prompt_tokens": 512, "generation_tokens": 128, "trials": 5}
    help_text = " ".join(run_cli("bench", "--help").stdout.split())
    for fragment in ("prompt length (default: 512 on a GPU, 64 on a CPU)", "(default: 5 on a GPU, 3 on a CPU)"):
        assert fragment in help_text


def test_train_bar_moves_per_step_and_inside_a_step(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT * 4)
    run = Terminal((*TRAIN, *TRAIN_SIZES), tmp_path, EVERY_UPDATE)
    assert run.finish() == 0, run.text
    assert {int(n) for n in re.findall(r"(\d)/3 \[", run.text)} == {0, 1, 2, 3}, run.text
    assert states(run, r"window [123]/3"), run.text  # a CPU evaluates a step window by window


def test_eval_ppl_bar_moves_per_layer(tiny_checkpoint, tmp_path):
    (tmp_path / "text.txt").write_text(TEXT * 8)
    argv = ("eval", "ppl", "--model", tiny_checkpoint, "--text", "text.txt", "--context", "32", "--batch-size", "2")
    run = Terminal(argv, tmp_path, EVERY_UPDATE)
    assert run.finish() == 0, run.text
    assert len(states(run, r"eval ppl.*layer [1-4]/4")) >= 3, run.text
    piped = run_cli(*argv, cwd=tmp_path)
    assert piped.returncode == 0 and "\r" not in piped.stderr and "layer" not in piped.stderr, piped.stderr


@pytest.mark.parametrize("precision", ["float32"])
def test_verify_bar_moves_per_step(exported, tiny_checkpoint, tmp_path, precision):
    bundle = exported("coreai", tiny_checkpoint, precision=precision)["output"]
    run = Terminal(("verify-coreai", bundle, "--model", tiny_checkpoint, "--steps", "4"), tmp_path, EVERY_UPDATE)
    assert run.finish() == 0, run.text
    assert {int(n) for n in re.findall(r"verify coreai: .*?(\d)/5 \[", run.text)} >= {1, 2, 3, 4, 5}, run.text
    assert "verify: weights" in run.text.split("verify coreai")[0]  # the read-back first, on its own bar
    assert "computes in float16" not in run.text  # a float32 bundle runs at its speed: no note


def test_export_bar_shows_the_float16_calibration_per_layer(tiny_checkpoint, tmp_path):
    run = Terminal(("export-coreai", tiny_checkpoint, "-o", "bundle", "--context", "32"), tmp_path, EVERY_UPDATE)
    assert run.finish() == 0, run.text
    assert states(run, r"export-coreai: .*calibrate: window \d+/\d+, layer [1-4]/4"), run.text
    assert re.search(r"3/3 \[", run.text), run.text  # the three stages
