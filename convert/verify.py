"""Verification shared by `openelm verify-coreml` and `openelm verify-coreai`, on the package as
written to disk:
1. weights: every weight read back from the package (decompressed) against the MLX model's: equal
   to its rounding to the stored dtype for uncompressed exports, within the compression's error
   bound otherwise;
2. the program: prefill blocks + N decode steps through each runner against MLX (float32) loaded
   with the package's own weights, so the comparison isolates the graph from the compression;
3. greedy tokens: the package's argmax must equal MLX's, except at near-ties that the logits
   tolerance explains."""

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from openelm_mlx.cache import make_cache
from openelm_mlx.errors import OpenELMError
from openelm_mlx.files import json_text
from openelm_mlx.loader import load_model
from openelm_mlx.model import Model
from openelm_mlx.options import VERIFY_RULES, check_options
from openelm_mlx.progress import announce, progress_bar, ticking
from openelm_mlx.tokenizer import find_tokenizer

from .compression import BITS, IOS_PRESET
from .numerics import fold_ffn_scales
from .package import EMBEDDING, is_norm, model_weights
from .package_input import PackageInfo, check_tokenizer, package_tokenizer, tokenizer_path

# verify's prefill when no --prompt is given (clipped to the context); generate's is generate.FALLBACK_PROMPT.
VERIFY_PROMPT = "Once upon a time there was a little model that wanted to write stories about the sea and the stars."
# Logits tolerance, relative to the largest |logit| (at least 1.0), per compute precision.
# float16 keeps 11 significant bits: each rounding errs by <= 2**-11 (4.9e-4) relative. A logit goes
# through ~4 roundings per layer at activation scale; random-walk accumulation over 16 layers gives
# ~sqrt(66) * 4.9e-4 = 4e-3 of the logits' scale. 5x margin: 2%.
# float32 (2**-24 per rounding) would give ~5e-7 by the same count; what dominates is the summation
# order of dot products over up to ~10^4 terms, at worst n * 2**-24 = 6e-4 relative for n = 10^4
# (OpenELM-3B's widest FFN is 12288). 1e-3 holds the worst case and is 20x tighter than float16's.
LOGITS_RTOL = {"float16": 0.02, "float32": 1e-3}
# Apple's Linux reference runtime sums float16 products in float16 (a 4096-term dot product there is
# bit-identical to a sequential float16 sum, 7.8% off for positive terms), so the error of each
# dot product grows like sqrt(n) * 2**-11 instead of staying near one rounding: 1.1% for the tiny
# models' n <= 512, per matmul. Its float16 logits are held to 5% (measured: up to 2% on the tiny
# test models, with a massive activation); float16 on large models is checked on devices.
FLOAT16_SUM_RTOL = 0.05
# Compressed weights. Linear quantization (int8 and int4 per block of --block-size along the
# input axis, symmetric; compression.BITS): every value must lie within half a quantization step of the source, the
# step being max|block| / (2**(bits-1) - 1), plus four float16 roundings (the weight before
# quantization, the scale, the product, the source's own float16 cast). Palettization (k-means per
# 16 rows) has no per-value bound: ||package - source|| / ||source|| per tensor must stay below
# these, ~1.5x the worst measured on random weights (0.10 for 4 bits, 0.025 for 6).
FP16_SLACK = 4 * 2.0**-11
PALETTE_RTOL = {"palettize4": 0.15, "palettize6": 0.04, IOS_PRESET: 0.15}  # ios-preset: 4 bits per 32 rows


def logits_rtol(backend: str, compute_precision: str) -> float:
    """The logits tolerance (relative, as above) a package run by `backend` is verified to."""
    if backend == "coreai" and compute_precision == "float16":
        return FLOAT16_SUM_RTOL
    return LOGITS_RTOL[compute_precision]


@dataclass
class Step:
    name: str  # "prefill[n]" or "decode k"
    max_abs_diff: float
    reference_token: int
    package_token: int
    margin: float  # reference top-1 minus top-2 logit
    mlx_logits: Tuple[float, float]  # MLX's logits of (MLX's token, the package's token)


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
    compute_precision: str
    weight_problems: List[str]
    weight_max_rel_error: float
    backends: List[BackendReport]
    skipped: List[str]

    @property
    def ok(self) -> bool:
        return not self.weight_problems and all(b.ok for b in self.backends)


def compare_weights(package_w: Dict[str, np.ndarray], source_w: Dict[str, np.ndarray], info: PackageInfo):
    """(problems, worst relative error) of the package's weights (float32, decompressed) against
    the source model's (FFN scales folded in, as stored): plain weights must equal the source
    rounded to their stored dtype (norms float32, others the compute precision), compressed ones
    must be within the compression's bound (FP16_SLACK, PALETTE_RTOL)."""
    problems, worst = [], 0.0
    for name, src in source_w.items():
        if name not in package_w:
            problems.append(f"{name} is missing from the package")
            continue
        got = package_w[name]
        if got.shape != src.shape:
            problems.append(f"{name} has shape {got.shape}, the model {src.shape}")
            continue
        with np.errstate(invalid="ignore", over="ignore"):  # a corrupted weight may hold inf/NaN
            err = np.abs(got - src)
            rel = float(np.linalg.norm(err) / max(np.linalg.norm(src), 1e-12))
        rel = rel if np.isfinite(rel) else float("inf")
        worst = max(worst, rel)
        if info.target == "ios" and name == EMBEDDING:  # int8 per tensor (package.ios_form), one step for all
            step = np.abs(src).max() / 127
            bad = int(np.sum(~(err <= 0.5 * step * (1 + 2.0**-10) + FP16_SLACK * np.abs(src))))
        elif is_norm(name) or info.compression == "none":
            stored_dtype = np.float32 if is_norm(name) or info.compute_precision == "float32" else np.float16
            bad = int(np.sum(got != src.astype(stored_dtype).astype(np.float32)))
        elif info.compression not in PALETTE_RTOL:
            block = info.block_size or src.shape[1]  # int8 before block-wise scales: per row
            rows = src.reshape(src.shape[0], -1, block)
            step = np.abs(rows).max(axis=-1, keepdims=True) / (2 ** (BITS[info.compression] - 1) - 1)
            bad = int(np.sum(~(err.reshape(rows.shape) <= 0.5 * step + FP16_SLACK * np.abs(rows))))
        else:
            bad = 0 if rel <= PALETTE_RTOL[info.compression] else got.size
        if bad:
            problems.append(
                f"{name}: {bad} of {got.size} values are not what {info.compression} gives for the "
                f"model's weights (relative error {rel:.3g})"
            )
    return problems, worst


def prompt_tokens(tokenizer, prompt: Optional[str], context: int, steps: int) -> Tuple[List[int], int]:
    """(tokens, steps) that fit the context. The default prompt is clipped to fit any context (and
    the steps to what is left after one token); a prompt of the user's must fit as it is."""
    tokens = tokenizer.encode(prompt or VERIFY_PROMPT)
    if prompt is None:
        tokens = tokens[: max(1, context - steps)]
        return tokens, min(steps, context - len(tokens))
    if len(tokens) + steps > context:
        raise OpenELMError(
            f"the prompt ({len(tokens)} tokens) and {steps} steps exceed the package's context "
            f"of {context} tokens: use a shorter --prompt or fewer --steps"
        )
    return tokens, steps


def compare(runner, reference, tokens: List[int], steps: int, backend: str, rtol: float) -> BackendReport:
    """Prefill `tokens`, then `steps` decode steps fed with MLX's greedy tokens (teacher forcing)."""
    cache = make_cache(reference)
    report = BackendReport(backend, tolerance=0.0)
    feed = tokens
    with progress_bar(total=steps + 1, desc=f"verify {backend}", unit="step") as bar:
        for k in range(steps + 1):
            bar.set_postfix_str(f"prefill {len(feed)} tokens" if k == 0 else f"decode {k}/{steps}")
            start = time.perf_counter()
            ref = np.array(reference(mx.array([feed]), cache=cache)[0, -1].astype(mx.float32))
            with ticking(bar):  # one runtime call: Apple's Linux runtime takes minutes in float16
                got = runner.prefill(feed) if k == 0 else runner.decode(feed[0])
            bar.update()
            if k == 1:  # a decode step measures the rest (the prefill is one call of many tokens)
                announce(
                    bar,
                    f"verify {backend}: a prefill and {steps} decode steps",
                    time.perf_counter() - start,
                    steps,
                    "decode step",
                )
            tol = rtol * max(1.0, float(np.abs(ref).max()))
            report.tolerance = max(report.tolerance, tol)
            top2 = np.sort(ref)[-2:]
            name = f"prefill[{len(feed)}]" if k == 0 else f"decode {k}"
            with np.errstate(invalid="ignore"):
                diff = float(np.abs(got - ref).max())
            theirs, ours = int(ref.argmax()), int(got.argmax())
            margin = float(top2[1] - top2[0])
            step = Step(name, diff, theirs, ours, margin, (float(ref[theirs]), float(ref[ours])))
            report.steps.append(step)
            if not np.all(np.isfinite(got)):
                report.problem = f"{name}: non-finite logits (float16 overflow in the package?)"
            elif step.max_abs_diff > tol:
                report.problem = (
                    f"{name}: max |logits difference| {step.max_abs_diff:.4g} exceeds the tolerance {tol:.4g}"
                )
            elif step.package_token != step.reference_token and step.margin > 2 * step.max_abs_diff:
                report.problem = (
                    f"{name}: greedy token {step.package_token} != MLX's {step.reference_token} although "
                    f"MLX's top-2 margin {step.margin:.3g} exceeds twice the difference"
                )
            if report.problem:
                break
            feed = [step.reference_token]
    return report


def verify_package(
    package,
    model,
    info: PackageInfo,
    package_weights: Callable[[Sequence[str]], Dict[str, np.ndarray]],
    runners: List[Tuple[str, Callable]],
    skipped: List[str],
    steps: int,
    prompt: Optional[str],
    tokenizer,
    rtol: Optional[float] = None,
    beside: Optional[Path] = None,
) -> VerifyReport:
    """Check a saved package against the MLX model `model` (see the module docstring).
    `package_weights(names)` reads the named weights back from the package (float32, decompressed,
    [out, in]); `runners` are (backend name, factory of a PackageRunner) to compare with MLX;
    `rtol` replaces the logits tolerance of the package's compute precision (LOGITS_RTOL); `beside`
    is the package's own tokenizer file (default: OUT.tokenizer.model beside it)."""
    source, folder = load_model(model, dtype="float32")
    for key in ("num_transformer_layers", "model_dim", "head_dim", "vocab_size", "num_query_heads", "num_kv_heads"):
        if info.config.get(key) != getattr(source.config, key):
            raise OpenELMError(
                f"{package} was exported from a different model: {key} is {info.config.get(key)} "
                f"there and {getattr(source.config, key)} in {model}"
            )
    # Reading a large package's weights back (decompressed) takes tens of seconds: a bar whose
    # clock moves says so on a terminal.
    with progress_bar(total=1, desc="verify: weights", unit="read") as bar, ticking(bar):
        bar.set_postfix_str("read back from the package, compared with the model's")
        expected = fold_ffn_scales(model_weights(source), info.ffn_scale_exponents)
        stored = package_weights(list(expected))
        problems, worst = compare_weights(stored, expected, info)
        bar.update()

    beside = Path(beside or tokenizer_path(package))
    if tokenizer or os.path.lexists(beside):
        tok = package_tokenizer(package, info, tokenizer, beside)
    else:  # an export that has lost its tokenizer: the model's, if it fits
        tok = find_tokenizer(folder)
        check_tokenizer(tok, info, package)
    tokens, steps = prompt_tokens(tok, prompt, info.context, steps)
    reports = []
    if not problems:
        reference = weights_model(source.config, stored, info)
        for backend, make_runner in runners:
            reports.append(
                compare(make_runner(), reference, tokens, steps, backend, rtol or LOGITS_RTOL[info.compute_precision])
            )
    return VerifyReport(str(package), info.compression, info.compute_precision, problems, worst, reports, skipped)


def weights_model(config, stored: Dict[str, np.ndarray], info: PackageInfo) -> Model:
    """An MLX model (float32) of the package's own weights (`stored`, as the package_weights of
    verify_package give them): the package's graph is compared with it, apart from compression."""
    model = Model(config)
    weights = fold_ffn_scales(stored, info.ffn_scale_exponents, unfold=True)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return model


def near_tie(step: Step) -> str:
    """Why a differing greedy token passed: MLX's own logits of the two tokens are closer than the
    package's logits may differ from MLX's (compare: max|Δ| within the tolerance), so either
    token may come out on top."""
    theirs, ours = step.mlx_logits
    return (
        f"{step.name}: {step.reference_token} (MLX) vs {step.package_token} (package), a near tie: MLX's logits "
        f"{theirs:.4g} vs {ours:.4g}, margin {theirs - ours:.3g} ≤ 2 × max|Δ| {2 * step.max_abs_diff:.3g}"
    )


def print_report(report: VerifyReport, as_json: bool = False) -> int:
    """The report as the verify commands print it (as_json: one JSON object); returns the exit code."""
    if as_json:
        print(json_text(report_json(report)))
        return 0 if report.ok else 1
    print(
        f"{report.package} ({report.compression}, {report.compute_precision} compute): "
        f"weights max relative error {report.weight_max_rel_error:.3g}"
    )
    for problem in report.weight_problems[:10]:
        print(f"  weight mismatch: {problem}")
    for b in report.backends:
        print(f"{b.backend}: logits tolerance {b.tolerance:.4g}")
        for s in b.steps:
            mark = "" if s.package_token == s.reference_token else "  <- differs"
            print(
                f"  {s.name:>12}  max|Δ| {s.max_abs_diff:.4g}  token {s.package_token} (MLX {s.reference_token}){mark}"
            )
            if mark and not (b.problem and s is b.steps[-1]):  # a failed step's problem says why
                print(f"  {'':>12}  {near_tie(s)} (tolerance {b.tolerance:.4g})")
        print(
            f"  greedy agreement {b.agreement:.0%} over {len(b.steps)} steps"
            + (f"; FAILED: {b.problem}" if b.problem else "")
        )
    for s in report.skipped:
        print(f"skipped: {s}")
    print("OK" if report.ok else "FAILED")
    return 0 if report.ok else 1


def report_json(report: VerifyReport) -> dict:
    """The report's fields and verdicts, as --json prints them."""
    out = {**asdict(report), "ok": report.ok}
    for backend, fields in zip(report.backends, out["backends"]):
        fields.update(ok=backend.ok, agreement=backend.agreement)
    return out


def add_verify_arguments(parser, suffix: str, exporter: str):
    parser.add_argument("package", help=f"the {suffix} written by `openelm {exporter}`")
    parser.add_argument("--model", required=True, help="the model it was exported from (folder or repo id)")
    parser.add_argument("--steps", type=int, default=16, help="decode steps after the prefill")
    parser.add_argument(
        "--prompt", default=None, help="prompt text for the prefill (default: a sentence, clipped to the context)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the one beside the package)")
    parser.add_argument(
        "--json", action="store_true", help="print the report as one JSON object (the exit status is the same)"
    )


def check_verify_options(steps: int):
    check_options({"steps": steps}, VERIFY_RULES)
