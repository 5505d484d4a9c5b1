"""`openelm train` and `openelm eval ppl` on a tiny model: exact resume, refusals, export, and the
perplexity arithmetic against a direct numpy computation."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from conftest import run_cli

from openelm_mlx import load
from openelm_mlx.apps import train as train_app
from openelm_mlx.apps.cli import main as cli
from openelm_mlx.apps.corpus import VERSE, split
from openelm_mlx.apps.eval import perplexity, unigram_perplexity
from openelm_mlx.apps.train import TrainConfig
from openelm_mlx.apps.train_data import encode_documents
from openelm_mlx.benchmarks.synthetic import TEXT
from openelm_mlx.errors import OpenELMError

TINY = dict(
    layers=2,
    model_dim=128,
    head_dim=16,
    vocab_size=320,
    context=32,
    batch_size=4,
    steps=12,
    warmup=3,
    learning_rate=3e-3,
)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    (folder / "train.txt").write_text(TEXT * 30)
    (folder / "val.txt").write_text(TEXT)
    return folder / "train.txt", folder / "val.txt"


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, texts):
    output = tmp_path_factory.mktemp("runs") / "straight"
    train_app.train(texts[0], output, val_text=texts[1], checkpoint_every=6, eval_every=6, **TINY)
    return output


def weights_of(folder):
    return mx.load(str(folder / "model" / "model.safetensors"))


def test_training_lowers_the_loss_and_exports_a_loadable_model(straight_run):
    state = json.loads((straight_run / "train_state.json").read_text())
    losses = [loss for _, loss in state["train_loss"]]
    assert state["step"] == 12 and len(losses) == 12
    assert losses[-1] < losses[0] - 0.5
    assert [step for step, _ in state["val_loss"]] == [6, 12]
    model_folder = straight_run / "model"
    assert json.loads((model_folder / "config.json").read_text())["converted_by"]["source"] == "straight"
    assert "chat_template" not in json.loads((model_folder / "tokenizer_config.json").read_text())
    model, tokenizer = load(model_folder)
    c = model.config
    assert (c.vocab_size, c.bos_token_id, c.eos_token_id) == (tokenizer.vocab_size, 1, 2)
    assert len(set(c.ffn_dims)) == 2 and all(d % 64 == 0 for d in c.ffn_dims)


def test_warmup_defaults_to_a_tenth_of_a_short_run(tmp_path, texts):
    """`train --steps 20` used to fail on the default --warmup 40; the demo recipe keeps its 40 of 500."""
    assert [TrainConfig(steps=n).warmup for n in (20, 500, 1000, 5)] == [2, 40, 40, 0]
    assert TrainConfig(steps=20, warmup=0).warmup == 0
    sizes = {k: v for k, v in TINY.items() if k not in ("steps", "warmup", "learning_rate")}
    options = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()]
    result = run_cli("train", tmp_path / "run", "--text", texts[0], "--steps", "20", *options)
    assert result.returncode == 0, result.stderr
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert state["config"]["warmup"] == 2 and state["step"] == 20
    assert "(default: min(40, steps / 10))" in " ".join(run_cli("train", "--help").stdout.split())


def test_interrupted_run_resumes_exactly(tmp_path, texts, straight_run, monkeypatch):
    output = tmp_path / "resumed"
    real_batch_at = train_app.batch_at

    def interrupt_at_step_8(tokens, step, *args):
        if step == 8:
            raise KeyboardInterrupt
        return real_batch_at(tokens, step, *args)

    monkeypatch.setattr(train_app, "batch_at", interrupt_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train_app.train(texts[0], output, val_text=texts[1], checkpoint_every=6, eval_every=6, **TINY)
    monkeypatch.setattr(train_app, "batch_at", real_batch_at)
    train_app.train(texts[0], output, val_text=texts[1], resume=True, checkpoint_every=6, eval_every=6, **TINY)

    expected, got = weights_of(straight_run), weights_of(output)
    assert expected.keys() == got.keys()
    for name in expected:
        assert mx.array_equal(expected[name], got[name]), name


def test_a_diverged_run_stops_and_its_checkpoint_stays_valid(tmp_path, texts, monkeypatch):
    """A NaN loss stops the run with one error; the last checkpoint (and its JSON) stays resumable."""
    output, real_loss = tmp_path / "diverged", train_app.loss_fn

    def nan_after_step_6(model, batch):
        step = (
            json.loads((output / "train_state.json").read_text())["step"]
            if (output / "train_state.json").exists()
            else 0
        )
        return real_loss(model, batch) * (float("nan") if step >= 6 else 1.0)

    monkeypatch.setattr(train_app, "loss_fn", nan_after_step_6)
    monkeypatch.setattr(mx, "compile", lambda fun, **kwargs: fun)  # a traced step would not see the switch
    with pytest.raises(OpenELMError, match="the training loss is nan at step 7: the run diverged"):
        train_app.train(texts[0], output, checkpoint_every=6, **TINY)
    state = json.loads((output / "checkpoint" / "train_state.json").read_text())  # strict JSON: no NaN
    assert state["step"] == 6 and all(math.isfinite(loss) for _, loss in state["train_loss"])


def test_refusals(tmp_path, texts, straight_run):
    with pytest.raises(OpenELMError, match="not empty"):
        train_app.train(texts[0], straight_run, **TINY)
    with pytest.raises(OpenELMError, match="other settings"):
        train_app.train(texts[0], straight_run, resume=True, **{**TINY, "learning_rate": 1e-3})
    with pytest.raises(OpenELMError, match="no train_state.json"):
        train_app.train(texts[0], tmp_path / "new", resume=True, **TINY)
    with pytest.raises(
        OpenELMError, match=r"cannot train the tokenizer on .*val.txt: Vocabulary size too high \(50000\)"
    ):
        train_app.train(texts[1], tmp_path / "big-vocab", **{**TINY, "vocab_size": 50000})
    with pytest.raises(OpenELMError, match="no text file"):
        train_app.train(tmp_path / "missing.txt", tmp_path / "new", **TINY)


def test_force_never_deletes_the_training_text_and_one_run_per_folder(tmp_path, texts):
    from openelm_mlx.apps.train_checkpoint import lock_run

    run = tmp_path / "run"
    run.mkdir()
    text = run / "train.txt"  # the user keeps the text inside the run folder
    text.write_bytes(texts[0].read_bytes())
    with pytest.raises(OpenELMError, match="which this run reads"):
        train_app.train(text, run, force=True, **TINY)
    assert text.read_bytes() == texts[0].read_bytes()
    busy = tmp_path / "busy"
    busy.mkdir()
    with lock_run(busy):  # another `openelm train` is writing there
        for retry in ({"force": True}, {}):
            with pytest.raises(OpenELMError, match="another `openelm train` is writing"):
                train_app.train(texts[0], busy, **retry, **TINY)
    assert [p.name for p in busy.iterdir()] == [".openelm-train.lock"]


def direct_nll(model, tokens, context):
    """Sum of -log p over every token but the first, window by window, with numpy softmax."""
    total = 0.0
    for s in range(0, len(tokens) - 1, context):
        window = tokens[s : s + context + 1]
        logits = np.array(model(mx.array(window[None, :-1]))[0], dtype=np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        total -= logp[np.arange(len(window) - 1), window[1:]].sum()
    return total


def test_perplexity_matches_direct_computation(straight_run, texts):
    model, tokenizer = load(straight_run / "model")
    text = texts[1].read_text()
    tokens = encode_documents(tokenizer, text)
    assert 40 < len(tokens) < 400
    result = perplexity(model, tokenizer, text, context=16, batch_size=3)
    assert result.tokens == len(tokens) - 1
    assert result.loss == pytest.approx(direct_nll(model, tokens, 16) / (len(tokens) - 1), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    cut = perplexity(model, tokenizer, text, context=16, max_tokens=20)
    assert cut.tokens == 20
    assert cut.loss == pytest.approx(direct_nll(model, tokens[:21], 16) / 20, rel=1e-5)


def test_unigram_perplexity():
    assert unigram_perplexity(np.array([3, 5, 7, 9])) == pytest.approx(4.0)
    assert unigram_perplexity(np.array([1, 1, 1, 2])) == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    )


def test_eval_cli(straight_run, texts, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli(["eval", "ppl", "--model", str(straight_run / "model"), "--text", str(texts[1]), "--context", "16"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    model, tokenizer = load(straight_run / "model")
    expected = perplexity(model, tokenizer, texts[1].read_text(), context=16)
    assert f"perplexity: {expected.perplexity:.3f}" in out
    assert f"unigram baseline (same tokenizer and tokens): {expected.unigram:.3f}" in out

    with pytest.raises(SystemExit) as exit_info:
        cli(["eval", "ppl", "--model", str(straight_run / "model"), "--text", str(texts[1]), "--context", "999"])
    assert exit_info.value.code == 1
    assert "exceeds the model's context of 32" in capsys.readouterr().err


def test_corpus_split_holds_out_every_40th_chapter():
    chapters = [f"chapter {i}" for i in range(100)]
    train, validation = split(chapters)
    assert validation == ["chapter 39", "chapter 79"]
    assert len(train) == 98 and not set(train) & set(validation)
    assert VERSE.match("1Sm3:4 That the LORD called Samuel").groups() == (
        "1Sm",
        "3",
        "4",
        "That the LORD called Samuel",
    )
