"""Bad-input rows for `openelm train`: the run folder that `--resume` continues, read as hostile
input (a state that is not an object or is nested too deep, fields of the wrong type or range,
losses that are null or NaN, truncated, missing or foreign tensors, a swapped or deleted
tokenizer), and texts the run cannot use (a validation text shorter than a window, a line too long
for the tokenizer trainer). The base "run" is a finished run folder of TINY_RUN (tests/
test_bad_input.py builds it), copied to {model}; every row must leave it byte-identical."""

import shutil

from bad_input import DELETE, Row, assign, both, category, deep, edit_json, remove, root_file, special, write

from openelm_mlx.benchmarks.synthetic import TEXT

# A run of a few seconds: the settings --resume must repeat.
TINY_RUN = dict(layers=2, model_dim=64, head_dim=16, vocab_size=320, context=16, batch_size=2, steps=2, warmup=0)
SETTINGS = tuple(arg for name, value in TINY_RUN.items() for arg in (f"--{name.replace('_', '-')}", str(value)))
RESUME = ("train", "{model}", "--resume", "--text", "text.txt", *SETTINGS)
NEW_RUN = ("train", "{out}", "--text", "text.txt", *SETTINGS)
STATE, SAVED = "train_state.json", "checkpoint/train_state.json"
RESTART = "start over with --force"
text = root_file("text.txt", (TEXT * 4).encode())


def state(name: str = SAVED, **changes):
    """Set (or with DELETE remove) fields of a train_state.json of the run, and the text to resume on."""
    return both(text, edit_json(name, lambda raw: assign(raw, changes)))


def damaged(setup):
    return both(text, setup)


def no_checkpoint(work):
    shutil.rmtree(work.model / "checkpoint")


def folder_for_state(work):
    (work.model / SAVED).unlink()
    (work.model / SAVED).mkdir()


def float16_weights(work):
    """The checkpoint's weights stored as float16 (the trainer writes float32)."""
    import mlx.core as mx

    path = work.model / "checkpoint" / "model.safetensors"
    weights = {k: v.astype(mx.float16) for k, v in mx.load(str(path)).items()}
    mx.eval(weights)  # read before the file is written over
    mx.save_safetensors(str(path), weights)


def other_optimizer(work):
    """Moments of another model: AdamW's step and learning rate alone."""
    import mlx.core as mx

    mx.save_safetensors(str(work.model / "checkpoint" / "optimizer.safetensors"), {"step": mx.array(2, mx.uint64)})


def foreign_weights(work):
    """The weights of another model (the tiny fixture checkpoint) in the run's checkpoint."""
    (work.model / "checkpoint" / "model.safetensors").write_bytes(
        (work.assets["tiny"] / "model.safetensors").read_bytes()
    )


def swapped_tokenizer(work):
    """Another tokenizer of the same size: only its hash tells it apart."""
    (work.model / "tokenizer.model").write_bytes(work.assets["tokenizer-320"].read_bytes())


STEP = "field 'step' must be an integer from 0 to 2"
PAIR = "must be a [step, loss] pair of numbers"

RESUME_ROWS = category(
    "resume",
    # train_state.json, the checkpoint's and the run folder's
    Row("step-string", RESUME, state(step="2"), f'{STEP}, got "2" (a string)'),
    Row("step-negative", RESUME, state(step=-1), f"{STEP}, got -1"),
    Row("step-past-steps", RESUME, state(step=3), f"{STEP}, got 3"),
    Row("step-fraction", RESUME, state(step=1.5), f"{STEP}, got 1.5"),
    Row("step-boolean", RESUME, state(step=True), f"{STEP}, got true"),
    Row("step-missing", RESUME, state(step=DELETE), "field 'step' is missing"),
    Row("step-edited", RESUME, state(step=1), "optimizer.safetensors is at step 2"),
    Row("step-in-run-folder-state", RESUME, state(STATE, step="two"), f'{STEP}, got "two"'),
    Row("loss-null", RESUME, state(train_loss=[[1, None], [2, 5.9]]), f"field 'train_loss' item 0 {PAIR}"),
    Row("loss-string", RESUME, state(train_loss=[[1, "6.3"]]), PAIR),
    Row("loss-not-a-list", RESUME, state(val_loss={"2": 5.0}), "field 'val_loss' must be a list"),
    Row(
        "loss-nan",
        RESUME,
        damaged(write(SAVED, lambda old: old.replace(b'"train_loss": [[1, ', b'"train_loss": [[1, NaN], [1, '))),
        "NaN",
    ),
    Row("seconds-negative", RESUME, state(seconds=-5), "field 'seconds' must be a number of at least 0"),
    Row("seconds-string", RESUME, state(seconds="ten"), "field 'seconds' must be a number"),
    Row("tokenizer-hash-missing", RESUME, state(tokenizer_sha256=DELETE), "field 'tokenizer_sha256' is missing"),
    Row("tokenizer-hash-number", RESUME, state(tokenizer_sha256=7), "field 'tokenizer_sha256' must be a string"),
    Row(
        "other-settings",
        RESUME,
        state(
            config={
                **TINY_RUN,
                "layers": 3,
                "learning_rate": 0.003,
                "min_lr_ratio": 0.1,
                "weight_decay": 0.1,
                "grad_clip": 1.0,
                "seed": 0,
            }
        ),
        "other settings",
    ),
    Row("state-a-list", RESUME, damaged(write(STATE, b"[1, 2]")), "is not the state of an `openelm train` run"),
    Row("state-config-a-list", RESUME, state(config=[1]), "is not the state of an `openelm train` run"),
    Row("checkpoint-state-a-string", RESUME, damaged(write(SAVED, b'"hi"')), "is not the state of"),
    Row("state-deeply-nested", RESUME, damaged(write(STATE, deep(100_000))), f"nests JSON too deeply: {RESTART}"),
    Row("state-empty", RESUME, damaged(write(SAVED, b"")), "train_state.json"),
    Row("state-truncated", RESUME, damaged(write(SAVED, lambda old: old[: len(old) // 2])), "train_state.json"),
    Row("state-a-folder", RESUME, damaged(folder_for_state), "folder"),
    # the tensors
    Row("checkpoint-missing", RESUME, damaged(no_checkpoint), "no checkpoint/"),
    Row("weights-missing", RESUME, damaged(remove("checkpoint/model.safetensors")), "no file at"),
    Row("optimizer-missing", RESUME, damaged(remove("checkpoint/optimizer.safetensors")), "no file at"),
    Row(
        "weights-truncated",
        RESUME,
        damaged(write("checkpoint/model.safetensors", lambda old: old[: len(old) - 100])),
        "model.safetensors is truncated",
    ),
    Row(
        "optimizer-truncated",
        RESUME,
        damaged(write("checkpoint/optimizer.safetensors", lambda old: old[:5000])),
        "optimizer.safetensors is truncated",
    ),
    Row("weights-not-safetensors", RESUME, damaged(write("checkpoint/model.safetensors", b"PK\x03\x04 zip")), RESTART),
    Row("weights-a-fifo", RESUME, damaged(special("checkpoint/model.safetensors", "fifo")), "is a named pipe (FIFO)"),
    Row("weights-float16", RESUME, damaged(float16_weights), 'must be one of "F32", got "F16"'),
    Row("weights-of-another-model", RESUME, damaged(foreign_weights), "is not this run's model (unexpected tensors"),
    Row("optimizer-of-another-model", RESUME, damaged(other_optimizer), "does not hold this model's optimizer state"),
    # the tokenizer
    Row("tokenizer-swapped", RESUME, damaged(swapped_tokenizer), "is not the tokenizer this run was trained with"),
    Row("tokenizer-deleted", RESUME, damaged(remove("tokenizer.model")), "tokenizer.model is missing: put the run's"),
    Row("tokenizer-a-fifo", RESUME, damaged(special("tokenizer.model", "fifo")), "is a named pipe (FIFO)"),
    Row("tokenizer-garbage", RESUME, damaged(write("tokenizer.model", b"not a model")), "is not a sentencepiece model"),
    base="run",
)

TEXT_ROWS = category(
    "train-text",
    Row(
        "val-text-shorter-than-context",
        (*NEW_RUN, "--val-text", "v.txt"),
        both(text, root_file("v.txt", b"the sea\n")),
        "too few for a window of --context 16 + 1: give a longer text",
    ),
    Row(
        "val-text-empty",
        (*NEW_RUN, "--val-text", "v.txt"),
        both(text, root_file("v.txt", b"\n")),
        "v.txt has 0 tokens",
    ),
    Row(
        "text-shorter-than-context",
        (*NEW_RUN, "--context", "4096"),
        text,
        "too few for a window of --context 4096 + 1",
    ),
    Row(
        "text-one-long-line",
        NEW_RUN,
        root_file("text.txt", b"word " * 20_000),
        "each of its lines is longer than 65,536 bytes, the most the tokenizer trainer reads as one line",
    ),
    Row(
        "text-long-lines-no-spaces",
        NEW_RUN,
        root_file("text.txt", (b"abcdefgh" * 9000 + b"\n") * 3),
        "put one document a line",
    ),
)

TRAINING_ROWS = RESUME_ROWS + TEXT_ROWS
