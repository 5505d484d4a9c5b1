"""Faults, table-driven: signals, kill -9 then a rerun, two runs at once, something appearing at
the output during a run, read-only and full filesystems, and a stdout that is full, closed or
has no reader. One runner per kind of fault holds every row to the promise of
tests/test_bad_input.py: the exit status, what stderr says (one line, no traceback), nothing left
beside the output, and every file present before the run byte-identical after it.

Runs are stopped at a known point without timing and without hooks in the toolkit: a
sitecustomize.py on the child's PYTHONPATH (test code only) makes outputs._place_all, the moment
a finished temporary output is about to be put in place, first read a FIFO the test holds. When
the test's open() of the FIFO returns, the run is waiting there, its temporary output complete.
"""

import errno
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Tuple

import pytest
from bad_input import TRAIN, root_file, tree
from conftest import assert_clean_error, run_cli

from openelm_mlx.benchmarks.synthetic import TEXT
from openelm_mlx.outputs import PARTIAL

GATE_HOOK = """
import os

if os.environ.get("OPENELM_TEST_GATE"):
    from openelm_mlx import outputs

    place_all = outputs._place_all

    def gated(*args, **kwargs):
        with open(os.environ["OPENELM_TEST_GATE"], "rb") as gate:
            gate.read()  # until the test closes its end
        return place_all(*args, **kwargs)

    outputs._place_all = gated
"""

CONVERT = ("convert", "{model}", "-o", "out")
BENCH = ("bench", "--models", "{model}", "--out", "out", "-p", "4", "-g", "2", "--trials", "1", "--warmup", "0")
BENCH_FP32 = (*BENCH, "--precisions", "fp32")
TRAIN_TINY = (
    *TRAIN,
    "--text",
    "text.txt",
    "--layers",
    "2",
    "--model-dim",
    "64",
    "--head-dim",
    "16",
    "--vocab-size",
    "320",
    "--context",
    "16",
    "--batch-size",
    "2",
)
TRAIN_TO = tuple("run" if arg == "{out}" else arg for arg in TRAIN_TINY)
text = root_file("text.txt", (TEXT * 4).encode())


@dataclass
class Work:
    root: Path
    model: Path
    hook: Path  # the folder holding sitecustomize.py

    def argv(self, argv) -> list:
        return [arg.format(model=self.model, root=self.root) for arg in argv]

    def start(self, argv, gate: Path, **popen):
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OPENELM_TOKENIZER": "",
            "PYTHONPATH": str(self.hook),
            "OPENELM_TEST_GATE": str(gate),
        }
        popen.setdefault("stdout", subprocess.PIPE)
        return subprocess.Popen(
            [sys.executable, "-m", "openelm_mlx", *self.argv(argv)],
            cwd=self.root,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            # Ctrl-C as in a terminal: a test run started in the background (`pytest &`) ignores
            # SIGINT, and its children would inherit that (seen once: exit 0 instead of 130).
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            **popen,
        )

    def run(self, argv, **kwargs):
        return run_cli(*self.argv(argv), cwd=self.root, **kwargs)


@pytest.fixture
def work(tmp_path, tiny_checkpoint) -> Work:
    root = tmp_path / "work"
    root.mkdir()
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GATE_HOOK)
    return Work(root, tiny_checkpoint, hook)


@contextmanager
def held(gate: Path, run: subprocess.Popen):
    """Returns once the run waits at the gate (its end of the FIFO is open); the run goes on when
    the block ends. Fails, instead of waiting forever, if the run ends before it gets there."""
    while True:
        try:
            fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until the run opens its end
            break
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            if run.poll() is not None:
                pytest.fail(f"the run ended before it placed its output: {run.stderr.read()}")
            time.sleep(0.02)
    try:
        yield
    finally:
        os.close(fd)


def settled(root: Path) -> dict:
    """tree(root) without the temporary outputs of runs in progress."""
    return {path: entry for path, entry in tree(root).items() if PARTIAL not in path}


def partials(folder: Path) -> list:
    return sorted(p.name for p in folder.rglob(f"*{PARTIAL}*"))


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


# --- signals at the moment of placing: (id, command, setup, signal, exit status, what stderr says,
#     what must be there afterwards besides what was there before, the rerun that must succeed) ---


@dataclass(frozen=True)
class SignalRow:
    id: str
    argv: Tuple[str, ...]
    setup: Callable
    signal: int
    exit: int
    says: str
    rerun: Tuple[str, ...]
    product: str  # what the rerun must create


def nothing(work):
    pass


SIGNAL_ROWS = [
    SignalRow("convert-sigterm", CONVERT, nothing, signal.SIGTERM, 143, "terminated", CONVERT, "out/model.safetensors"),
    SignalRow("convert-sigint", CONVERT, nothing, signal.SIGINT, 130, "interrupted", CONVERT, "out/config.json"),
    SignalRow("bench-sigterm", BENCH_FP32, nothing, signal.SIGTERM, 143, "terminated", BENCH_FP32, "out/results.json"),
    SignalRow(
        "train-sigterm",
        TRAIN_TO,
        text,
        signal.SIGTERM,
        143,
        "terminated",
        (*TRAIN_TO, "--resume"),
        "run/model/model.safetensors",
    ),
]


@pytest.mark.parametrize("row", SIGNAL_ROWS, ids=lambda row: row.id)
def test_signal_while_placing_leaves_nothing_and_a_rerun_works(row, work):
    row.setup(work)
    before = tree(work.root)
    gate = work.root.parent / "gate"
    os.mkfifo(gate)
    run = work.start(row.argv, gate)
    with held(gate, run):
        run.send_signal(row.signal)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == row.exit, stderr
    assert one_line(stderr) == row.says
    after = tree(work.root)
    assert partials(work.root) == []
    if row.id.startswith("train"):  # the run folder stays, resumable: its checkpoint is complete
        assert (work.root / "run" / "checkpoint" / "model.safetensors").is_file()
        assert not (work.root / "run" / "model").exists()
    else:
        assert after == before
    rerun = work.run(row.rerun)
    assert rerun.returncode == 0, rerun.stderr
    assert (work.root / row.product).is_file() and partials(work.root) == []


@pytest.mark.parametrize("argv", [CONVERT], ids=["convert"])
def test_kill_9_leaves_a_recognizable_temp_that_the_next_run_removes(argv, work):
    gate = work.root.parent / "gate"
    os.mkfifo(gate)
    run = work.start(argv, gate)
    with held(gate, run):
        run.kill()
        run.wait(60)
    assert run.returncode == -signal.SIGKILL
    left = partials(work.root)
    assert len(left) >= 1 and all(name.startswith(".") and f"{PARTIAL}{run.pid}-" in name for name in left), left
    rerun = work.run(argv)
    assert rerun.returncode == 0, rerun.stderr
    assert partials(work.root) == [] and (work.root / "out").is_dir()


def test_two_runs_at_once_one_wins_the_other_is_told(work):
    gates = [work.root.parent / "gate-a", work.root.parent / "gate-b"]
    runs = []
    for gate in gates:
        os.mkfifo(gate)
        runs.append(work.start(CONVERT, gate))
    with held(gates[0], runs[0]), held(gates[1], runs[1]):
        pass  # both wait at the gate with complete outputs; released together
    results = [(run.wait(120), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(stderr for code, stderr in results if code == 1)
    assert "out appeared while this run was writing it: nothing was replaced" in one_line(loser)
    assert partials(work.root) == [] and (work.root / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_an_output_that_appears_during_the_run_is_kept(work, kind):
    gate = work.root.parent / "gate"
    os.mkfifo(gate)
    run = work.start(CONVERT, gate)
    with held(gate, run):
        if kind == "folder":
            (work.root / "out").mkdir()  # the user, or another program, at the same path
        else:
            (work.root / "out").write_text("mine")
        before = settled(work.root)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 1
    assert "out appeared while this run was writing it: nothing was replaced" in one_line(stderr)
    assert tree(work.root) == before


# --- read-only and full filesystems: tmpfs, mounted by root on Linux -------------------------


@contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux (CI runs as root)")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        (path / "mine.txt").write_text("kept as it is")
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


FS_ROWS = [
    ("convert-read-only", CONVERT, "ro", "cannot write {fs}/out: Read-only file system"),
    ("convert-full", CONVERT, "full", "cannot write {fs}/out: No space left on device"),
    ("bench-read-only", BENCH_FP32, "ro", "cannot write {fs}/out/results.json: Read-only file system"),
    ("bench-full", BENCH_FP32, "full", "cannot write {fs}/out/results.json: No space left on device"),
    ("train-read-only", TRAIN_TO, "ro", "Read-only file system"),
    ("train-full", TRAIN_TO, "full", "cannot write {fs}/run/checkpoint.tmp/model.safetensors"),
    ("export-coreml-read-only", ("export-coreml", "{model}", "-o", "out.mlpackage"), "ro", "Read-only file system"),
]


@pytest.mark.parametrize("row", FS_ROWS, ids=lambda row: row[0])
def test_unwritable_filesystem_is_one_line_and_leaves_nothing(row, work):
    name, argv, kind, message = row
    text(work)
    fs = work.root / "fs"
    with tmpfs(fs, "64k" if kind == "full" else "1m", read_only=kind == "ro"):
        before = tree(fs)
        argv = [f"{fs}/{arg}" if arg in ("out", "run", "out.mlpackage") else arg for arg in argv]
        result = work.run(argv)
        assert_clean_error(result, message.format(fs=fs))
        assert tree(fs) == before


# --- stdout: full, closed, no reader -----------------------------------------------------------


def test_stdout_on_a_full_device_is_one_line(work):
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "openelm_mlx", "eval", "ppl", "--model", str(work.model), "--max-tokens", "8"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=120,
        )
    assert result.returncode == 1
    assert one_line(result.stderr) == "openelm eval: error: No space left on device"


@pytest.mark.parametrize("stdout", ["no-reader", "closed"])
def test_stdout_without_a_reader_or_closed_is_quiet(work, stdout):
    """A reader gone (`| head`): exit 141 and not a word; stdout closed (`>&-`): the run does its
    work, its printing goes nowhere. Either way the output is written whole."""
    argv = [sys.executable, "-m", "openelm_mlx", *work.argv(CONVERT)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if stdout == "no-reader":
        read, write = os.pipe()
        os.close(read)
        result = subprocess.run(argv, stdout=write, stderr=subprocess.PIPE, text=True, env=env, cwd=work.root)
        os.close(write)
        assert result.returncode == 141 and result.stderr == ""
    else:
        result = subprocess.run(
            ["sh", "-c", '"$@" >&-', "sh", *argv], stderr=subprocess.PIPE, text=True, env=env, cwd=work.root
        )
        assert result.returncode == 0 and result.stderr == ""
    assert (work.root / "out" / "model.safetensors").is_file() and partials(work.root) == []
