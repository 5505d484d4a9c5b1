"""Our model against mlx-lm's independent OpenELM implementation, on the same weights."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import tiny_config
from mlx_lm.models import openelm as mlx_lm_openelm
from mlx_lm.models.cache import make_prompt_cache

from openelm_mlx import Model, OpenELMConfig
from openelm_mlx.benchmarks.synthetic import random_weights

TOL = 1e-4


def both_models(config, weights):
    ours = Model(config)
    ours.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    ref = mlx_lm_openelm.Model(mlx_lm_openelm.ModelArgs.from_dict(config.to_dict()))
    ref.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return ours, ref


def max_diff(a, b):
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


@pytest.fixture(scope="module")
def tiny_pair():
    config = tiny_config()
    return both_models(config, random_weights(config, seed=1))


def test_layerwise_scaling_is_exercised():
    c = tiny_config()
    assert len(set(c.num_query_heads)) > 1 and len(set(c.ffn_dims)) > 1
    assert all(q // kv == 4 for q, kv in zip(c.num_query_heads, c.num_kv_heads))


def test_logits_match_mlx_lm(tiny_pair):
    ours, ref = tiny_pair
    tokens = mx.array(np.random.default_rng(0).integers(0, 384, (2, 33)))
    a, b = ours(tokens), ref(tokens)
    assert a.shape == (2, 33, 384)
    assert max_diff(a, b) <= TOL
    assert mx.abs(a).max().item() > 0.5  # not trivially zero


def test_cached_decoding_matches_full_forward_and_mlx_lm(tiny_pair):
    ours, ref = tiny_pair
    tokens = mx.array(np.random.default_rng(1).integers(0, 384, (1, 24)))
    full = ours(tokens)
    cache, ref_cache = make_prompt_cache(ours), make_prompt_cache(ref)
    # A prompt in two blocks (the second attends to the cached first), then one token at a time.
    pieces = [ours(tokens[:, :10], cache), ours(tokens[:, 10:20], cache)]
    pieces += [ours(tokens[:, i : i + 1], cache) for i in range(20, 24)]
    stepped = mx.concatenate(pieces, axis=1)
    assert max_diff(stepped, full) <= TOL
    ref_steps = mx.concatenate(
        [ref(tokens[:, :20], ref_cache)] + [ref(tokens[:, i : i + 1], ref_cache) for i in range(20, 24)], 1
    )
    assert max_diff(stepped, ref_steps) <= TOL


def test_one_layer_of_the_real_270m_shape():
    config = OpenELMConfig.preset("270M")
    one = OpenELMConfig.from_dict(
        config.to_dict()
        | {
            "num_transformer_layers": 1,
            "num_query_heads": config.num_query_heads[-1:],
            "num_kv_heads": config.num_kv_heads[-1:],
            "ffn_multipliers": config.ffn_multipliers[-1:],
        }
    )
    ours, ref = both_models(one, random_weights(one, seed=2))
    tokens = mx.array(np.random.default_rng(2).integers(0, 32000, (1, 16)))
    a, b = ours(tokens), ref(tokens)
    assert a.shape == (1, 16, 32000)
    assert max_diff(a, b) <= TOL


def test_greedy_generation_matches_mlx_lm(tiny_checkpoint):
    """Our streaming generation (cache, sampler, detokenizer) against a plain greedy loop
    over mlx-lm's model, recomputing the whole sequence each step."""
    from mlx_lm.utils import load_model

    from openelm_mlx import load
    from openelm_mlx.generate import GenerationOptions, stream_generate

    model, tokenizer = load(tiny_checkpoint)
    ref, _ = load_model(tiny_checkpoint)
    prompt = tokenizer.encode("Once upon a time")
    chunks = list(stream_generate(model, tokenizer, prompt, GenerationOptions(max_tokens=24)))
    ours = [c.token for c in chunks if c.token is not None]
    theirs = list(prompt)
    for _ in range(24):
        theirs.append(ref(mx.array([theirs]))[0, -1].argmax().item())
    theirs = theirs[len(prompt) :]
    if tokenizer.eos_id in theirs:
        theirs = theirs[: theirs.index(tokenizer.eos_id)]
    assert len(ours) >= 8 and ours == theirs
    assert "".join(c.text for c in chunks) == tokenizer.decode(prompt[-1:] + ours)[len(tokenizer.decode(prompt[-1:])) :]
