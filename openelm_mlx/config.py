"""OpenELM configuration: the Hugging Face config.json fields and the layer-wise scaling rule."""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import List, Optional

import numpy as np

from .errors import OpenELMError

# (layers, model_dim, head_dim) of the four released sizes; every other field is shared.
PRESETS = {
    "270M": (16, 1280, 64),
    "450M": (20, 1536, 64),
    "1.1B": (28, 2048, 64),
    "3B": (36, 3072, 128),
}


# The released recipe in corenet: multipliers spread linearly over the layers from the first
# value to the second, and 4 query heads per kv head.
QKV_RANGE, FFN_RANGE, GQA_GROUPS = (0.5, 1.0), (0.5, 4.0), 4

# Apple's corenet MLX export names a released size instead of listing the per-layer widths.
CORENET_MODEL_NAMES = {"OpenELM-270M": "270M", "OpenELM-450M": "450M", "OpenELM-1_1B": "1.1B", "OpenELM-3B": "3B"}


def make_divisible(v: float, divisor: int) -> int:
    """Round v to a multiple of divisor, never more than 10% below v (corenet's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def layer_multipliers(start: float, stop: float, layers: int) -> List[float]:
    """corenet's per-layer multipliers, `[round(v, 2) for v in np.linspace(start, stop, layers)]`,
    computed as corenet computes them: numpy's linspace and numpy's rounding (scale by 100, round
    half to even), which differ from Python's exact decimal round() on values like 2.775."""
    return np.linspace(start, stop, layers).round(2).tolist()


@dataclass
class OpenELMConfig:
    num_transformer_layers: int
    model_dim: int
    head_dim: int
    num_query_heads: List[int]
    num_kv_heads: List[int]
    ffn_multipliers: List[float]
    num_gqa_groups: int = 4
    ffn_dim_divisor: int = 256
    qkv_multipliers: List[float] = field(default_factory=lambda: [0.5, 1.0])
    vocab_size: int = 32000
    max_context_length: int = 2048
    rope_freq_constant: float = 10000
    rope_max_length: int = 4096
    bos_token_id: int = 1
    eos_token_id: int = 2
    ffn_with_glu: bool = True
    normalize_qk_projections: bool = True
    share_input_output_layers: bool = True
    rms_norm_eps: float = 1e-6  # hard-coded in corenet; not a config.json field there
    activation_fn_name: str = "swish"
    normalization_layer_name: str = "rms_norm"
    initializer_range: float = 0.02
    use_cache: bool = True
    torch_dtype: Optional[str] = None  # informational only: read the dtype from the weights
    model_type: str = "openelm"
    # mlx-lm's entry: {"group_size": 64, "bits": 4, "mode": "affine"} for quantized checkpoints
    quantization: Optional[dict] = None

    def __post_init__(self):
        self.validate()

    @property
    def ffn_dims(self) -> List[int]:
        return [make_divisible(m * self.model_dim, self.ffn_dim_divisor) for m in self.ffn_multipliers]

    def validate(self):
        def fail(field_name, why):
            raise OpenELMError(f"config.json: field '{field_name}' {why}")

        for name in (
            "num_transformer_layers",
            "model_dim",
            "head_dim",
            "vocab_size",
            "max_context_length",
            "ffn_dim_divisor",
            "num_gqa_groups",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, f"must be a positive integer, got {value!r}")
        n = self.num_transformer_layers
        for name in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            value = getattr(self, name)
            if not isinstance(value, list) or len(value) != n:
                got = len(value) if isinstance(value, list) else repr(value)
                fail(name, f"must list one value per layer ({n}), got {got}")
            if any(not isinstance(v, (int, float)) or v <= 0 for v in value):
                fail(name, f"must hold positive numbers, got {value}")
        for i, (q, kv) in enumerate(zip(self.num_query_heads, self.num_kv_heads)):
            if q % kv != 0:
                fail("num_kv_heads", f"layer {i}: {q} query heads are not divisible by {kv} kv heads")
        if not self.share_input_output_layers:
            fail("share_input_output_layers", "is false; every OpenELM release ties the output layer to the embedding")
        if not (self.ffn_with_glu and self.normalize_qk_projections):
            fail("ffn_with_glu", "and 'normalize_qk_projections' must be true, as in every OpenELM release")
        if self.activation_fn_name != "swish" or self.normalization_layer_name != "rms_norm":
            fail(
                "activation_fn_name",
                f"and 'normalization_layer_name' must be 'swish' and 'rms_norm', "
                f"got '{self.activation_fn_name}' and '{self.normalization_layer_name}'",
            )

    @classmethod
    def preset(cls, name: str) -> "OpenELMConfig":
        """The released configuration `name`, computed from the layer-wise scaling rule."""
        if name not in PRESETS:
            raise OpenELMError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
        return cls.layerwise(*PRESETS[name])

    @classmethod
    def layerwise(
        cls, layers: int, model_dim: int, head_dim: int, ffn_dim_divisor: int = 256, **kwargs
    ) -> "OpenELMConfig":
        """A config of any size whose per-layer widths follow OpenELM's scaling rule (corenet's
        GPTConfig with the released recipe: QKV_RANGE, FFN_RANGE, GQA_GROUPS)."""
        qkv_mult = layer_multipliers(*QKV_RANGE, layers)
        ffn_mult = layer_multipliers(*FFN_RANGE, layers)
        q_heads = [make_divisible(model_dim * m, head_dim * GQA_GROUPS) // head_dim for m in qkv_mult]
        return cls(
            num_transformer_layers=layers,
            model_dim=model_dim,
            head_dim=head_dim,
            num_query_heads=q_heads,
            num_kv_heads=[q // GQA_GROUPS for q in q_heads],
            ffn_multipliers=ffn_mult,
            num_gqa_groups=GQA_GROUPS,
            ffn_dim_divisor=ffn_dim_divisor,
            qkv_multipliers=list(QKV_RANGE),
            **kwargs,
        )

    @classmethod
    def from_dict(cls, raw: dict) -> "OpenELMConfig":
        known = {f.name for f in fields(cls)}
        if "model_name" in raw and "num_query_heads" not in raw:
            return cls._from_corenet(raw)
        if raw.get("model_type", "openelm") != "openelm":
            raise OpenELMError(f"config.json: model_type is '{raw['model_type']}', expected 'openelm'")
        for name in (
            "num_transformer_layers",
            "model_dim",
            "head_dim",
            "num_query_heads",
            "num_kv_heads",
            "ffn_multipliers",
        ):
            if name not in raw:
                raise OpenELMError(f"config.json: required field '{name}' is missing")
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def _from_corenet(cls, raw: dict) -> "OpenELMConfig":
        name = raw["model_name"]
        if name not in CORENET_MODEL_NAMES:
            raise OpenELMError(
                f"config.json: unknown corenet model_name '{name}', expected one of {', '.join(CORENET_MODEL_NAMES)}"
            )
        # The checkpoint's 32128-row embedding is cut to the tokenizer's 32000 pieces on load.
        config = cls.preset(CORENET_MODEL_NAMES[name])
        config.max_context_length = raw.get("max_context_length", config.max_context_length)
        config.quantization = raw.get("quantization")
        return config

    @classmethod
    def from_pretrained(cls, path) -> "OpenELMConfig":
        """Read config.json from a file or from the folder that holds it."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise OpenELMError(f"no config.json at {path}: point to an OpenELM checkpoint folder")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OpenELMError(f"{path} is not valid JSON ({e}): re-download or fix the file") from None
        if not isinstance(raw, dict):
            raise OpenELMError(f"{path} must hold a JSON object")
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        """The Hugging Face config.json fields (plus mlx-lm's quantization entry if any)."""
        out = asdict(self)
        out["architectures"] = ["OpenELMForCausalLM"]
        for optional in ("quantization", "torch_dtype"):
            if out[optional] is None:
                del out[optional]
        return out

    @property
    def wants_bfloat16(self) -> bool:
        # OpenELM-3B's activations overflow float16 (Apple's MLX README; mlx-examples #730).
        return self.model_dim >= 3072

    def num_parameters(self) -> int:
        d, hd = self.model_dim, self.head_dim
        total = self.vocab_size * d + d  # tied embedding, final norm
        for q, kv, ffn in zip(self.num_query_heads, self.num_kv_heads, self.ffn_dims):
            total += (q + 2 * kv) * hd * d + q * hd * d + 2 * hd  # qkv, out, qk-norms
            total += 3 * ffn * d + 2 * d  # proj_1, proj_2, two norms
        return total
