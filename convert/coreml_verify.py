"""`openelm verify-coreml`: run a saved package and compare it with the MLX model.

Three checks, all on the package as written to disk:
1. weights: every weight in the package (decompressed) against the MLX model's: exactly its fp16
   rounding for uncompressed exports, within the compression's error bound otherwise;
2. the program: prefill + N decode steps through the numpy MIL executor (Linux and macOS), and
   through Core ML itself on macOS, against MLX (fp32) loaded with the package's own weights, so
   the comparison isolates the graph from the weight compression;
3. greedy tokens: the package's argmax must equal MLX's, except at near-ties that the logits
   tolerance explains.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from openelm_mlx.errors import OpenELMError

DEFAULT_PROMPT = "Once upon a time there was a little model that wanted to write stories about the sea and the stars."
# fp16 keeps 11 significant bits: each rounding errs by <= 2**-11 (4.9e-4) relative. A logit goes
# through ~4 roundings per layer at activation scale; random-walk accumulation over 16 layers gives
# ~sqrt(66) * 4.9e-4 = 4e-3 of the logits' scale. 5x margin: 2% of max|logit| (at least 1.0).
LOGITS_RTOL = 0.02
# Compressed weights. Linear quantization (int8 per row, int4 per block of --block-size along the
# input axis, symmetric): every value must lie within half a quantization step of the source, the
# step being max|block| / (2**(bits-1) - 1), plus four fp16 roundings (the weight before
# quantization, the scale, the product, the source's own fp16 cast). Palettization (k-means per
# 16 rows) has no per-value bound: ||package - source|| / ||source|| per tensor must stay below
# these, ~1.5x the worst measured on random Gaussian weights (0.10 for 4 bits, 0.025 for 6).
QUANT_BITS = {"int8": 8, "int4": 4}
FP16_SLACK = 4 * 2.0**-11
PALETTE_RTOL = {"palettize4": 0.15, "palettize6": 0.04}


@dataclass
class Step:
    name: str  # "prefill[n]" or "decode k"
    max_abs_diff: float
    reference_token: int
    package_token: int
    margin: float  # reference top-1 minus top-2 logit


@dataclass
class BackendReport:
    backend: str
    tolerance: float
    steps: List[Step] = field(default_factory=list)
    problem: Optional[str] = None

    @property
    def agreement(self) -> float:
        return sum(s.reference_token == s.package_token for s in self.steps) / max(1, len(self.steps))

    @property
    def ok(self) -> bool:
        return self.problem is None


@dataclass
class VerifyReport:
    package: str
    compression: str
    weight_problems: List[str]
    weight_max_rel_error: float
    backends: List[BackendReport]
    skipped: List[str]

    @property
    def ok(self) -> bool:
        return not self.weight_problems and all(b.ok for b in self.backends)


def package_weights(executor, names) -> Dict[str, tuple]:
    """HF name -> (decompressed float32 weight, whether it is compressed), read from the saved
    program's `decode` function."""
    from .coreml_export import const_name, weight_const

    wanted = {const_name(n): n for n in names}
    out = {}
    for key, value in executor.constants("decode").items():
        base = weight_const(key)
        if base in wanted and (key == base or key.endswith(("_quantized", "_palettized"))):
            out[wanted[base]] = (value.astype(np.float32), key != base)
    return out


def check_weights(package_w, source_w, compression: str, block_size: int):
    """(problems, worst relative error) of the package's weights against the source model's:
    plain weights must equal the source rounded to their stored dtype (norms fp32, others fp16),
    compressed ones must be within the compression's bound (see QUANT_BITS, PALETTE_RTOL)."""
    from .coreml_export import FP32_WEIGHTS

    problems, worst = [], 0.0
    for name, src in source_w.items():
        if name not in package_w:
            problems.append(f"{name} is missing from the package")
            continue
        got, compressed = package_w[name]
        if got.shape != src.shape:
            problems.append(f"{name} has shape {got.shape}, the model {src.shape}")
            continue
        with np.errstate(invalid="ignore", over="ignore"):  # a corrupted weight may hold inf/NaN
            err = np.abs(got - src)
            rel = float(np.linalg.norm(err) / max(np.linalg.norm(src), 1e-12))
        rel = rel if np.isfinite(rel) else float("inf")
        worst = max(worst, rel)
        if not compressed:
            stored = src if name.endswith(FP32_WEIGHTS) else src.astype(np.float16).astype(np.float32)
            bad = int(np.sum(got != stored))
        elif compression in QUANT_BITS:
            block = src.shape[1] if compression == "int8" else block_size
            rows = src.reshape(src.shape[0], -1, block)
            step = np.abs(rows).max(axis=-1, keepdims=True) / (2 ** (QUANT_BITS[compression] - 1) - 1)
            bad = int(np.sum(~(err.reshape(rows.shape) <= 0.5 * step + FP16_SLACK * np.abs(rows))))
        else:
            bad = 0 if rel <= PALETTE_RTOL[compression] else got.size
        if bad:
            problems.append(
                f"{name}: {bad} of {got.size} values are not what {compression} gives for the "
                f"model's weights (relative error {rel:.3g})"
            )
    return problems, worst


def compare(runner, reference, tokens: List[int], steps: int, backend: str) -> BackendReport:
    """Prefill `tokens`, then `steps` decode steps fed with MLX's greedy tokens (teacher forcing)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(reference)
    report = BackendReport(backend, tolerance=0.0)
    feed = tokens
    for k in range(steps + 1):
        ref = np.array(reference(mx.array([feed]), cache=cache)[0, -1].astype(mx.float32))
        got = runner.prefill(feed) if k == 0 else runner.decode(feed[0])
        tol = LOGITS_RTOL * max(1.0, float(np.abs(ref).max()))
        report.tolerance = max(report.tolerance, tol)
        top2 = np.sort(ref)[-2:]
        name = f"prefill[{len(feed)}]" if k == 0 else f"decode {k}"
        step = Step(
            name, float(np.abs(got - ref).max()), int(ref.argmax()), int(got.argmax()), float(top2[1] - top2[0])
        )
        report.steps.append(step)
        if not np.all(np.isfinite(got)):
            report.problem = f"{name}: non-finite logits (fp16 overflow in the package?)"
        elif step.max_abs_diff > tol:
            report.problem = f"{name}: max |logits difference| {step.max_abs_diff:.4g} exceeds the tolerance {tol:.4g}"
        elif step.package_token != step.reference_token and step.margin > 2 * step.max_abs_diff:
            report.problem = (
                f"{name}: greedy token {step.package_token} != MLX's {step.reference_token} although "
                f"MLX's top-2 margin {step.margin:.3g} exceeds twice the difference"
            )
        if report.problem:
            break
        feed = [step.reference_token]
    return report


def verify_coreml(package, model, steps: int = 16, prompt: str = DEFAULT_PROMPT, tokenizer=None) -> VerifyReport:
    """Check a saved package against the MLX model `model` (see the module docstring)."""
    import mlx.core as mx

    from openelm_mlx.loader import load_model
    from openelm_mlx.model import Model
    from openelm_mlx.tokenizer import find_tokenizer

    from .coreml_export import model_weights, tokenizer_path
    from .coreml_runtime import CoreMLRunner

    package = Path(package)
    runner = CoreMLRunner(package, "mil-reference")
    info = runner.info
    source, folder = load_model(model, dtype="float32")
    for key in ("num_transformer_layers", "model_dim", "head_dim", "vocab_size", "num_query_heads", "num_kv_heads"):
        if info.config.get(key) != getattr(source.config, key):
            raise OpenELMError(
                f"{package} was exported from a different model: {key} is {info.config.get(key)} "
                f"there and {getattr(source.config, key)} in {model}"
            )
    source_w = model_weights(source)
    package_w = package_weights(runner.executor, source_w)
    problems, worst = check_weights(package_w, source_w, info.compression, info.block_size)

    beside = tokenizer_path(package)
    tok = find_tokenizer(folder, tokenizer or (beside if beside.is_file() else None))  # else the model's
    tokens = tok.encode(prompt)
    if len(tokens) + steps > info.context:
        raise OpenELMError(
            f"the prompt ({len(tokens)} tokens) and {steps} steps exceed the package's context "
            f"of {info.context} tokens: use a shorter --prompt or fewer --steps"
        )

    reports, skipped = [], []
    if not problems:
        reference = Model(source.config)
        reference.load_weights([(k, mx.array(v)) for k, (v, _) in package_w.items()])
        reports.append(compare(runner, reference, tokens, steps, "mil-reference"))
        if sys.platform == "darwin":
            reports.append(compare(CoreMLRunner(package, "coreml"), reference, tokens, steps, "coreml"))
        else:
            skipped.append("coreml (Core ML runs on macOS 15+ only)")
    return VerifyReport(str(package), info.compression, problems, worst, reports, skipped)


def add_arguments(parser):
    parser.add_argument("package", help="the .mlpackage written by `openelm export-coreml`")
    parser.add_argument("--model", required=True, help="the model it was exported from (folder or repo id)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps after the prefill (default 16)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text for the prefill")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one beside the package)")


def main(args) -> int:
    report = verify_coreml(args.package, args.model, steps=args.steps, prompt=args.prompt, tokenizer=args.tokenizer)
    print(f"{report.package} ({report.compression}): weights max relative error {report.weight_max_rel_error:.3g}")
    for problem in report.weight_problems[:10]:
        print(f"  weight mismatch: {problem}")
    for b in report.backends:
        print(f"{b.backend}: logits tolerance {b.tolerance:.4g}")
        for s in b.steps:
            mark = "" if s.package_token == s.reference_token else "  <- differs"
            print(
                f"  {s.name:>12}  max|Δ| {s.max_abs_diff:.4g}  token {s.package_token} (MLX {s.reference_token}){mark}"
            )
        print(
            f"  greedy agreement {b.agreement:.0%} over {len(b.steps)} steps"
            + (f"; FAILED: {b.problem}" if b.problem else "")
        )
    for s in report.skipped:
        print(f"skipped: {s}")
    print("OK" if report.ok else "FAILED")
    return 0 if report.ok else 1
