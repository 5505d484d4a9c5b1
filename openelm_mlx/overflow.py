"""Non-finite logits: a float16 overflow (OpenELM's activations approach 1e5, float16 stops at
65504) turns logits into inf and NaN, and everything computed from them into nonsense. Commands
stop with one line that names the dtype to use instead."""

import mlx.core as mx

from .errors import OpenELMError

DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


def check_finite(logits: mx.array, dtype: mx.Dtype, instead: str):
    """Raise OpenELMError unless every logit is finite. `dtype` is the activation dtype that
    produced them; `instead` says how to choose another one (e.g. '--dtype float32 or bfloat16')."""
    if not mx.all(mx.isfinite(logits)).item():
        raise overflow_error(dtype, instead)


def overflow_error(dtype: mx.Dtype, instead: str) -> OpenELMError:
    name = DTYPE_NAMES.get(dtype, str(dtype).replace("mlx.core.", ""))
    if dtype == mx.float32:
        return OpenELMError("the model's logits are not finite (inf or NaN) even in float32: its weights are broken")
    return OpenELMError(
        f"the model's logits are not finite (inf or NaN) in {name}: its activations overflow {name}; use {instead}"
    )
