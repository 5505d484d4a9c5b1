"""OpenELM configuration: the Hugging Face config.json fields and the layer-wise scaling rule."""

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import List, Optional

from .errors import OpenELMError
from .files import boolean, each, field_problem, integer, number, obj, one_of, optional, read_json, shown, text

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


# What each config.json field may hold. The bounds are sanity limits far beyond the released
# models (3B: 36 layers, width 3072, 32000 pieces) that keep a hostile file from asking for
# terabytes or overflowing MLX's 32-bit dimensions.
FIELD_RULES = {
    "num_transformer_layers": integer(1, 1024),
    "model_dim": integer(1, 65536),
    "head_dim": integer(1, 4096),
    "num_query_heads": each(integer(1, 4096)),
    "num_kv_heads": each(integer(1, 4096)),
    "ffn_multipliers": each(number(0, 64)),
    "num_gqa_groups": integer(1, 4096),
    "ffn_dim_divisor": integer(1, 65536),
    "qkv_multipliers": each(number(0, 64)),
    "vocab_size": integer(1, 1 << 20),
    "max_context_length": integer(1, 1 << 20),
    "rope_freq_constant": number(0, 1e12),
    "rope_max_length": integer(1, 1 << 20),
    "bos_token_id": integer(0, 1 << 20),
    "eos_token_id": integer(0, 1 << 20),
    "ffn_with_glu": boolean,
    "normalize_qk_projections": boolean,
    "share_input_output_layers": boolean,
    "rms_norm_eps": number(0, 1),
    "activation_fn_name": text,
    "normalization_layer_name": text,
    "initializer_range": number(-1, 1e3),
    "use_cache": boolean,
    "torch_dtype": optional(text),
    "model_type": text,
    "quantization": optional(obj),
}
# mlx-lm's quantization entry; the bits and group sizes are those MLX's affine mode supports.
GROUP_SIZES = (32, 64, 128)
QUANTIZATION_RULES = {
    "group_size": one_of(*GROUP_SIZES),
    "bits": one_of(1, 2, 3, 4, 5, 6, 8),
    "mode": one_of("affine"),
}
REQUIRED_FIELDS = (
    "num_transformer_layers",
    "model_dim",
    "head_dim",
    "num_query_heads",
    "num_kv_heads",
    "ffn_multipliers",
)


def make_divisible(v: float, divisor: int) -> int:
    """Round v to a multiple of divisor, never more than 10% below v (corenet's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def layer_multipliers(start: float, stop: float, layers: int) -> List[float]:
    """corenet's per-layer multipliers, `[round(v, 2) for v in np.linspace(start, stop, layers)]`,
    computed as corenet computes them: numpy's linspace and numpy's rounding (scale by 100, round
    half to even), which differ from Python's exact decimal round() on values like 2.775.
    numpy is imported here, not at the top: `openelm generate` loads this module but never needs
    numpy, whose import costs ~0.1-0.6 s."""
    import numpy as np

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
        """Every field's type and range (FIELD_RULES), then what OpenELM needs across fields."""

        def fail(field_name, why):
            raise OpenELMError(f"field '{field_name}' {why}")

        problem = field_problem(vars(self), FIELD_RULES)
        if problem is None and self.quantization is not None:
            problem = check_quantization(self.quantization)
        if problem:
            raise OpenELMError(problem)
        n = self.num_transformer_layers
        for name in ("num_query_heads", "num_kv_heads", "ffn_multipliers"):
            if len(getattr(self, name)) != n:
                fail(name, f"must list one value per layer ({n}), got {len(getattr(self, name))}")
        for i, (q, kv) in enumerate(zip(self.num_query_heads, self.num_kv_heads)):
            if q % kv != 0:
                fail("num_kv_heads", f"layer {i}: {q} query heads are not divisible by {kv} kv heads")
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                fail(name, f"is {getattr(self, name)}, outside the vocabulary of {self.vocab_size}")
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
    def from_dict(cls, raw: dict, source: str = "config.json") -> "OpenELMConfig":
        """A config from config.json's fields (Hugging Face's or corenet's); errors name `source`."""
        if not isinstance(raw, dict):
            raise OpenELMError(f"{source} must hold a JSON object, got {shown(raw)}")
        try:
            if "model_name" in raw and "num_query_heads" not in raw:
                return cls._from_corenet(raw)
            if raw.get("model_type", "openelm") != "openelm":
                raise OpenELMError(f"field 'model_type' is {raw['model_type']!r}, expected 'openelm'")
            missing = [name for name in REQUIRED_FIELDS if name not in raw]
            if missing:
                raise OpenELMError(f"required field '{missing[0]}' is missing")
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in raw.items() if k in known})
        except OpenELMError as e:
            raise OpenELMError(f"{source}: {e}") from None

    @classmethod
    def _from_corenet(cls, raw: dict) -> "OpenELMConfig":
        name = raw["model_name"]
        if not isinstance(name, str) or name not in CORENET_MODEL_NAMES:
            choices = ", ".join(CORENET_MODEL_NAMES)
            raise OpenELMError(f"unknown corenet model_name {name!r}, expected one of {choices}")
        # The checkpoint's 32128-row embedding is cut to the tokenizer's 32000 pieces on load.
        config = cls.preset(CORENET_MODEL_NAMES[name])
        taken = {k: raw[k] for k in ("max_context_length", "quantization") if k in raw}
        return replace(config, **taken)  # validated again, as any config

    @classmethod
    def from_pretrained(cls, path) -> "OpenELMConfig":
        """Read config.json from a file or from the folder that holds it."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not os.path.lexists(path):
            raise OpenELMError(f"no config.json at {path}: point to an OpenELM checkpoint folder")
        return cls.from_dict(read_json(path), source=str(path))

    def to_dict(self) -> dict:
        """The Hugging Face config.json fields (plus mlx-lm's quantization entry if any)."""
        out = asdict(self)
        out["architectures"] = ["OpenELMForCausalLM"]
        for name in ("quantization", "torch_dtype"):
            if out[name] is None:
                del out[name]
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


def check_quantization(entry: dict) -> Optional[str]:
    """What is wrong with a `quantization` entry (mlx-lm's: group_size, bits, mode), or None."""
    unknown = [k for k in entry if k not in QUANTIZATION_RULES]
    if unknown:
        return (
            f"field 'quantization' has an entry '{unknown[0]}' that openelm-mlx does not read (per-layer "
            "settings are not supported): convert the float checkpoint with `openelm convert --bits`"
        )
    missing = [k for k in ("group_size", "bits") if k not in entry]
    if missing:
        return f"field 'quantization.{missing[0]}' is missing"
    return field_problem(entry, QUANTIZATION_RULES, prefix="quantization.")
