"""`openelm bench --prompt-lookup K` / `--draft-model M`: speculative against plain greedy decoding
on tiny checkpoints. Every count is checked against the others (model calls, drafted, accepted,
tokens), the greedy tokens are identical, the outputs hold the figures; bad options fail in one line."""

import csv
import json
import statistics

import pytest
from conftest import tiny_config

from openelm_mlx.apps.cli import main as cli_main
from openelm_mlx.benchmarks import bench, report, spec_subjects
from openelm_mlx.benchmarks.synthetic import random_weights, write_checkpoint
from openelm_mlx.errors import OpenELMError
from openelm_mlx.speculative import PromptLookup
from openelm_mlx.tokenizer import Tokenizer

G, TRIALS = 24, 2


@pytest.fixture(scope="module")
def draft_checkpoint(tmp_path_factory, tokenizer_file):
    config = tiny_config(layers=2)
    folder = tmp_path_factory.mktemp("draft") / "OpenELM-draft"
    return write_checkpoint(folder, config, random_weights(config, seed=7), tokenizer_file)


@pytest.fixture(scope="module")
def lookup(tiny_checkpoint):
    return bench.run_benchmark(
        [str(tiny_checkpoint)],
        ["fp32"],
        prompt_tokens=512,  # GPU's default; more than the context leaves
        generation_tokens=G,
        trials=TRIALS,
        prompt_lookup=4,
        progress=False,
    )


@pytest.fixture(scope="module")
def drafted(tiny_checkpoint, draft_checkpoint):
    return bench.run_benchmark(
        [str(tiny_checkpoint)],
        ["fp32"],
        prompt_tokens=32,
        generation_tokens=G,
        trials=TRIALS,
        draft_model=str(draft_checkpoint),
        num_draft=3,
        progress=False,
    )


def check_entry(e, tasks_prompt_tokens):
    """tasks_prompt_tokens: the prompt length of the free and copy tasks (short's is a few words, shorter)."""
    assert e["error"] is None and len(e["trials"]) == TRIALS
    assert e["prompt_kind"] == "text"
    assert (
        e["prompt_tokens"] == tasks_prompt_tokens
        if e["task"] != "short"
        else 1 < e["prompt_tokens"] < tasks_prompt_tokens
    )
    assert len(e["output_tokens"]) == G and isinstance(e["output_text"], str)
    for t in e["trials"]:
        plain, spec = t["plain"], t["speculative"]
        assert t["identical"] is True and sorted(t["order"]) == ["plain", "speculative"]
        assert plain["tokens"] == spec["tokens"] == G
        assert plain["model_calls"] == G and plain["tokens_per_call"] == 1
        # each verification call yields its accepted drafts plus one token of the model's own
        assert spec["model_calls"] == G - spec["accepted"]
        assert 0 <= spec["accepted"] <= spec["drafted"]
        if spec["drafted"]:
            assert spec["acceptance"] == pytest.approx(spec["accepted"] / spec["drafted"])
        for run in (plain, spec):
            assert run["decode_tps"] == pytest.approx((G - 1) / run["decode_s"])
            assert run["total_tps"] == pytest.approx(G / run["total_s"])
            assert run["total_s"] == pytest.approx(run["ttft_s"] + run["decode_s"])
        assert t["speedup"] == pytest.approx(spec["decode_tps"] / plain["decode_tps"])
    s = e["summary"]
    spec = [t["speculative"] for t in e["trials"]]
    assert s["identical"] is True and s["speedup"]["n"] == TRIALS
    assert s["speedup"]["median"] == pytest.approx(statistics.median(t["speedup"] for t in e["trials"]))
    assert s["plain_decode_tps"]["median"] == pytest.approx(
        statistics.median(t["plain"]["decode_tps"] for t in e["trials"])
    )
    assert s["tokens_per_call"] == pytest.approx(TRIALS * G / sum(r["model_calls"] for r in spec))
    # how much is drafted follows the times measured (DraftPolicy), so it may differ between trials
    assert s["drafted_per_trial"] == pytest.approx(statistics.fmean(r["drafted"] for r in spec))
    assert s["accepted_per_trial"] == pytest.approx(statistics.fmean(r["accepted"] for r in spec))


def test_prompt_lookup_entries(lookup, tiny_checkpoint):
    assert lookup["configurations"] == [] and lookup["settings"]["speculation"] == {
        "prompt_lookup": 4,
        "draft_model": None,
        "num_draft": None,
    }
    entries = lookup["speculation"]
    assert [(e["model"], e["precision"], e["task"], e["drafter"]) for e in entries] == [
        ("OpenELM-tiny", "fp32", task, "prompt lookup, K=4") for task in ("free", "copy", "short", "fresh")
    ]
    budget = 256 - G  # -p 512 does not fit: the prompt takes what the context leaves
    for e in entries:
        check_entry(e, budget)
    # the copy prompt is a passage followed by its first tokens (after BOS), so lookup drafts and is accepted
    tok = Tokenizer(tiny_checkpoint / "tokenizer.model")
    copy = tok.encode(spec_subjects.passages()[1])
    restart = budget // 4
    assert entries[1]["prompt"] == tok.decode(copy[: budget - restart] + copy[1 : 1 + restart])
    # Whether the policy drafts depends on measured step costs (a loaded machine may keep k = 0);
    # that lookup finds the restart in this prompt does not: it proposes the passage's next tokens.
    restarted = copy[: budget - restart] + copy[1 : 1 + restart]
    assert PromptLookup(4).propose(restarted, 4)[0] == copy[1 + restart : 5 + restart]
    assert entries[2]["prompt"] == tok.decode(tok.encode("Once upon a time"))  # openelm generate's default
    prompts = spec_subjects.task_prompts(tok, tok.vocab_size, budget, lookup["settings"]["seed"])
    assert [e["prompt"] for e in entries] == [tok.decode(prompts[e["task"]]) for e in entries]
    fresh, free = prompts["fresh"], prompts["free"]
    assert sorted(fresh) == sorted(free) and fresh[0] == 1 and fresh != free  # the free passage's tokens, shuffled


def test_draft_model_entries(drafted):
    assert drafted["settings"]["speculation"]["num_draft"] == 3
    for e in drafted["speculation"]:
        assert e["drafter"] == "OpenELM-draft, K=3"
        check_entry(e, 32)
        assert e["summary"]["drafted_per_trial"] > 0


def test_random_token_prompts():
    prompts = spec_subjects.task_prompts(None, 100, 20, seed=3)
    assert len(prompts["free"]) == len(prompts["copy"]) == 20
    assert prompts["copy"][15:] == prompts["copy"][:5] and min(prompts["free"] + prompts["copy"]) >= 3
    assert prompts["short"] == prompts["free"][:4]
    assert sorted(prompts["fresh"]) == sorted(prompts["free"]) and prompts["fresh"] != prompts["free"]
    assert spec_subjects.task_prompts(None, 100, 20, seed=3) == prompts  # seeded


def test_outputs_json_csv_markdown(lookup, tmp_path):
    written = report.write_results(lookup, tmp_path / "out")
    assert sorted(p.name for p in written) == ["results.csv", "results.json", "results.md"]  # no chart
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == lookup
    rows = list(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert [r["task"] for r in rows] == ["free", "copy", "short", "fresh"]
    for row, e in zip(rows, lookup["speculation"]):
        assert float(row["speedup_median"]) == pytest.approx(e["summary"]["speedup"]["median"])
        assert float(row["plain_decode_tps_median"]) > 0 and float(row["tokens_per_call"]) >= 1
        assert row["identical"] == "True"
    text = (tmp_path / "out" / "results.md").read_text()
    assert "prompt lookup (up to 4 drafted tokens)" in text
    assert "| plain tok/s | speculative tok/s | speed-up | acceptance | tokens/call | identical |" in text
    lines = [line for line in text.splitlines() if line.startswith("| OpenELM-tiny | fp32 (float32) |")]
    assert len(lines) == 4 and all(line.endswith("| yes |") for line in lines)
    assert "generation tok/s | TTFT" not in text  # no empty timing table


def test_failures_are_recorded_per_entry(tiny_checkpoint, draft_checkpoint):
    r = bench.run_benchmark(
        [str(tiny_checkpoint)], ["fp32"], generation_tokens=250, trials=1, prompt_lookup=2, progress=False
    )
    assert [e["task"] for e in r["speculation"]] == ["free", "copy", "short", "fresh"]
    assert all("-g 250 leaves 6 prompt tokens" in e["error"] for e in r["speculation"])
    r = bench.run_benchmark(["270M"], ["fp32"], trials=1, draft_model=str(draft_checkpoint), progress=False)
    assert all("a released size (random weights) takes a released size" in e["error"] for e in r["speculation"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_lookup=4, draft_model="270M"), "--prompt-lookup and --draft-model are alternatives"),
        (dict(num_draft=4), "--num-draft needs --draft-model"),
        (dict(prompt_lookup=0), "--prompt-lookup must be an integer from 1 to 64, got 0"),
        (dict(prompt_lookup=65), "--prompt-lookup must be an integer from 1 to 64, got 65"),
        (dict(draft_model="270M", num_draft=0), "--num-draft must be an integer from 1 to 64"),
        (
            dict(prompt_lookup=4, generation_tokens=1),
            "--generation-tokens must be an integer from 2 to 1,048,576 with speculation",
        ),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(OpenELMError, match=message):
        bench.run_benchmark(["270M"], ["fp32"], progress=False, **kwargs)


def test_package_backend_refused(tmp_path):
    with pytest.raises(OpenELMError, match="--backend coreai: speculative decoding is timed on MLX models only"):
        bench.run_benchmark([str(tmp_path / "x.aimodel")], backend="coreai", prompt_lookup=4, progress=False)


def test_cli_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "--prompt-lookup", "8", "--draft-model", "270M", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "alternatives" in err[0]
