"""The run folder of `openelm train`: train_state.json (settings, step, losses) and checkpoint/
(weights, AdamW's moments, the step), so that `--resume` continues exactly where a run stopped."""

import fcntl
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from openelm_mlx.errors import OpenELMError
from openelm_mlx.files import read_json
from openelm_mlx.outputs import check_output, remove

STATE = "train_state.json"
CHECKPOINT = "checkpoint"  # the folder --resume continues from
LOCK = ".openelm-train.lock"


def start_run(output: Path, settings: dict, resume: bool, force: bool, reads=()):
    """Refuse to mix runs: --resume needs the same settings, a new run an empty folder (or --force,
    which never deletes a folder that holds the training text or the current folder). Returns the
    run's lock: while it is held, a second `openelm train` into the same folder is refused; the
    system releases it when the process ends, however it ends."""
    if resume:
        if not (output / STATE).is_file():
            raise OpenELMError(f"--resume: no {STATE} in {output}: start without --resume")
        saved = read_state(output / STATE)["config"]
        changed = [f"{k} {saved.get(k)} -> {v}" for k, v in settings.items() if saved.get(k) != v]
        if changed:
            raise OpenELMError(
                f"--resume with other settings than the run in {output} ({'; '.join(changed)}): use the same ones"
            )
    elif output.exists() and (not output.is_dir() or any(p.name != LOCK for p in output.iterdir())):
        if not force:
            what = "is not empty" if output.is_dir() else "is a file, not a run folder"
            raise OpenELMError(f"{output} {what}: pass --resume to continue the run or --force to start over")
        check_output(output, force, reads)
        lock = lock_run(output)  # not while another run writes there
        lock.close()
        remove(output)
    output.mkdir(parents=True, exist_ok=True)
    return lock_run(output)


def lock_run(output: Path):
    lock = open(output / LOCK, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise OpenELMError(
            f"another `openelm train` is writing {output}: wait for it or choose another folder"
        ) from None
    return lock


def save_checkpoint(output: Path, model, optimizer, state: dict):
    """Weights, optimizer moments and the step, written to a temp folder and swapped in whole."""
    tmp, final = output / f"{CHECKPOINT}.tmp", output / CHECKPOINT
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _save(tmp / "model.safetensors", dict(tree_flatten(model.parameters())))
        _save(tmp / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
        (tmp / STATE).write_text(json.dumps(state))
    except BaseException:  # a full disk, an interrupt: the last complete checkpoint stays as it is
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (output / STATE).write_text(json.dumps(state, indent=1))


def _save(path: Path, arrays: dict):
    """mx.save_safetensors, whose failures (a full disk) are a RuntimeError without the path."""
    try:
        mx.save_safetensors(str(path), arrays)
    except RuntimeError as e:
        free = shutil.disk_usage(path.parent).free
        raise OpenELMError(f"cannot write {path}: {e} ({free:,} bytes free there)") from None


def load_checkpoint(output: Path, model, optimizer) -> dict:
    folder = output / CHECKPOINT
    if not (folder / STATE).is_file():
        raise OpenELMError(f"--resume: no checkpoint in {output}: start without --resume")
    model.load_weights(str(folder / "model.safetensors"))
    optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
    return read_state(folder / STATE)


def read_state(path: Path) -> dict:
    state = read_json(path)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise OpenELMError(f"{path} is not the state of an `openelm train` run: start without --resume")
    return state
