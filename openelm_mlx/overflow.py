"""Non-finite logits: a float16 overflow (OpenELM's activations approach 1e5, float16 stops at
65504) turns logits into inf and NaN, and everything computed from them into nonsense. Commands
stop with one line that names the dtype to use instead."""

from typing import Optional

import mlx.core as mx

from .errors import OpenELMError

OTHER_DTYPE_OPTION = "--dtype float32 (or bfloat16)"  # what generate and eval users pass instead
DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}


def check_finite(logits: mx.array, dtype: mx.Dtype, instead: str, finite: Optional[mx.array] = None):
    """Raise OpenELMError unless every logit is finite. `dtype` is the activation dtype that
    produced them; `instead` says how to choose another one (e.g. '--dtype float32 or bfloat16').
    `finite`, if given, is mx.isfinite(logits).all() already queued (generation evaluates it with
    the token, so the check adds no wait)."""
    finite = mx.all(mx.isfinite(logits)) if finite is None else finite
    if finite.item():
        return
    name = DTYPE_NAMES.get(dtype, str(dtype).replace("mlx.core.", ""))
    if dtype == mx.float32:
        raise OpenELMError("the model's logits are not finite (inf or NaN) even in float32: its weights are broken")
    raise OpenELMError(
        f"the model's logits are not finite (inf or NaN) in {name}: its activations overflow {name}; use {instead}"
    )
