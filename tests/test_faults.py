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
import json
import os
import shutil
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
from terminal import Terminal

from openelm_mlx.benchmarks.synthetic import TEXT, write_checkpoint
from openelm_mlx.config import OpenELMConfig
from openelm_mlx.loader import DEMO_MODEL
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

if os.environ.get("OPENELM_TEST_REPLY_GATE"):  # chat: wait at the gate once a reply has begun
    import importlib

    generate = importlib.import_module("openelm_mlx.generate")  # the package's `generate` is a function
    stream_generate = generate.stream_generate

    def gated_stream(*args, **kwargs):
        chunks = stream_generate(*args, **kwargs)
        yield next(chunks)
        with open(os.environ["OPENELM_TEST_REPLY_GATE"], "rb") as gate:
            gate.read()
        yield from chunks

    generate.stream_generate = gated_stream

if os.environ.get("OPENELM_TEST_SWALLOW_INTERRUPT"):  # Ctrl-C inside coremltools' own bare `except:`
    import logging
    import signal
    import time

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # as the CLI sets it, later than this
    import coremltools

    convert = coremltools.convert

    def swallowing(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(10)  # the handler raises in here
        except:  # noqa: E722 (what coremltools does)
            pass
        return convert(*args, **kwargs)

    coremltools.convert = swallowing

if os.environ.get("OPENELM_TEST_TRUNCATE"):  # a weight file truncated once its header was checked
    from openelm_mlx import checkpoint

    read_weights = checkpoint.read_weights

    def truncating(folder):
        weights = read_weights(folder)
        path = os.path.join(folder, "model.safetensors")
        os.truncate(path, os.path.getsize(path) // 2)
        return weights

    checkpoint.read_weights = truncating
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

    def start(self, argv, gate: Path, hooks=("OPENELM_TEST_GATE",), **popen):
        """`openelm ARGV` started with the test hooks named in `hooks` set to `gate`."""
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "OPENELM_TOKENIZER": "",
            "PYTHONPATH": str(self.hook),
            **dict.fromkeys(hooks, str(gate)),
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
    the block ends. Fails, instead of waiting forever, if the run ends before it gets there or
    has not got there in 5 minutes."""
    deadline = time.monotonic() + 300
    while True:
        try:
            fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until the run opens its end
            break
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            if run.poll() is not None:
                pytest.fail(f"the run ended before it placed its output: {run.stderr.read()}")
            if time.monotonic() > deadline:
                run.kill()
                pytest.fail(f"the run did not reach the gate: {run.communicate()[1]}")
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


# --- stopping in the middle of work: Ctrl-C or SIGTERM while a unit of work is under way (a
#     prefill, a training step, an export's stage, a call into Apple's runtime) ends the run within
#     STOP_S, with the exit status and the cleanup of any stop. The model is big enough that each
#     unit takes seconds here (2-core x86-64, reference BLAS), as on a real model, and each row
#     waits until the terminal shows the run inside one. ---

STOP_S = 2.0
# 8 layers of width 512: a 512-token prefill ~0.3-0.6 s per layer here, a training window ~0.5 s
MEDIUM = dict(layers=8, model_dim=512, head_dim=64)


@pytest.fixture(scope="module")
def medium(tmp_path_factory, tokenizer_file) -> Path:
    config = OpenELMConfig.layerwise(**MEDIUM, vocab_size=384, ffn_dim_divisor=64, max_context_length=1024)
    return write_checkpoint(tmp_path_factory.mktemp("medium") / "medium", config, tokenizer=tokenizer_file)


def bench_left(root: Path) -> bool:  # what was gathered (nothing yet) is written, marked interrupted
    results = json.loads((root / "out" / "results.json").read_text())
    return results["interrupted"] and sorted(p.name for p in root.iterdir() if p.name != "text.txt") == ["out"]


def nothing_left(root: Path) -> bool:
    return sorted(p.name for p in root.iterdir() if p.name != "text.txt") == []


@dataclass(frozen=True)
class StopRow:
    id: str
    argv: Tuple[str, ...]  # {medium}: the checkpoint; {bundle}: the demo model's float16 Core AI export
    inside: str  # drawn once the run is inside a unit of work
    signal: int
    exit: int
    says: str  # at the end
    left: Callable[[Path], bool]  # what the run folder holds afterwards


STOP_BENCH = ("bench", "--models", "{medium}", "-p", "512", "-g", "8", "--precisions", "fp32", "--out", "out")
STOP_TRAIN = ("train", "run", "--text", "text.txt", "--steps", "5", "--layers", "4", "--model-dim", "256")
STOP_TRAIN_SIZES = ("--head-dim", "32", "--vocab-size", "320", "--context", "128", "--batch-size", "8")
STOP_EXPORT = ("export-coreai", "{medium}", "-o", "bundle")  # float16: ~30 s of calibration, a layer at a time
STOP_VERIFY = ("verify-coreai", "{bundle}", "--model", str(DEMO_MODEL), "--steps", "8")
STOP_ROWS = [
    # bench writes what it gathered (here: that it was interrupted in its first trial)
    StopRow("bench-sigint", STOP_BENCH, "layer ", signal.SIGINT, 130, "wrote out/results.json", bench_left),
    StopRow("bench-sigterm", STOP_BENCH, "layer ", signal.SIGTERM, 143, "wrote out/results.json", bench_left),
    StopRow(
        "train-sigint", (*STOP_TRAIN, *STOP_TRAIN_SIZES), "window ", signal.SIGINT, 130, "interrupted", nothing_left
    ),
    StopRow(
        "train-sigterm", (*STOP_TRAIN, *STOP_TRAIN_SIZES), "window ", signal.SIGTERM, 143, "terminated", nothing_left
    ),
    StopRow("export-coreai-sigint", STOP_EXPORT, "calibrate", signal.SIGINT, 130, "interrupted", nothing_left),
    StopRow("export-coreai-sigterm", STOP_EXPORT, "calibrate", signal.SIGTERM, 143, "terminated", nothing_left),
    # a call into Apple's runtime: the demo model's float16 prefill takes seconds here (the bundle
    # is test_coreai.py's, exported once per run)
    StopRow("verify-coreai-sigint", STOP_VERIFY, "prefill", signal.SIGINT, 130, "interrupted", nothing_left),
    StopRow("verify-coreai-sigterm", STOP_VERIFY, "prefill", signal.SIGTERM, 143, "terminated", nothing_left),
]


@pytest.mark.parametrize("row", STOP_ROWS, ids=lambda row: row.id)
def test_a_stop_in_the_middle_of_work_ends_the_run_at_once(row, medium, exported, tmp_path):
    if "{bundle}" in row.argv and sys.platform != "linux":
        pytest.skip("Apple's runtime computes float16 natively here: the prefill ends before a signal can land in it")
    (tmp_path / "text.txt").write_text(TEXT * 40)
    bundle = exported("coreai", DEMO_MODEL, precision="float16")["output"] if "{bundle}" in row.argv else None
    argv = [arg.format(medium=medium, bundle=bundle) for arg in row.argv]
    run = Terminal(argv, tmp_path)
    run.wait_for(row.inside)
    time.sleep(1)  # well inside it
    seconds, status = run.stop(row.signal)
    run.finish()
    assert status == row.exit and row.says in run.text[-100:] and "Traceback" not in run.text, run.text
    assert seconds < STOP_S, f"{seconds:.1f} s from the signal to the exit:\n{run.text}"
    assert partials(tmp_path) == [] and row.left(tmp_path), sorted(p.name for p in tmp_path.iterdir())


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


# --- chat and signals: SIGTERM ends it (143, after the reply's cleanup), Ctrl-C stops only a line
#     or a reply; an interrupt that coremltools swallows still stops export-coreml ---------------

CHAT = ("chat", "--model", "{model}", "--max-tokens", "40")


@pytest.mark.parametrize(
    "where, sig, exit",
    [
        ("prompt", signal.SIGTERM, 143),
        ("reply", signal.SIGTERM, 143),
        ("prompt", signal.SIGINT, 0),
        ("reply", signal.SIGINT, 0),
    ],
    ids=["sigterm-at-prompt", "sigterm-in-reply", "sigint-at-prompt", "sigint-in-reply"],
)
def test_chat_ends_on_sigterm_and_goes_on_after_ctrl_c(work, where, sig, exit):
    gate = work.root.parent / "gate"
    os.mkfifo(gate)
    run = work.start(CHAT, gate, hooks=("OPENELM_TEST_REPLY_GATE",), stdin=subprocess.PIPE)
    if where == "prompt":
        assert run.stdout.read(3) == ">> "  # written by input(), which now waits for a line
        run.send_signal(sig)
    else:
        run.stdin.write("Tell me about the sea\n")
        run.stdin.flush()
        with held(gate, run):  # the reply has begun
            run.send_signal(sig)
    stdout, stderr = run.communicate(timeout=120)  # closes stdin: after Ctrl-C, its end ends the chat
    assert run.returncode == exit and "Traceback" not in stderr, stderr
    if sig == signal.SIGTERM:
        assert stderr.splitlines()[-1] == "terminated"
    else:
        assert "terminated" not in stderr and "interrupted" not in stderr
        assert (" [stopped]" in stdout) == (where == "reply")


def test_an_interrupt_swallowed_by_coremltools_still_stops_the_export(work):
    pytest.importorskip("coremltools")
    before = tree(work.root)
    argv = ("export-coreml", "{model}", "-o", "out.mlpackage")
    run = work.start(argv, Path("on"), hooks=("OPENELM_TEST_SWALLOW_INTERRUPT",))
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.splitlines()[-1] == "interrupted"
    assert tree(work.root) == before  # no package, nothing beside it


# --- odd environments: TMPDIR unusable, the current folder deleted, stdin closed, a weight file
#     truncated while convert reads it ----------------------------------------------------------


@dataclass(frozen=True)
class EnvRow:
    id: str
    argv: Tuple[str, ...]
    start: str  # the sh -c line that runs the command, "$@"
    env: Tuple[Tuple[str, str], ...]
    exit: int
    says: str  # an error: in its one line; else: somewhere in stderr
    makes: str = ""  # what the run must create ("": nothing changes)


PLAIN, NO_STDIN = 'exec "$@"', 'exec "$@" <&-'
GONE = 'mkdir gone && cd gone && rmdir ../gone && exec "$@"'
GENERATE = ("generate", "--model", "{model}", "-p", "hi", "--max-tokens", "2")
CONVERT_ABS = ("convert", "{model}", "-o", "{root}/out")
UNUSABLE = "is not a writable folder: using"
DELETED = "the current folder was deleted: cd to a folder that exists"

ENV_ROWS = [
    EnvRow(
        "generate-tmpdir-missing",
        GENERATE,
        PLAIN,
        (("TMPDIR", "{root}/nope"),),
        0,
        f"TMPDIR='{{root}}/nope' {UNUSABLE}",
    ),
    EnvRow("generate-tmpdir-a-file", GENERATE, PLAIN, (("TMPDIR", "{root}/text.txt"),), 0, UNUSABLE),
    EnvRow("generate-tmpdir-empty", GENERATE, PLAIN, (("TMPDIR", ""),), 0, f"TMPDIR='' {UNUSABLE}"),
    EnvRow("convert-tmpdir-missing", CONVERT, PLAIN, (("TMPDIR", "{root}/nope"),), 0, UNUSABLE, "out/config.json"),
    EnvRow("generate-cwd-deleted", GENERATE, GONE, (), 1, DELETED),
    EnvRow("convert-cwd-deleted", CONVERT_ABS, GONE, (), 1, DELETED),
    EnvRow(
        "train-cwd-deleted", ("train", "{root}/run", "--text", "{root}/text.txt", "--steps", "1"), GONE, (), 1, DELETED
    ),
    EnvRow("generate-stdin-closed", GENERATE[:3] + GENERATE[5:], NO_STDIN, (), 0, "no prompt given, continuing"),
    EnvRow("chat-stdin-closed", CHAT, NO_STDIN, (), 0, "type a message"),
    EnvRow("convert-stdin-closed", CONVERT, NO_STDIN, (), 0, "", "out/model.safetensors"),
    EnvRow("eval-stdin-closed", ("eval", "ppl", "--model", "{model}", "--max-tokens", "16"), NO_STDIN, (), 0, ""),
    EnvRow(
        "convert-weights-truncated-while-read",
        ("convert", "{root}/model", "-o", "out"),
        PLAIN,
        (("PYTHONPATH", "{hook}"), ("OPENELM_TEST_TRUNCATE", "1")),
        1,
        "model.safetensors is truncated",
    ),
]


@pytest.mark.parametrize("row", ENV_ROWS, ids=lambda row: row.id)
def test_odd_environment(row, work):
    text(work)
    if "{root}/model" in row.argv:  # a private copy: the run's hook truncates it
        shutil.copytree(work.model, work.root / "model")
    fields = {"model": work.model, "root": work.root, "hook": work.hook}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENELM_TOKENIZER": ""}
    env.update((name, value.format(**fields)) for name, value in row.env)
    before = settled(work.root)
    argv = [sys.executable, "-m", "openelm_mlx", *(arg.format(**fields) for arg in row.argv)]
    result = subprocess.run(
        ["sh", "-c", row.start, "sh", *argv], cwd=work.root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == row.exit and "Traceback" not in result.stderr, result.stderr
    if row.exit:
        assert one_line(result.stderr).startswith(f"openelm {row.argv[0]}: error: ")
    assert row.says.format(**fields) in result.stderr
    after = settled(work.root)
    if row.makes:
        assert (work.root / row.makes).is_file()
    elif row.id.endswith("truncated-while-read"):
        assert not (work.root / "out").exists()
    else:
        assert after == before
    assert partials(work.root) == []


def test_tmpdir_on_a_read_only_filesystem_falls_back(work):
    ro = work.root / "ro"
    with tmpfs(ro, "1m", read_only=True):
        env = {"TMPDIR": str(ro)}
        result = work.run(GENERATE, env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert f"TMPDIR='{ro}' {UNUSABLE}" in result.stderr
