"""Bad input, table-driven: one Row per case (command, setup, expected exit status, a fragment
of the message). One runner holds every row to the same promise, in a subprocess (a case may
not crash or hang the test process): the exit status, exactly one line on stderr reading
`openelm <command>: error: ...` with the fragment, no traceback, and every file under the work
folder byte-identical before and after the run (nothing damaged, nothing left beside an output).

The rows live in lists by concern (tests/bad_input_checkpoints.py: hostile or broken
checkpoints; OPTIONS below); the kit to write them is tests/bad_input.py. To add a case, append a
Row to a list; to add a concern, add a list (or a file of lists) to ROWS.
"""

import shutil
from pathlib import Path
from typing import Dict

import mlx.core as mx
import pytest
from bad_input import GENERATE, Row, Work, category, nothing, tree
from bad_input_checkpoints import CHECKPOINT_ROWS
from bad_input_eval_tasks import EVAL_TASK_ROWS
from bad_input_generation import GENERATION
from bad_input_options import OPTION_ROWS
from bad_input_packages import PACKAGE_ROWS
from bad_input_training import TINY_RUN, TRAINING_ROWS
from conftest import assert_clean_error, run_cli, tiny_config

from openelm_mlx.apps.train import train
from openelm_mlx.benchmarks.synthetic import TEXT, train_tokenizer, write_checkpoint
from openelm_mlx.files import is_repo_id

LONG_PROMPT = "the sea and the stars " * 60  # > 256 tokens, the tiny model's context

OPTIONS = category(
    "option",
    Row("temp-negative", (*GENERATE, "--temp", "-0.5"), nothing, "--temp must be >= 0"),
    Row("top-p-above-1", (*GENERATE, "--top-p", "1.5"), nothing, "--top-p must be in [0, 1]"),
    Row("top-k-negative", (*GENERATE, "--top-k", "-3"), nothing, "--top-k must be >= 0"),
    Row("min-p-above-1", (*GENERATE, "--min-p", "2"), nothing, "--min-p must be in [0, 1]"),
    Row("repetition-penalty-0", (*GENERATE, "--repetition-penalty", "0"), nothing, "--repetition-penalty must be > 0"),
    Row("max-tokens-0", (*GENERATE, "--max-tokens", "0"), nothing, "--max-tokens must be at least 1"),
    Row(
        "prompt-too-long",
        (*GENERATE, "-p", LONG_PROMPT, "--max-tokens", "20"),
        nothing,
        "exceeds the model's context of 256",
    ),
    # the demo model (no --model), no prompt: the error alone, without the notices a good run prints
    Row("demo-prompt-too-long", ("generate", "-p", LONG_PROMPT), nothing, "exceeds the model's context of 256"),
    Row(
        "demo-no-prompt-temp",
        ("generate", "--temp", "nan"),
        nothing,
        "--temp must be finite and >= 0 (0 is greedy), got nan",
        stdin="",
    ),
)

ROWS = CHECKPOINT_ROWS + OPTIONS + OPTION_ROWS + GENERATION + TRAINING_ROWS + EVAL_TASK_ROWS + PACKAGE_ROWS

# --- the runner -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bases(
    tmp_path_factory, tiny_checkpoint, tokenizer_file, massive_activation_checkpoint, exported
) -> Dict[str, Path]:
    """The fixture checkpoints rows start from, and the files setups may copy."""
    from openelm_mlx.convert.hf_to_mlx import convert

    root = tmp_path_factory.mktemp("bases")
    weights = dict(mx.load(str(tiny_checkpoint / "model.safetensors")))
    sharded = write_checkpoint(root / "sharded", tiny_config(), weights, tokenizer_file, shards=2)
    q4 = convert(tiny_checkpoint, root / "q4", bits=4)
    (root / "text.txt").write_text(TEXT * 4)
    run = root / "run"
    train(root / "text.txt", run, **TINY_RUN)  # a finished run, for --resume to be handed damaged
    return {
        "tiny": tiny_checkpoint,
        "sharded": sharded,
        "q4": q4,
        "massive": massive_activation_checkpoint,
        "run": run,
        "packages": packages(root / "packages", tiny_checkpoint, exported),
        "tokenizer-512": train_tokenizer(root / "t512", vocab_size=512),
        "tokenizer-320": train_tokenizer(root / "t320", vocab_size=320),
    }


def packages(folder: Path, checkpoint: Path, exported) -> Path:
    """ckpt/ (the tiny checkpoint), b/ (a float32 Core AI bundle of it), ib/ (an iOS one: one
    context, one query length), p.mlpackage and its p.tokenizer/: the session's exports, copied
    for the package rows to damage."""
    from openelm_mlx.convert.coreai.export import export_coreai
    from openelm_mlx.convert.coreai.ios_graph import StaticShapes

    shutil.copytree(checkpoint, folder / "ckpt")
    shutil.copytree(exported("coreai", checkpoint, precision="float32")["output"], folder / "b")
    export_coreai(checkpoint, folder / "ib", target="ios", context=128, static_shapes=StaticShapes((128,), (8,)))
    coreml = exported("coreml", checkpoint)
    shutil.copytree(coreml["output"], folder / "p.mlpackage")
    shutil.copytree(coreml["tokenizer"], folder / "p.tokenizer")
    return folder


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.id)
def test_bad_input(row: Row, bases, tmp_path):
    work = Work(tmp_path / "work", tmp_path / "work" / "model", tmp_path / "work" / "out", bases)
    work.root.mkdir()
    shutil.copytree(bases[row.base], work.model, symlinks=True)
    row.setup(work)
    before = tree(work.root)
    argv = [arg.format(**work.fields()) for arg in row.argv]
    # An empty Hub cache outside the work folder: a repo id is never found, nothing is downloaded.
    env = {"HF_HOME": str(tmp_path / "hf"), "HOME": str(tmp_path / "home")}
    env.update((name, value.format(**work.fields())) for name, value in row.env)
    result = run_cli(*argv, input=row.stdin, cwd=work.root, env=env, timeout=60)

    assert_clean_error(result, row.message, exit=row.exit)
    assert tree(work.root) == before, "a file changed, or something was left beside the output"


def test_output_exists_needs_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_clean_error(run_cli("convert", tiny_checkpoint, "-o", out), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    assert run_cli("convert", tiny_checkpoint, "-o", out, "--force").returncode == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_truncate_fits_a_long_prompt(tiny_checkpoint):
    ok = run_cli("generate", "--model", tiny_checkpoint, "-p", LONG_PROMPT, "--max-tokens", "20", "--truncate")
    assert ok.returncode == 0, ok.stderr
    assert "prompt: 236 tokens" in ok.stderr  # BOS + the last 235: 236 + 20 fill the 256 exactly


def test_interrupted_conversion_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    from openelm_mlx import model_folder
    from openelm_mlx.convert import hf_to_mlx

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_folder, "to_bytes", interrupt)
    with pytest.raises(KeyboardInterrupt):
        hf_to_mlx.convert(tiny_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_rows_are_unique_and_many():
    ids = [row.id for row in ROWS]
    assert len(ids) == len(set(ids))
    assert len(ROWS) >= 120


# Which strings are Hub repo ids and which are paths (openelm_mlx.files.is_repo_id).
@pytest.mark.parametrize(
    "text, repo",
    [
        ("apple/OpenELM-270M", True),
        ("mlx-community/OpenELM-270M-Instruct-4bit", True),
        ("user_1/model.v2", True),
        ("./typo", False),
        ("../x", False),
        ("/abs/path", False),
        ("~/x", False),
        ("a/b/c", False),
        ("typo", False),
        ("owner\\name", False),
        (".hidden/name", False),
        ("owner/..", False),
        ("owner/", False),
    ],
)
def test_repo_id_shape(text, repo):
    assert is_repo_id(text) is repo


# The commands of this module's rows whose every option must say what it does (generate and chat:
# tests of their own).
HELPED = ["convert", "export-coreml", "verify-coreml", "export-coreai", "verify-coreai", "train", "eval", "bench"]


@pytest.mark.parametrize("command", HELPED)
def test_every_option_has_help_with_its_default_once(command):
    import argparse

    from openelm_mlx.apps.cli import build_parser

    _, parser = build_parser(command)
    parsers = [parser]
    for action in parser._actions:  # eval's metrics (ppl) are parsers of their own
        if isinstance(action, argparse._SubParsersAction):
            parsers += action.choices.values()
    for each in parsers:
        formatter = each._get_formatter()
        for action in each._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help, f"openelm {command}: {name} has no help"
            shown = formatter._get_help_string(action) % {"default": action.default}
            assert shown.count("default") <= 1, f"openelm {command}: {name}: {shown}"
            assert "(default: None)" not in shown and "(default: False)" not in shown, shown
