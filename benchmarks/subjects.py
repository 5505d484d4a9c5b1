"""What a benchmark runs: a model size or checkpoint, at a precision, as our Model or mlx-lm's."""

import os
import re
from pathlib import Path
from typing import Callable, Dict, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from openelm_mlx.checkpoint import build_model, quantized_paths, read_weights, resolve_source
from openelm_mlx.config import PRESETS, OpenELMConfig
from openelm_mlx.errors import OpenELMError
from openelm_mlx.loader import ready, resolve_dtype
from openelm_mlx.model import Model
from openelm_mlx.options import DEFAULT_GROUP_SIZE

from .synthetic import random_weights

FLOATS = {"fp32": mx.float32, "fp16": mx.float16, "bf16": mx.bfloat16}
QUANTIZED = {"q8": 8, "q4": 4}
PRECISIONS = (*FLOATS, *QUANTIZED)
SIZE_LIKE = re.compile(r"\d+([._]\d+)?[MB]", re.IGNORECASE)  # 7B, 1_1B, 270m: meant as a size, not a path
RANDOM_NOTE = (
    "random weights of the real shapes (uniform, variance 1/fan_in): speed does not "
    "depend on the weight values, so this runs offline"
)


def describe(spec: str) -> Tuple[str, str]:
    """(label, source) of a --models entry: a released size (random weights) or a checkpoint."""
    if spec in PRESETS:
        return spec, RANDOM_NOTE
    return Path(spec).name or spec, str(spec)


def check_spec(spec: str):
    """Refuse a --models entry that reads as a size but is none of the released ones (nor a path)."""
    if spec not in PRESETS and SIZE_LIKE.fullmatch(spec) and not os.path.lexists(spec):
        raise OpenELMError(
            f"--models {spec}: not a size bench knows: choose from {', '.join(PRESETS)} (OpenELM's released "
            "sizes, random weights of their shapes), or give a checkpoint folder or Hub repo id"
        )


def load_source(spec: str, seed: int = 0) -> Tuple[OpenELMConfig, Callable[[], Dict[str, mx.array]]]:
    """Config of a --models entry and a function giving its weights, lazily: random ones for a
    released size, the checkpoint's own for a folder or Hub repo. Each precision draws or reads
    them afresh, so no float copy stays in memory beside the model being timed."""
    if spec in PRESETS:
        config = OpenELMConfig.preset(spec)
        return config, lambda: random_weights(config, seed)
    folder = resolve_source(spec)
    config = OpenELMConfig.from_pretrained(folder)
    build_model(config, read_weights(folder))  # checks every header, name and shape; reads no data
    return config, lambda: read_weights(folder)


def activation_dtype(precision: str, config: OpenELMConfig) -> mx.Dtype:
    """Float precisions compute in their own dtype. Quantized weights compute in the toolkit's
    'auto' dtype: float32 on a CPU (16-bit matmuls are scalar fallbacks there), else 16-bit."""
    if precision in FLOATS:
        return FLOATS[precision]
    return resolve_dtype("auto", config)


def build_subject(config: OpenELMConfig, make_weights: Callable, precision: str) -> Model:
    """Our Model at a precision, evaluated and ready to time."""
    if precision not in PRECISIONS:
        raise OpenELMError(f"unknown precision '{precision}': choose from {', '.join(PRECISIONS)}")
    weights = make_weights()
    if quantized_paths(weights):
        bits = config.quantization["bits"]
        if QUANTIZED.get(precision) != bits:
            raise OpenELMError(
                f"the checkpoint holds {bits}-bit weights: benchmark it as q{bits}, or pass a float checkpoint"
            )
        model = build_model(config, weights)
    else:
        model = Model(config)
        model.load_weights(list(weights.items()))
        if precision in QUANTIZED:
            nn.quantize(model, group_size=DEFAULT_GROUP_SIZE, bits=QUANTIZED[precision])
    del weights  # nothing but the model may hold the float source once it is evaluated
    return ready(model, activation_dtype(precision, config))


def mlx_lm_twin(model: Model) -> nn.Module:
    """mlx-lm's OpenELM holding the same values as `model` (quantized the same way), laid out as
    mlx_lm.load gives them: row-major (a copy of each matrix a CPU layer re-laid out)."""
    from mlx_lm.models import openelm

    twin = openelm.Model(openelm.ModelArgs.from_dict(model.config.to_dict()))
    quantized = {
        path: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for path, m in model.named_modules()
        if hasattr(m, "bits")
    }
    if quantized:
        nn.quantize(twin, class_predicate=lambda path, _: quantized.get(path, False))
    # twin's own random init is lazy and replaced here, so it is never computed
    twin.load_weights([(k, mx.contiguous(v)) for k, v in tree_flatten(model.parameters())])
    mx.eval(twin.parameters())  # a row-major array is shared, not copied
    return twin
