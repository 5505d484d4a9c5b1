"""The run folder of `openelm train`: train_state.json (settings, step, losses, the tokenizer's
SHA-256) and checkpoint/ (weights, AdamW's moments, the step), so that `--resume` continues exactly
where a run stopped. `--resume` reads the run folder as hostile input: every field, tensor name and
shape is checked, and the tokenizer must be the one the run was trained with, before the run goes on."""

import fcntl
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from openelm_mlx.checkpoint import read_header, weight_problems
from openelm_mlx.errors import OpenELMError
from openelm_mlx.files import each, field_problem, integer, read_json, rule, text
from openelm_mlx.outputs import check_output, remove

STATE = "train_state.json"
CHECKPOINT = "checkpoint"  # the folder --resume continues from
LOCK = ".openelm-train.lock"
RESTART = "start over with --force"  # what to do with a run folder --resume cannot continue


def _is_number(v) -> bool:
    return type(v) in (int, float)  # read_json has refused NaN and infinities


LOSSES = each(
    rule(
        lambda v: isinstance(v, list) and len(v) == 2 and type(v[0]) is int and _is_number(v[1]),
        "must be a [step, loss] pair of numbers",
    )
)
# Every field of train_state.json besides "config" (compared with the settings); "step" is
# checked against --steps.
STATE_RULES = {
    "step": integer(0, 1 << 62),
    "seconds": rule(lambda v: _is_number(v) and v >= 0, "must be a number of at least 0"),
    "train_loss": LOSSES,
    "val_loss": LOSSES,
    "tokenizer_sha256": text,
}


def start_run(output: Path, settings: dict, resume: bool, force: bool, reads=()):
    """Refuse to mix runs: --resume needs the same settings, a new run an empty folder (or --force,
    which never deletes a folder that holds the training text or the current folder). Returns the
    run's lock: while it is held, a second `openelm train` into the same folder is refused; the
    system releases it when the process ends, however it ends."""
    if resume:
        if not (output / STATE).is_file():
            raise OpenELMError(f"--resume: no {STATE} in {output}: start without --resume")
        read_state(output / STATE, settings)
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
        (tmp / STATE).write_text(json.dumps(state, allow_nan=False))
    except BaseException:  # a full disk, an interrupt: the last complete checkpoint stays as it is
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (output / STATE).write_text(json.dumps(state, indent=1, allow_nan=False))


def _save(path: Path, arrays: dict):
    """mx.save_safetensors, whose failures (a full disk) are a RuntimeError without the path."""
    try:
        mx.save_safetensors(str(path), arrays)
    except RuntimeError as e:
        free = shutil.disk_usage(path.parent).free
        raise OpenELMError(f"cannot write {path}: {e} ({free:,} bytes free there)") from None


def load_checkpoint(output: Path, model, optimizer, settings: dict, tokenizer_sha256: str) -> dict:
    """The checkpoint's state, its weights in `model` and its moments in `optimizer`; everything
    checked before any of it is used (a failure leaves the run folder as it was)."""
    folder = output / CHECKPOINT
    if not folder.is_dir():
        raise OpenELMError(f"--resume: no {CHECKPOINT}/ in {output}: {RESTART}")
    state = read_state(folder / STATE, settings)
    if state["tokenizer_sha256"] != tokenizer_sha256:
        raise OpenELMError(
            f"--resume: {output / 'tokenizer.model'} is not the tokenizer this run was trained with "
            f"(its SHA-256 differs from the one in {folder / STATE}): put the run's tokenizer back, or {RESTART}"
        )
    weights = _read_tensors(folder / "model.safetensors", {"F32": 4})  # as save_checkpoint writes them
    problems = weight_problems(model, weights)
    if problems:
        raise OpenELMError(
            f"--resume: {folder / 'model.safetensors'} is not this run's model ({'; '.join(problems)}): {RESTART}"
        )
    model.load_weights(list(weights.items()))
    moments = _read_tensors(folder / "optimizer.safetensors", {"F32": 4, "U64": 8})  # U64: AdamW's step
    optimizer.init(model.trainable_parameters())  # the moments a fresh run would have: their names and shapes
    expected = {k: (v.shape, v.dtype) for k, v in tree_flatten(optimizer.state)}
    wrong = sorted(set(expected) ^ set(moments)) or [
        k for k, v in expected.items() if (moments[k].shape, moments[k].dtype) != v
    ]
    if wrong:
        raise OpenELMError(
            f"--resume: {folder / 'optimizer.safetensors'} does not hold this model's optimizer state "
            f"(first difference: {wrong[0]}): {RESTART}"
        )
    if moments["step"].item() != state["step"]:  # AdamW's bias correction and the schedule count it
        raise OpenELMError(
            f"--resume: {folder / 'optimizer.safetensors'} is at step {moments['step'].item()}, "
            f"{folder / STATE} at step {state['step']}: {RESTART}"
        )
    optimizer.state = tree_unflatten(list(moments.items()))
    return state


def _read_tensors(path: Path, dtypes: dict) -> dict:
    read_header(path, RESTART, dtypes)  # complete and well-formed, before MLX reads it
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise OpenELMError(f"--resume: cannot read {path}: {e}: {RESTART}") from None


def read_state(path: Path, settings: dict) -> dict:
    """train_state.json of the run being resumed, every field checked: its settings must be
    `settings`, its step within --steps."""
    state = read_json(path, fix=RESTART)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise OpenELMError(f"--resume: {path} is not the state of an `openelm train` run: {RESTART}")
    saved = state["config"]
    changed = [f"{k} {saved.get(k)} -> {v}" for k, v in settings.items() if saved.get(k) != v]
    if changed:
        raise OpenELMError(
            f"--resume with other settings than the run in {path.parent} ({'; '.join(changed)}): use the same ones"
        )
    missing = [k for k in STATE_RULES if k not in state]
    rules = {**STATE_RULES, "step": integer(0, settings["steps"])}
    problem = f"field '{missing[0]}' is missing" if missing else field_problem(state, rules)
    if problem:
        raise OpenELMError(f"--resume: {path}: {problem}: {RESTART}")
    return state
