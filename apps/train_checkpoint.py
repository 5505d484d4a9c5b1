"""The run folder of `openelm train`: train_state.json (settings, step, losses) and checkpoint/
(weights, AdamW's moments, the step), so that `--resume` continues exactly where a run stopped."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from openelm_mlx.errors import OpenELMError

STATE = "train_state.json"


def start_run(output: Path, settings: dict, resume: bool, force: bool):
    """Refuse to mix runs: --resume needs the same settings, a new run an empty folder (or --force)."""
    if resume:
        if not (output / STATE).is_file():
            raise OpenELMError(f"--resume: no {STATE} in {output}: start without --resume")
        saved = json.loads((output / STATE).read_text())["config"]
        changed = [f"{k} {saved.get(k)} -> {v}" for k, v in settings.items() if saved.get(k) != v]
        if changed:
            raise OpenELMError(
                f"--resume with other settings than the run in {output} ({'; '.join(changed)}): use the same ones"
            )
    elif output.exists() and any(output.iterdir()):
        if not force:
            raise OpenELMError(f"{output} is not empty: pass --resume to continue the run or --force to start over")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)


def save_checkpoint(output: Path, model, optimizer, state: dict):
    """Weights, optimizer moments and the step, written to a temp folder and swapped in whole."""
    tmp, final = output / "checkpoint.tmp", output / "checkpoint"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
    (tmp / STATE).write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    (output / STATE).write_text(json.dumps(state, indent=1))


def load_checkpoint(output: Path, model, optimizer) -> dict:
    folder = output / "checkpoint"
    if not (folder / STATE).is_file():
        raise OpenELMError(f"--resume: no checkpoint in {output}: start without --resume")
    model.load_weights(str(folder / "model.safetensors"))
    optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
    return json.loads((folder / STATE).read_text())
