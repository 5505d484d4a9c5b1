"""load(): any checkpoint form -> (Model, Tokenizer), with the dtype policy."""

from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx

from . import cpu_layers
from .checkpoint import build_model, read_weights, resolve_source
from .config import OpenELMConfig
from .errors import OpenELMError
from .model import Model
from .tokenizer import Tokenizer, check_tokenizer_fits, find_tokenizer

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
# The small model trained and shipped with the package (see apps/train.py): the offline default.
DEMO_MODEL = Path(__file__).parent / "demo_model"


def named_dtype(name: str) -> Optional[mx.Dtype]:
    """The dtype a --dtype value names, or None for 'auto' (each caller has its own rule)."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise OpenELMError(f"unknown dtype '{name}': choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_dtype(name: str, config: OpenELMConfig) -> mx.Dtype:
    """'auto': float32 on a CPU (16-bit matmuls are scalar fallbacks on x86), else float16,
    or bfloat16 for OpenELM-3B, whose activations overflow float16."""
    dtype = named_dtype(name)
    if dtype is not None:
        return dtype
    if mx.default_device() == mx.cpu:
        return mx.float32
    return mx.bfloat16 if config.wants_bfloat16 else mx.float16


def load_model(source, dtype: str = "auto") -> Tuple[Model, Path]:
    """The model of a local folder or Hub repo id, and the folder it was read from."""
    folder = resolve_source(source)
    return build(folder, OpenELMConfig.from_pretrained(folder), dtype), folder


def build(folder: Path, config: OpenELMConfig, dtype: str) -> Model:
    return ready(build_model(config, read_weights(folder)), resolve_dtype(dtype, config))


def ready(model: Model, dtype: mx.Dtype) -> Model:
    """A built model made ready to run here, evaluated: quantized weights stay packed; scales,
    biases and norms follow the activation dtype; on a CPU, linear layers become CPU layers
    (cpu_layers.swap: BLAS path, threads, layout). Call it once nothing else holds the weights,
    or the layout's copies double the peak memory."""
    model.set_dtype(dtype)
    cpu_layers.swap(model)
    mx.eval(model.parameters())
    return model


def load(path_or_repo=None, tokenizer: Optional[str] = None, dtype: str = "auto") -> Tuple[Model, Tokenizer]:
    """Load a Hugging Face folder or repo id, a corenet MLX export, or a converted MLX folder
    (quantized or not). Without a path, the small demo model shipped with the package."""
    if path_or_repo is None:
        if not (DEMO_MODEL / "config.json").is_file():
            raise OpenELMError("no model given and no demo model installed: pass --model PATH_OR_REPO")
        path_or_repo = DEMO_MODEL
    return load_folder(resolve_source(path_or_repo), tokenizer, dtype)


def load_folder(folder: Path, tokenizer: Optional[str] = None, dtype: str = "auto") -> Tuple[Model, Tokenizer]:
    """load() of a folder resolve_source() gave."""
    config = OpenELMConfig.from_pretrained(folder)
    tok = find_tokenizer(folder, tokenizer)
    check_tokenizer_fits(tok, config)  # before a byte of the weights is read
    return build(folder, config, dtype), tok
