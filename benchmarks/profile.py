"""Where the time of a prefill and of a decode step goes: every matrix product of the model timed
alone, against the whole forward pass, for openelm-mlx and mlx-lm on the same weights.

    python -m openelm_mlx.benchmarks.profile --models 270M --precisions fp32,q8 -p 64
"""

import argparse
import statistics
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from .subjects import build_subject, load_source, mlx_lm_twin

KINDS = ("qkv_proj", "out_proj", "proj_1", "proj_2")


def in_features(layer) -> int:
    # a quantized weight packs 32 // bits values into each uint32
    return layer.weight.shape[-1] * 32 // layer.bits if hasattr(layer, "bits") else layer.weight.shape[-1]


def time_call(fn, repeats: int) -> float:
    """Median seconds of fn() evaluated, after one untimed call."""
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def profile(model, config, prompt_tokens: int, repeats: int) -> dict:
    """Seconds per component for a prefill of prompt_tokens and for one decode step after it (ours
    runs its CPU layers, swapped in when it was built)."""
    dtype = model.transformer.norm.weight.dtype
    out = {}
    for phase, tokens in (("prefill", prompt_tokens), ("decode", 1)):
        parts = {}
        for kind in KINDS:  # all layers' products of one kind in one evaluation: little overhead
            layers = [m for name, m in model.named_modules() if name.endswith(f".{kind}")]
            inputs = [mx.random.normal((1, tokens, in_features(m))).astype(dtype) for m in layers]
            mx.eval(inputs)
            parts[kind] = time_call(
                lambda layers=layers, inputs=inputs: [m(x) for m, x in zip(layers, inputs)], repeats
            )
        h = mx.random.normal((1, 1, config.model_dim)).astype(dtype)  # the output layer: last position only
        parts["lm_head"] = time_call(lambda h=h: model.transformer.token_embeddings.as_linear(h), repeats)
        prompt = mx.random.randint(0, config.vocab_size, (1, prompt_tokens))
        if phase == "prefill":
            total = (
                time_call(lambda p=prompt: model.transformer(p, make_prompt_cache(model)), repeats) + parts["lm_head"]
            )
        else:
            cache = make_prompt_cache(model)
            mx.eval(model.transformer(prompt, cache))
            token = mx.array([[7]])
            total = time_call(lambda t=token, c=cache: model(t, cache=c), repeats)  # the cache grows by one per call
        parts["everything else"] = total - sum(parts.values())
        out[phase] = {"total": total, **parts}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="270M")
    parser.add_argument("--precisions", default="fp32,q8,q4")
    parser.add_argument("-p", "--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print("| model | precision | phase | component | openelm-mlx ms | mlx-lm ms |\n|---|---|---|---|---:|---:|")
    for spec in args.models.split(","):
        config, make_weights = load_source(spec)
        for precision in args.precisions.split(","):
            model = build_subject(config, make_weights, precision)
            ours = profile(model, config, args.prompt_tokens, args.repeats)
            theirs = profile(mlx_lm_twin(model), config, args.prompt_tokens, args.repeats)
            for phase in ours:
                for part in ours[phase]:
                    print(
                        f"| {spec} | {precision} | {phase} | {part} | {ours[phase][part] * 1e3:.1f} "
                        f"| {theirs[phase][part] * 1e3:.1f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
