"""openelm_mlx.outputs: outputs are placed whole, never over something that appeared meanwhile,
and --force never deletes what a run reads."""

import multiprocessing
import os
from pathlib import Path

import pytest

from openelm_mlx.errors import OpenELMError
from openelm_mlx.outputs import PARTIAL, rename_no_replace, staged_output, staged_outputs


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_rename_refuses_an_empty_folder_and_a_file(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()  # os.rename would silently replace an empty folder
    with pytest.raises(FileExistsError):
        rename_no_replace(src, dst)
    (tmp_path / "f").write_text("new")
    (tmp_path / "g").write_text("mine")
    with pytest.raises(FileExistsError):
        rename_no_replace(tmp_path / "f", tmp_path / "g")
    assert (tmp_path / "g").read_text() == "mine"


def test_output_is_placed_whole_and_temp_removed(tmp_path):
    out = tmp_path / "deep" / "out"
    with staged_output(out) as tmp:
        assert PARTIAL in tmp.name and tmp.parent == out.parent
        tmp.mkdir()
        (tmp / "a.txt").write_text("a")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "a"
    assert [p.name for p in out.parent.iterdir()] == ["out"]


def test_failure_leaves_nothing_not_even_new_parents(tmp_path):
    with pytest.raises(RuntimeError):
        with staged_output(tmp_path / "new" / "sub" / "out") as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_something_that_appears_meanwhile_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OpenELMError, match="appeared while this run was writing it"):
        with staged_output(out) as tmp:
            tmp.write_text("ours")
            out.mkdir()  # another process, or the user, creates it (empty) during the run
    assert out.is_dir() and list(out.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_exists_without_force_is_refused_before_work(tmp_path):
    out = tmp_path / "out"
    out.write_text("mine")
    with pytest.raises(OpenELMError, match="already exists.*--force"):
        with staged_output(out):
            raise AssertionError("must not run")
    assert out.read_text() == "mine"


def test_force_replaces_only_once_the_new_output_is_complete(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_output(out, force=True) as tmp:
            tmp.mkdir()
            raise RuntimeError("interrupted")
    assert (out / "old.txt").read_text() == "old"
    with staged_output(out, force=True) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert tree(out) == {"new.txt": b"new"} and [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("target", ["input", "parent_of_input", "cwd", "parent_of_cwd"])
def test_force_never_deletes_what_the_run_reads(tmp_path, monkeypatch, target):
    model = tmp_path / "work" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    monkeypatch.chdir(model if target.endswith("cwd") else tmp_path)
    out = {"input": model, "parent_of_input": model.parent, "cwd": Path("."), "parent_of_cwd": Path("..")}[target]
    with pytest.raises(OpenELMError, match="which this run reads"):
        with staged_output(out, force=True, reads=[model]):
            raise AssertionError("must not run")
    assert (model / "config.json").read_text() == "{}"


def test_force_through_a_symlink_replaces_the_link_not_its_target(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(real)
    with staged_output(link, force=True) as tmp:
        tmp.write_text("new")
    assert link.read_text() == "new" and not link.is_symlink()
    assert (real / "keep.txt").read_text() == "keep"


def test_two_outputs_are_placed_together_or_not_at_all(tmp_path):
    a, b = tmp_path / "a.pkg", tmp_path / "a.tok"
    with pytest.raises(OpenELMError, match="appeared"):
        with staged_outputs([a, b]) as (ta, tb):
            ta.write_text("pkg")
            tb.write_text("tok")
            b.write_text("someone else's")
    assert not a.exists() and b.read_text() == "someone else's"


def test_stale_partial_of_a_dead_process_is_removed(tmp_path):
    dead = multiprocessing.Process(target=os.getpid)
    dead.start()
    dead.join()
    stale = tmp_path / f".out{PARTIAL}{dead.pid}-abcdef"
    stale.mkdir()
    (stale / "half.safetensors").write_bytes(b"\0" * 10)
    live = tmp_path / f".out{PARTIAL}{os.getpid()}-123456"  # a running writer's: left alone
    live.mkdir()
    with staged_output(tmp_path / "out") as tmp:
        tmp.write_text("done")
    assert not stale.exists() and live.exists() and (tmp_path / "out").read_text() == "done"


def _race(out, barrier, results, i):
    try:
        with staged_output(out) as tmp:
            tmp.write_text(str(i))
            barrier.wait()
        results.put("ok")
    except OpenELMError as e:
        results.put(str(e))


def test_two_runs_writing_the_same_output_one_wins(tmp_path):
    out = tmp_path / "out"
    barrier, results = multiprocessing.Barrier(2), multiprocessing.Queue()
    runs = [multiprocessing.Process(target=_race, args=(out, barrier, results, i)) for i in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in runs)
    assert outcomes[0].endswith(
        "appeared while this run was writing it: nothing was replaced; remove it or choose another output"
    )
    assert outcomes[1] == "ok"
    assert out.read_text() in ("0", "1") and [p.name for p in tmp_path.iterdir()] == ["out"]
