"""Speculative decoding is lossless: greedy text equal to plain decoding, token for token, and
sampled tokens distributed as the model's own distribution (a chi-square test over many seeds
against the exact probabilities). Also mlx-lm's quantized KV cache driving our model."""

import importlib
import math
import time
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_config
from mlx_lm.generate import generate_step
from mlx_lm.models import openelm as mlx_lm_openelm

from openelm_mlx import Model, OpenELMConfig, generate, load
from openelm_mlx.benchmarks.synthetic import random_weights, write_checkpoint
from openelm_mlx.cache import make_cache
from openelm_mlx.generate import GenerationOptions, GenerationStats, generate_tokens, speculate, stream_generate
from openelm_mlx.sample import Sampling
from openelm_mlx.speculative import (
    ACCEPT_WEIGHT,
    CATCH_UP,
    MAX_RUN,
    MIN_RUN,
    OUTLIER,
    PRIOR_ROW,
    PROBE_SHARE,
    TIME_WEIGHT,
    DraftModel,
    DraftPolicy,
    PromptLookup,
)

PROMPTS = ["Once upon a time", "the sea and the stars and the sea and the", "In the beginning"]


@pytest.fixture(scope="module")
def target(tiny_checkpoint):
    return load(tiny_checkpoint)


@pytest.fixture(scope="module")
def draft_checkpoint(tmp_path_factory, tokenizer_file):
    """A smaller model (2 layers, other random weights) with the same tokenizer."""
    config = tiny_config(layers=2)
    return write_checkpoint(
        tmp_path_factory.mktemp("draft") / "OpenELM-draft", config, random_weights(config, seed=7), tokenizer_file
    )


@pytest.mark.parametrize("k", [1, 3, 8])
def test_prompt_lookup_greedy_equals_plain_decoding(target, k):
    model, tok = target
    for prompt in PROMPTS:
        plain = [c.token for c in stream_generate(model, tok, prompt, GenerationOptions(max_tokens=40))]
        chunks = list(stream_generate(model, tok, prompt, GenerationOptions(max_tokens=40, prompt_lookup=k)))
        assert [c.token for c in chunks] == plain
    assert chunks[-1].stats.drafted > 0  # the repetitive prompt gets drafts


def test_draft_model_greedy_equals_the_target_alone(target, draft_checkpoint):
    model, tok = target
    draft, _ = load(draft_checkpoint)
    for prompt in PROMPTS:
        alone = generate(model, tok, prompt, max_tokens=30)
        chunks = list(
            stream_generate(model, tok, prompt, GenerationOptions(max_tokens=30, num_draft=3), draft_model=draft)
        )
        assert "".join(c.text for c in chunks) == alone
        assert chunks[-1].stats.drafted > 0


def test_a_quantized_copy_drafts_for_its_float_self_where_it_is_cheaper(target, tiny_checkpoint, tmp_path, monkeypatch):
    """The usual pairing when no smaller model exists: it agrees often, and the text is the target's.
    On a CPU it costs what its float self costs (share 1: never probed, plain decoding); where
    decoding reads the weights it is priced by bytes and drafts. (8-bit here: the random tiny
    model's near-flat logits make 4-bit flip its greedy picks.)"""
    from openelm_mlx.convert.hf_to_mlx import convert
    from openelm_mlx.speculative import DraftModel

    model, tok = target
    draft, _ = load(convert(tiny_checkpoint, tmp_path / "q8", bits=8))
    alone = generate(model, tok, PROMPTS[0], max_tokens=30)
    for bytes_priced in (False, True):
        if bytes_priced:  # as on a GPU: an 8-bit copy of a float32 model, a quarter of its bytes and more
            monkeypatch.setattr(DraftModel, "share", lambda self, model: 0.3)
        options = GenerationOptions(max_tokens=30)
        chunks = list(stream_generate(model, tok, PROMPTS[0], options, draft_model=draft))
        assert "".join(c.text for c in chunks) == alone
        stats = chunks[-1].stats
        assert stats.drafted > 0 if bytes_priced else stats.drafted == 0
        assert stats.accepted >= 0.8 * stats.drafted


def test_a_draft_models_share_is_its_parameters_on_a_cpu(target, tiny_checkpoint, tmp_path):
    from openelm_mlx.convert.hf_to_mlx import convert
    from openelm_mlx.sample import Sampling
    from openelm_mlx.speculative import DraftModel, weight_bytes

    model, _ = target
    draft, _ = load(convert(tiny_checkpoint, tmp_path / "q4", bits=4))
    assert DraftModel(draft, Sampling(), 4).share(model) == 1.0  # the same parameters
    assert weight_bytes(draft) < weight_bytes(model) / 3  # what a GPU's decoding reads instead


def test_demo_model_prompt_lookup_cli_is_byte_identical():
    """`openelm generate --prompt-lookup 8` on the shipped model: the same bytes as plain
    decoding, and the statistics line reports the drafts."""
    from conftest import run_cli

    plain = run_cli("generate", "--max-tokens", "80")
    lookup = run_cli("generate", "--max-tokens", "80", "--prompt-lookup", "8")
    assert plain.returncode == lookup.returncode == 0, lookup.stderr
    assert lookup.stdout == plain.stdout and len(plain.stdout) > 100
    assert "drafted tokens accepted" in lookup.stderr


# --- sampling keeps the model's distribution ------------------------------------------------

VOCAB = 12
PROMPT = [1, 3, 4, 5, 3, 4, 5, 3, 4]  # "3 4" recurs: prompt lookup drafts 5, 3, ...
RUNS = 1000


def small_model(seed: int, layers: int = 2) -> Model:
    """A random model with a tiny vocabulary (so the joint of two tokens has 144 outcomes) and
    logits scaled so that the distributions are neither flat nor certain."""
    config = OpenELMConfig.layerwise(layers, 32, 8, vocab_size=VOCAB, ffn_dim_divisor=8, max_context_length=64)
    mx.random.seed(seed)
    model = Model(config)
    emb = model.transformer.token_embeddings
    emb.weight = emb.weight * 0.7
    mx.eval(model.parameters())
    return model


def exact_pairs(model: Model, temp: float) -> np.ndarray:
    """P(first two generated tokens = (a, b)), computed from the model's logits."""

    def probs(tokens):
        logits = model(mx.array([tokens]))[0, -1].astype(mx.float32) / temp
        return np.array(mx.softmax(logits))

    p1 = probs(PROMPT)
    return np.stack([p1[a] * probs(PROMPT + [a]) for a in range(VOCAB)])


def chi_square_passes(counts: Counter, expected_p: np.ndarray, n: int) -> bool:
    """Pearson's test at p = 0.001 (cells expected below 5 pooled); the critical value from the
    Wilson-Hilferty approximation of the chi-square quantile."""
    observed = np.zeros_like(expected_p)
    for (a, b), c in counts.items():
        observed[a, b] = c
    expected = expected_p * n
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    stat = ((obs - exp) ** 2 / np.maximum(exp, 1e-12)).sum()
    df = len(obs) - 1
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3
    return stat < critical


def sampled_pairs(model: Model, make_drafter, temp: float) -> Counter:
    sampling = Sampling(temp=temp)
    counts = Counter()
    for seed in range(RUNS):
        mx.random.seed(seed)
        drafter = make_drafter()
        tokens = speculate(model, PROMPT, make_cache(model), 2, sampling, drafter, GenerationStats())
        counts[(next(tokens), next(tokens))] += 1
    return counts


@pytest.mark.parametrize("drafter", ["prompt-lookup", "draft-model"])
def test_sampling_with_speculation_keeps_the_model_distribution(drafter):
    model = small_model(seed=0)
    temp = 0.8
    draft = small_model(seed=1, layers=1)
    make = {
        "prompt-lookup": lambda: PromptLookup(4),
        "draft-model": lambda: DraftModel(draft, Sampling(temp=temp), 2),
    }[drafter]
    exact = exact_pairs(model, temp)
    assert exact.max() < 0.5 and (exact > 0.005).sum() > 20  # a distribution worth testing
    assert chi_square_passes(sampled_pairs(model, make, temp), exact, RUNS)


def test_the_chi_square_test_catches_a_biased_sampler(monkeypatch):
    """The test above has power: drafts kept without the acceptance rule fail it."""
    gen = importlib.import_module("openelm_mlx.generate")  # the package's `generate` is the function

    def keep_every_draft(logprobs, draft, q, sampling):
        return draft + [sampling.sample(logprobs[len(draft) :]).item()]

    model = small_model(seed=0)
    monkeypatch.setattr(gen, "verify", keep_every_draft)
    biased = sampled_pairs(model, lambda: PromptLookup(4), 0.8)
    assert not chi_square_passes(biased, exact_pairs(model, 0.8), RUNS)


# --- mlx-lm driving our model ---------------------------------------------------------------


def test_mlx_lm_quantized_kv_cache_matches_mlx_lm_openelm():
    """generate_step(..., kv_bits=8) on our model gives mlx-lm's OpenELM's tokens and logits."""
    config = OpenELMConfig.layerwise(3, 128, 32, vocab_size=384, ffn_dim_divisor=32, max_context_length=256)
    weights = [(k, mx.array(v)) for k, v in random_weights(config, seed=3).items()]
    ours = Model(config)
    ours.load_weights(weights)
    ref = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict(config.to_dict()))
    ref.load_weights(weights)
    prompt = mx.array(np.random.default_rng(0).integers(0, config.vocab_size, 20))

    def run(model):
        steps = generate_step(prompt, model, max_tokens=12, kv_bits=8, kv_group_size=32, quantized_kv_start=0)
        return [(token, logprobs) for token, logprobs in steps]

    a, b = run(ours), run(ref)
    assert [t for t, _ in a] == [t for t, _ in b]
    assert max(mx.abs(x - y).max().item() for (_, x), (_, y) in zip(a, b)) <= 1e-4


def test_plain_loop_feeds_every_token_but_the_last():
    """generate_tokens leaves the cache at prompt + generated - 1: the last token is never fed."""
    model = small_model(seed=0)
    cache = make_cache(model)
    out = list(generate_tokens(model, PROMPT, cache, 5, Sampling()))
    assert len(out) == 5 and cache[0].offset == len(PROMPT) + 4


# --- the draft policy: E(k) / T(k) on synthetic costs and acceptances -----------------------


def policy_with(size, plain, rows, acceptance, free=True):
    """A policy that has timed a plain step (`plain` s) and every k (plain + k * rows s), and has
    seen each draft position accepted at `acceptance`."""
    policy = DraftPolicy(size, free)
    policy.seconds = [plain + k * rows for k in range(size + 1)]
    policy.acceptance = [acceptance] * size
    policy.probe = False  # past its first step
    return policy


@pytest.mark.parametrize(
    "rows, acceptance, k",
    [
        (1.0, 0.95, 0),  # every row as dear as a step: even a near-certain draft loses
        (0.55, 0.3, 0),  # reference BLAS, a text the drafter guesses badly: plain decoding
        (0.55, 0.5, 0),  # E(1) = 1.5 tokens for 1.55 steps' time: still plain
        (0.55, 0.6, 1),  # E(1) = 1.6 for 1.55, E(2) = 1.96 for 2.1
        (0.55, 0.95, 4),  # a loop: longer drafts, until a row's cost outweighs 0.95^k
        (0.05, 0.6, 4),  # OpenBLAS, rows nearly free: longer drafts at the same acceptance
        (0.05, 0.95, 8),
    ],
)
def test_policy_drafts_the_k_with_most_tokens_per_second(rows, acceptance, k):
    policy = policy_with(8, 0.01, 0.01 * rows, acceptance)
    rates = [policy.expected_tokens(j) / policy.step_seconds(j) for j in range(9)]
    assert policy.draft_length(room=100) == k == rates.index(max(rates))


def test_policy_expected_tokens_and_step_seconds():
    policy = DraftPolicy(4, free=True)
    policy.acceptance = [0.8, 0.5, 0.5, 0.5]
    assert policy.expected_tokens(0) == 1 and policy.expected_tokens(2) == pytest.approx(1 + 0.8 + 0.4)
    policy.seconds = [1.0, None, 3.0, None, None]
    assert policy.step_seconds(1) == 2.0  # interpolated between the k measured
    assert policy.step_seconds(4) == 3.0 + 2 * PRIOR_ROW  # beyond one timed k: PRIOR_ROW of a plain step per row
    policy.seconds = [1.0, 1.5, 2.0, None, None]
    assert policy.step_seconds(4) == 3.0  # beyond two: their slope


@pytest.mark.parametrize("share, k", [(0.0, 4), (0.1, 4), (1.0, 0)])
def test_policy_prices_an_untimed_draft_model_step_at_its_share_of_the_parameters(share, k):
    """A draft model as big as its target is not tried on the prior alone; a small one is."""
    policy = DraftPolicy(4, free=False, draft_share=share)
    policy.seconds, policy.probe = [0.01, None, None, None, None], False
    policy.acceptance = [0.95] * 4
    assert policy.step_seconds(1) == pytest.approx(0.01 * (1 + PRIOR_ROW + share))
    assert policy.draft_length(room=100) == k


def test_policy_never_probes_a_draft_model_that_cannot_pay():
    """A draft model as dear per step as the model (share 1) loses even with every draft accepted:
    plain runs only, no probe."""
    policy = DraftPolicy(4, free=False, draft_share=1.0)
    for _ in range(3):
        assert policy.draft_length(room=100) == 0 and not policy.probing and policy.run == MAX_RUN
        policy.plain(policy.run, policy.run * 0.01, chosen=True)


def test_policy_starts_a_draft_model_with_a_plain_run_then_probes():
    policy = DraftPolicy(4, free=False, draft_share=0.4)
    assert policy.draft_length(room=100) == 0 and policy.run == MIN_RUN
    policy.plain(MIN_RUN, MIN_RUN * 0.01, chosen=True)
    assert policy.draft_length(room=100) == 1 and policy.probing
    policy.drafted(1, 0.05)  # a catch-up on MIN_RUN tokens: 0.04 s more than a plain step, 0.16 s for CATCH_UP
    assert policy.draft_length(room=100) == 0 and policy.run == MAX_RUN


def test_policy_keeps_a_first_timed_step_whole():
    """OUTLIER caps a time against a measured estimate; the first one has none (the prior would
    make a dear draft model look cheap for good)."""
    policy = DraftPolicy(4, free=False, draft_share=0.1)
    policy.seconds, policy.timed, policy.probe = [0.01, None, None, None, None], [True] * 5, False
    policy.drafted(1, 0.05)
    assert policy.seconds[1] == 0.05


def test_policy_never_extrapolates_a_dear_draft_model_as_cheap():
    """A draft model as big as its target (a 4-bit self-draft on a CPU): a 1-token draft costs
    T(0) + a draft step + a row; longer drafts are not assumed to cost PRIOR_ROW per token."""
    policy = DraftPolicy(4, free=False)
    policy.seconds, policy.probe = [0.01, 0.025, None, None, None], False
    policy.acceptance = [0.95] * 4
    assert policy.step_seconds(4) == pytest.approx(0.01 + 4 * 0.015)
    assert policy.draft_length(room=100) == 0


def test_policy_probes_first_then_times_plain_decoding_and_no_first_step_of_a_k():
    policy = DraftPolicy(4, free=True)
    assert policy.draft_length(room=100) == 1  # the first step: a probe
    policy.drafted(1, 9.0)
    policy.observe([5], [6])  # rejected: the model's token was 6
    assert policy.draft_length(room=100) == 0  # T(0) unknown: a plain run
    policy.plain(8, 0.08, chosen=True)
    assert policy.seconds[0] == pytest.approx(0.01)  # per token
    policy.drafted(4, 9.0)  # a new shape's first pass: not timed
    policy.observe([5, 6, 7, 8], [5, 6, 7, 8, 9])  # all kept, and the model's own token
    assert policy.seconds[1] is None and policy.seconds[4] is None
    w = ACCEPT_WEIGHT  # position 1: rejected, then accepted; 2-4: accepted
    assert policy.acceptance == pytest.approx([0.5 * (1 - w) ** 2 + w] + [0.5 * (1 - w) + w] * 3)
    policy.drafted(4, 0.03)
    assert policy.seconds[4] == 0.03
    policy.drafted(4, 1.0)  # a preempted step counts as OUTLIER x the estimate
    assert policy.seconds[4] == pytest.approx(0.03 + TIME_WEIGHT * (OUTLIER - 1) * 0.03)
    policy.observe([5, 6, 7, 8], [5, 1])  # position 2 rejected, 3 and 4 not reached
    assert policy.acceptance[2:] == pytest.approx([0.5 * (1 - w) + w] * 2)
    assert policy.draft_length(room=2) <= 2  # never past the tokens left


def test_policy_probes_a_draft_model_after_plain_runs_as_long_as_the_probe_costs():
    policy = policy_with(4, 0.01, 0.01, 0.2, free=False)
    runs = []
    for probe_seconds in (0.02, 0.5, 0.011):
        assert policy.draft_length(room=1000) == 0
        runs.append(policy.run)
        policy.plain(policy.run, 0.01 * policy.run, chosen=True)
        assert policy.draft_length(room=1000) == 1  # the probe
        policy.drafted(1, probe_seconds)
        policy.observe([5], [6])
    # the next probe's extra time (this one's, for a catch-up on CATCH_UP tokens) a PROBE_SHARE of the next run's
    assert runs == [MIN_RUN, round(0.01 * CATCH_UP / MIN_RUN / (PROBE_SHARE * 0.01)), MAX_RUN] and policy.run == MIN_RUN
    free = policy_with(4, 0.01, 0.01, 0.2, free=True)
    free.plain(8, 0.08, chosen=True)
    assert free.draft_length(room=100) == 0 and free.run == MIN_RUN  # prompt lookup is checked, not probed


def test_policy_finds_a_loop_that_starts_after_plain_decoding():
    """Prompt lookup's drafts over a plain run are checked against the text: no drafting while the
    text is fresh, the whole draft once it loops."""
    policy = policy_with(4, 0.01, 0.006, 0.5)
    fresh = list(range(3, 40))
    checked = policy.check(PromptLookup(4), fresh, 2)
    assert policy.acceptance == [0.5] * 4 and checked == len(fresh) - 4  # nothing matched; the last 4 wait for text
    seesaw = fresh + [x for n in range(99, 91, -1) for x in (50, 51, n)]  # "50 51" recurs, then something new
    checked = policy.check(PromptLookup(4), seesaw, checked)
    assert policy.acceptance[0] < 0.2 and policy.draft_length(room=100) == 0  # drafted, rejected
    loop = seesaw + [7, 8, 9, 10, 11] * 6
    policy.check(PromptLookup(4), loop, checked)
    assert min(policy.acceptance) > 0.9 and policy.draft_length(room=100) == 4


def test_policy_sees_a_loop_a_token_after_it_shows_and_counts_each_position_once():
    """A draft is checked as far as the text after it is known, the rest of it later: the first
    token of a loop is evidence at once, and no draft position is observed twice."""
    lookup = PromptLookup(4)
    policy = policy_with(4, 0.01, 0.006, 0.5)
    once, twice = 0.5 + 0.3 * 0.5, 0.5 + 0.3 * 0.5 + 0.3 * (1 - 0.65)  # ewma toward 1, ACCEPT_WEIGHT 0.3
    text = list(range(3, 20)) + [50, 51, 52, 50, 51, 52]  # after the second "50 51": drafts 52 50 51 52
    checked = policy.check(lookup, text, 2)
    assert checked == len(text) - 4 and policy.acceptance == [once, 0.5, 0.5, 0.5]  # its first token known
    policy.check(lookup, text + [50], checked)  # that draft's second token; the next draft's (50 51 52) first
    assert policy.acceptance == pytest.approx([twice, once, 0.5, 0.5])


def test_the_callers_time_between_tokens_is_not_counted_as_decoding(target, monkeypatch):
    """A slow consumer (a terminal, a detokenizer) must not make plain decoding look dear, or the
    policy would draft where drafting loses: T(0) is the model's time per token only."""
    generate_module = importlib.import_module("openelm_mlx.generate")  # the package exports a function of that name
    policies = []

    class Recorded(DraftPolicy):
        def __init__(self, *args):
            super().__init__(*args)
            policies.append(self)

    monkeypatch.setattr(generate_module, "DraftPolicy", Recorded)
    model, tokenizer = target
    tokens = tokenizer.encode(PROMPTS[0])
    for _ in speculate(model, tokens, make_cache(model), 24, Sampling(), PromptLookup(4), GenerationStats()):
        time.sleep(0.05)
    assert policies[0].seconds[0] is not None and policies[0].seconds[0] < 0.025
