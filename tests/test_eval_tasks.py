"""`openelm eval tasks`: our lm-eval model against mlx-lm's own lm-eval adapter (mlx_lm.evaluate's
MLXLM) on the same weights, the KV-cache reuse against scoring from scratch, a package runner
against MLX, and the command's outputs.

Settings aligned with mlx-lm's adapter, so that like is compared with like: both put BOS before
every context (mlx-lm through its tokenizer's add_bos_token, ours by default); both run in float32
(mlx-lm keeps the stored dtype, float16 for the demo model, so its model is cast); tasks' contexts
end without a space (lm-eval moves a trailing space to the continuation, mlx-lm does not).
"""

import io
import json
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import lm_eval
import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_clean_error
from lm_eval.tasks import TaskManager
from mlx_lm import generate as mlx_lm_generate
from mlx_lm.evaluate import MLXLM

from openelm_mlx import load
from openelm_mlx.apps import eval_model, eval_tasks
from openelm_mlx.apps.eval_model import ModelScorer, OpenELMLM, RunnerScorer, _log_softmax, task_spec
from openelm_mlx.apps.eval_tasks import DEMO_TASK, Row, paper_figure
from openelm_mlx.benchmarks.eval_packages import configuration_model, flippable
from openelm_mlx.benchmarks.make_demo_task import YAML, build_items
from openelm_mlx.convert.hf_to_mlx import convert
from openelm_mlx.convert.runner import open_runner
from openelm_mlx.loader import DEMO_MODEL

ITEMS = 24  # items of the local task: a few dozen


@pytest.fixture(scope="module")
def local_task(tmp_path_factory) -> Path:
    """A local YAML + JSONL task in a folder of its own: the first ITEMS items of the demo cloze,
    their contexts cut to the last 12 words, so that they fit the tiny model's context of 256 in
    its byte-heavy tokens (mlx-lm's adapter would not cut them to the model's context)."""
    folder = tmp_path_factory.mktemp("task")
    items = [json.loads(line) for line in DEMO_TASK.with_suffix(".jsonl").read_text().splitlines()[:ITEMS]]
    items = [{**item, "context": " ".join(item["context"].split()[-12:])} for item in items]
    (folder / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    yaml = DEMO_TASK.read_text().replace("demo_cloze.jsonl", "items.jsonl").replace("task: demo_cloze", "task: local")
    (folder / "local.yaml").write_text(yaml)
    return folder / "local.yaml"


@pytest.fixture(scope="module")
def tiny_mlx(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny random checkpoint as an MLX folder, which mlx-lm's loader reads too."""
    return convert(tiny_checkpoint, tmp_path_factory.mktemp("tiny") / "mlx")


def run_task(lm, task: Path, limit=None) -> dict:
    return lm_eval.simple_evaluate(
        model=lm, tasks=[task_spec(str(task))], task_manager=TaskManager(include_defaults=False), limit=limit
    )


def loglikelihoods(results: dict, task: str):
    """Each request's (loglikelihood, is_greedy), in lm-eval's order of items and choices."""
    return [tuple(r[0]) for s in results["samples"][task] for r in s["resps"]]


def ours(folder) -> OpenELMLM:
    model, tokenizer = load(folder)
    return OpenELMLM(ModelScorer(model), tokenizer, progress=False)


def theirs(folder) -> MLXLM:
    lm = MLXLM(str(folder), batch_size=1)
    lm._model.set_dtype(mx.float32)
    return lm


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_loglikelihoods_and_accuracy_equal_mlx_lm_adapter(request, which, local_task):
    folder = request.getfixturevalue("tiny_mlx") if which == "tiny" else DEMO_MODEL
    a, b = run_task(ours(folder), local_task), run_task(theirs(folder), local_task)
    mine, reference = loglikelihoods(a, "local"), loglikelihoods(b, "local")
    assert len(mine) == 4 * ITEMS
    assert max(abs(x[0] - y[0]) for x, y in zip(mine, reference)) <= 1e-4
    assert [x[1] for x in mine] == [bool(y[1]) for y in reference]
    for metric in ("acc,none", "acc_norm,none"):
        assert a["results"]["local"][metric] == b["results"]["local"][metric]
    if which == "demo":  # the demo model reads its held-out text: far above chance (25%)
        assert a["results"]["local"]["acc,none"] >= 0.5


def test_cache_reuse_equals_scoring_from_scratch():
    model, tokenizer = load(DEMO_MODEL)
    lm = OpenELMLM(ModelScorer(model), tokenizer, progress=False)
    items = [json.loads(line) for line in DEMO_TASK.with_suffix(".jsonl").read_text().splitlines()[:3]]
    for item in items:
        pairs = [lm.encode_pair(item["context"], " " + choice) for choice in item["choices"]]
        reused = lm.score_pairs(pairs)
        for (ctx, cont), (logprob, greedy) in zip(pairs, reused):
            logits = model(mx.array(ctx + cont[:-1])[None])[0, len(ctx) - 1 :].astype(mx.float32)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            scratch = sum(logprobs[i, t].item() for i, t in enumerate(cont))
            assert abs(logprob - scratch) <= 1e-4
            assert greedy == (mx.argmax(logprobs, axis=-1).tolist() == cont)


def test_rolling_loglikelihood_equals_mlx_lm_adapter():
    text = DEMO_MODEL.joinpath("validation.txt").read_text().split(". ")[0]  # shorter than the context
    request = [SimpleNamespace(args=(text,))]
    mine = ours(DEMO_MODEL).loglikelihood_rolling(request)
    reference = theirs(DEMO_MODEL).loglikelihood_rolling(request)
    assert abs(mine[0] - reference[0]) <= 1e-4


def test_long_text_is_scored_in_windows_of_the_context():
    """Every token scored once, in windows of the model's context (256), the last window a full
    one: the sum equals two forward passes over the same windows, made by hand."""
    lm = ours(DEMO_MODEL)
    line = DEMO_MODEL.joinpath("validation.txt").read_text().splitlines()[0]
    text = line[: len(line) // 2]  # two windows
    tokens = lm.tokenizer.encode(text, bos=False)
    n = len(tokens)
    assert 256 < n < 512
    total = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])[0]

    def logprobs(inputs, targets):
        logits = lm.scorer.model(mx.array(inputs)[None])[0, -len(targets) :].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sum(lp[i, t].item() for i, t in enumerate(targets))

    by_hand = logprobs([lm.tokenizer.bos_id] + tokens[:255], tokens[:256]) + logprobs(
        tokens[n - 257 : n - 1], tokens[256:]
    )
    assert abs(total - by_hand) <= 1e-3


def test_generate_until_equals_mlx_lm_greedy_cut_at_the_stop_string():
    lm, reference = ours(DEMO_MODEL), theirs(DEMO_MODEL)
    context = "And Joseph said unto them,"
    got = lm.generate_until([SimpleNamespace(args=(context, {"until": [". "], "max_gen_toks": 24}))])[0]
    tokens = lm.tokenizer.encode(context)
    full = mlx_lm_generate(reference._model, reference.tokenizer, tokens, max_tokens=24)
    # ours keeps the space that the text after the context starts with; mlx-lm's detokenizer drops
    # a first token's leading space
    assert ". " in full and got == " " + full[: full.index(". ")]


def test_package_runner_scores_as_mlx(tiny_checkpoint, exported):
    pytest.importorskip("coreai.runtime")
    package = exported("coreai", tiny_checkpoint, precision="float32")["output"]
    model, tokenizer = load(tiny_checkpoint)
    mlx_lm_ = OpenELMLM(ModelScorer(model), tokenizer, progress=False)
    runner_lm = OpenELMLM(RunnerScorer(open_runner(package, "coreai")), tokenizer, progress=False)
    pairs = [mlx_lm_.encode_pair("the quick brown fox jumps over the lazy", c) for c in (" dog", " sea and stars")]
    pairs.append(mlx_lm_.encode_pair("", "once upon a time"))
    for (a, greedy_a), (b, greedy_b) in zip(mlx_lm_.score_pairs(pairs), runner_lm.score_pairs(pairs)):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a)) and greedy_a == greedy_b


def test_command_writes_table_and_files(cli_here, tmp_path):
    out = tmp_path / "out"
    result = cli_here("eval", "tasks", "--limit", "4", "--out", out)
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "results.json").read_text())
    assert saved["bos"] and saved["backend"] == "mlx" and saved["source"] == "work-tmp/demo-run/model"
    acc = next(r for r in saved["results"] if r["task"] == "demo_cloze" and r["metric"] == "acc")
    assert acc["items"] == 4 and acc["value"] in (0.0, 25.0, 50.0, 75.0, 100.0) and acc["paper"] is None
    assert f"| demo_cloze | acc | {acc['value']:.2f} | ± {acc['stderr']:.2f} | 4 | 0 |  |" in result.stdout
    assert result.stdout.startswith((out / "results.md").read_text())  # the same table
    assert (out / "results.csv").read_text().splitlines()[0] == "task,metric,value,stderr,items,shots,paper"
    items = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [i["doc_id"] for i in items] == [0, 1, 2, 3] and 25 * sum(i["acc"] for i in items) == acc["value"]
    model, tokenizer = load(DEMO_MODEL)
    lm = OpenELMLM(ModelScorer(model), tokenizer, progress=False)
    task = [json.loads(line) for line in DEMO_TASK.with_suffix(".jsonl").read_text().splitlines()[:4]]
    for item, record in zip(task, items):  # each choice's loglikelihood and continuation tokens
        pairs = [lm.encode_pair(item["context"], " " + c) for c in item["choices"]]
        assert record["tokens"] == [len(cont) for _, cont in pairs]
        assert np.allclose(record["loglikelihoods"], [x for x, _ in lm.score_pairs(pairs)], atol=1e-4)
    assert_clean_error(cli_here("eval", "tasks", "--limit", "4", "--out", out), "already exists")


def test_package_backend_command_equals_mlx(cli_here, tiny_checkpoint, exported, local_task, tmp_path):
    """The same items scored through the Core AI runner and through MLX: the same accuracy."""
    pytest.importorskip("coreai.runtime")
    package = exported("coreai", tiny_checkpoint, precision="float32")["output"]
    results = {}
    for backend, model in (("coreai", package), ("mlx", tiny_checkpoint)):
        out = tmp_path / backend
        args = ("eval", "tasks", model, "--backend", backend, "--tasks", local_task, "--limit", "4", "--out", out)
        result = cli_here(*args)
        assert result.returncode == 0, result.stderr
        results[backend] = json.loads((out / "results.json").read_text())
    assert results["coreai"]["results"] == results["mlx"]["results"]
    assert results["coreai"]["backend"] == "coreai"


def test_include_path_names_local_tasks(cli_here, local_task, monkeypatch):
    """lm-eval's --include_path: tasks by name from a folder; its data_files as lm-eval reads them
    (relative to the current folder)."""
    monkeypatch.chdir(local_task.parent)
    result = cli_here("eval", "tasks", "--include-path", ".", "--tasks", "local", "--limit", "2")
    assert result.returncode == 0, result.stderr
    assert "| local | acc |" in result.stdout and "| 2 | 0 |" in result.stdout


def test_paper_figures_sit_beside_a_released_base_model():
    row = Row("arc_easy", "acc_norm", 44.0, 1.0, 100, 0)
    assert paper_figure("apple/OpenELM-270M", row) == 45.08
    assert paper_figure("apple/OpenELM-3B", replace(row, task="sciq", metric="acc")) == 92.70
    assert paper_figure("apple/OpenELM-270M", replace(row, metric="acc")) is None  # not the paper's metric
    assert paper_figure("apple/OpenELM-270M", replace(row, shots=5)) is None  # not zero-shot
    assert paper_figure("apple/OpenELM-270M-Instruct", row) is None  # Instruct: averages only
    assert paper_figure("me/OpenELM-270M", row) is None


def test_shipped_task_is_what_its_script_builds():
    items = [json.loads(line) for line in DEMO_TASK.with_suffix(".jsonl").read_text().splitlines()]
    assert items == build_items(DEMO_MODEL.joinpath("validation.txt").read_text())
    assert DEMO_TASK.read_text() == YAML
    assert len(items) == 300 and all(len(item["choices"]) == 4 for item in items)
    assert all(item["choices"].count(item["choices"][item["label"]]) == 1 for item in items)


def runner_and_backend(kind, tiny_checkpoint, exported, compress="none", precision="float16"):
    pytest.importorskip("coreai.runtime" if kind == "coreai" else "coremltools")
    package = exported(kind, tiny_checkpoint, compress, precision)["output"]
    backend = "coreai" if kind == "coreai" else "mil-reference"
    return open_runner(package, backend), package, backend


@pytest.mark.parametrize("kind", ["coreai", "coreml"])
def test_runner_rewind_equals_scoring_each_continuation_from_scratch(tiny_checkpoint, exported, kind):
    """The context prefilled once, each continuation after a rewind to it (the longest first, so
    that the others run over its stale cache slots): the same numbers as a fresh sequence each."""
    runner, _, _ = runner_and_backend(
        kind, tiny_checkpoint, exported, precision="float32" if kind == "coreai" else "float16"
    )
    _, tokenizer = load(tiny_checkpoint)
    lm = OpenELMLM(RunnerScorer(runner), tokenizer, progress=False)
    conts = [" sea and the stars", " dog", " lazy fox"]
    pairs = [lm.encode_pair("the quick brown fox jumps over the", c) for c in conts]
    context = pairs[0][0]
    reused = lm.scorer.score(context, [cont for _, cont in pairs])
    for (_, cont), (logprob, greedy) in zip(pairs, reused):
        runner.reset()
        logprobs = [_log_softmax(x) for x in [runner.prefill(context)] + [runner.decode(t) for t in cont[:-1]]]
        assert logprob == sum(float(lp[t]) for lp, t in zip(logprobs, cont))
        assert greedy == all(int(np.argmax(lp)) == t for lp, t in zip(logprobs, cont))


PACKAGE_ITEMS = 3  # of the local task, through a package runner (one in float16 on Apple's runtime: ~5 s an item)


@pytest.mark.parametrize(
    "kind, compress, precision",
    [("coreai", "none", "float32"), ("coreai", "int4", "float16"), ("coreml", "none", "float16")],
)
def test_package_loglikelihoods_within_its_tolerance(tiny_checkpoint, exported, local_task, kind, compress, precision):
    """Every request of the local task through the package's runner against MLX (float32) on the
    package's own weights (as verify compares, apart from compression): |Δ loglikelihood| at most
    2 t k for a continuation of k tokens, t the logits tolerance verify holds the package to
    (logits_rtol times the largest |logit| of the request), as eval_packages' bound assumes."""
    runner, package, backend = runner_and_backend(kind, tiny_checkpoint, exported, compress, precision)
    source, tokenizer = load(tiny_checkpoint)
    reference, rtol = configuration_model({"model": str(package), "backend": backend}, source)
    scorer = ModelScorer(reference)
    scorer.context = runner.info.context  # contexts cut as the package's (EXPORT_CONTEXT)
    mlx_lm_, package_lm = (
        OpenELMLM(scorer, tokenizer, progress=False),
        OpenELMLM(RunnerScorer(runner), tokenizer, progress=False),
    )
    lines = local_task.with_name("items.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines[: 1 if kind == "coreai" and precision == "float16" else PACKAGE_ITEMS]]
    worst = 0.0
    for item in items:
        pairs = [mlx_lm_.encode_pair(item["context"], " " + choice) for choice in item["choices"]]
        context = mlx_lm_._fit(pairs[0][0], [cont for _, cont in pairs])
        for (_, cont), (a, _), (b, _) in zip(pairs, mlx_lm_.score_pairs(pairs), package_lm.score_pairs(pairs)):
            logits = reference(mx.array([context + cont[:-1]]))[0]
            t = rtol * max(1.0, mx.abs(logits).max().item())
            worst = max(worst, abs(a - b) / (2 * t * len(cont)))
    assert worst <= 1.0
    if precision == "float32":  # float32 is far inside its tolerance (summation order only)
        assert worst <= 0.1


def test_flippable_bounds_the_answers_a_logit_error_can_change():
    """Random items of 4 choices of 1-4 tokens, scored from random logits, then from the same
    logits moved by t per entry, each choice's tokens up or down: every item whose answer changes
    is one flippable() names (so |Δacc| <= flippable / N), for several t (5 of 7 flippable items
    change at t = 0.02, 22 of 106 at 0.3). Also the margin rule at its edge."""
    rng = np.random.default_rng(0)
    vocab, n = 50, 400

    def logsoftmax(x):
        return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))

    for t in (0.02, 0.1, 0.3):
        items, changed = [], []
        for _ in range(n):
            choices = []
            for _ in range(4):
                k = int(rng.integers(1, 5))
                logits = rng.normal(0, 2, (k, vocab))
                tokens = rng.integers(0, vocab, k)
                # the worst case within t: the token's own logit one way, every other the other way
                noise = np.full((k, vocab), -t) * rng.choice([-1, 1])
                noise[np.arange(k), tokens] *= -1
                choices.append(
                    (
                        k,
                        logsoftmax(logits)[np.arange(k), tokens].sum(),
                        logsoftmax(logits + noise)[np.arange(k), tokens].sum(),
                    )
                )
            ll, moved = [c[1] for c in choices], [c[2] for c in choices]
            items.append({"loglikelihoods": ll, "tokens": [c[0] for c in choices]})
            changed.append(np.argmax(ll) != np.argmax(moved))  # the answer (so acc can change)
        flags = flippable(items, t)
        assert not any(c and not f for c, f in zip(changed, flags))
        assert 0 < sum(changed) <= sum(flags) < n  # some answers change, all of them flippable
    edge = [{"loglikelihoods": [-1.0, -2.0, -5.0], "tokens": [1, 1, 2]}]
    assert flippable(edge, 0.2) == [False] and flippable(edge, 0.25) == [True]  # margin 1 = 2 t (1 + 1)


def test_paper_preset_selects_its_tasks_and_shots_with_bos(monkeypatch):
    """--paper offline (its data is on the Hub): the tasks and shot counts it hands lm-eval, with
    BOS before every context."""
    seen = []

    def fake_run(lm, specs, manager, shots, limit, seed):
        seen.append((lm.add_bos, specs, shots))
        return {"results": {}, "n-samples": {}}

    monkeypatch.setattr(eval_model, "load_tasks", lambda names, include_path: (names, None))
    monkeypatch.setattr(eval_model, "run_tasks", fake_run)
    monkeypatch.setattr(eval_model, "open_scorer", lambda *a: (None, None, "apple/OpenELM-270M"))
    for preset, want in (
        ("zero-shot", [(True, ["arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande"], 0)]),
        (
            "few-shot",
            [
                (True, ["mmlu", "winogrande"], 5),
                (True, ["arc_challenge"], 25),
                (True, ["hellaswag"], 10),
                (True, ["truthfulqa_mc2"], 0),
            ],
        ),
    ):
        seen.clear()
        args = dict(model=None, tasks=None, paper=preset, num_fewshot=None, limit=None, backend="mlx", tokenizer=None)
        args.update(dtype="auto", no_bos=False, include_path=None, seed=1234, out=None, force=False, json=False)
        eval_tasks.main(SimpleNamespace(**args))
        assert seen == want


def test_progress_bar_moves_on_a_terminal(monkeypatch):
    """On a terminal (stderr a tty) a bar counts the contexts as they are scored; elsewhere none."""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    model, tokenizer = load(DEMO_MODEL)
    pairs = [([1, 50 + i], [60 + i]) for i in range(3)]
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        OpenELMLM(ModelScorer(model), tokenizer).score_pairs(pairs)
        text = stream.getvalue()
        assert ("loglikelihood:   0%" in text and "3/3" in text) if drawn else text == ""


def test_a_name_no_task_file_holds_is_refused_before_the_index(tmp_path, monkeypatch):
    """eval_model.refuse_unmentioned reads lm-eval's task files as text: a name none holds is one
    line with the close ones, at once; every name a file declares (task, group, a tag list's
    items), any name found inside another, and every name when a file cannot be read, is left to
    TaskManager's index."""
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "arc_easy.yaml").write_text(
        "tag:\n  - ai2_arc\ntask: arc_easy\ndataset_path: allenai/ai2_arc\n"
    )
    (tmp_path / "mmlu.yaml").write_text("group: mmlu\ntask:\n  - mmlu_stem\n")
    monkeypatch.setattr(eval_model, "LM_EVAL_TASKS", tmp_path)
    eval_model.refuse_unmentioned(["arc_easy", "ai2_arc", "mmlu", "mmlu_stem", "arc", "allenai"])
    with pytest.raises(eval_model.OpenELMError) as e:
        eval_model.refuse_unmentioned(["mmlu", "arc_easyy"])
    assert str(e.value).startswith("unknown task 'arc_easyy' (close: arc_easy): give an lm-eval task name")

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(eval_model.Path, "read_bytes", unreadable)  # root reads any file: a denial is faked
    eval_model.refuse_unmentioned(["arc_easyy"])  # a file it cannot read may hold the name: left to the index
