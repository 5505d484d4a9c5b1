"""Each configuration's accuracy against fp32's, held to what its logit tolerance predicts
(docs/eval.md, "Packages: accuracy through their runners").

    python -m openelm_mlx.benchmarks.eval_packages RESULTS_DIR [--reference fp32]

RESULTS_DIR holds one folder per configuration, each written by `openelm eval tasks ... --out`
(results.json, samples.jsonl); the reference is the fp32 MLX run. Prints the table and writes it
to RESULTS_DIR/table.md and table.json.

The bound. A configuration whose logits differ from fp32's by at most t (absolute, every vocabulary
entry, every position) moves each token's log-probability by at most 2t: its own logit moves by at
most t and the log-sum-exp by at most t. A choice of k tokens then moves by at most 2tk, and an
item's answer (the choice of highest loglikelihood) can change only where fp32's answer b and some
other choice j are closer than 2t(k_b + k_j). Counting those items on the fp32 run (`flippable`)
bounds the change: |acc - acc_fp32| <= flippable / N, and every item whose acc changed must be one
of them.

t is predicted, not fitted to the task: on the shipped calibration text (convert/numerics.py),
the largest |logit difference| between fp32 and MLX running the configuration's own weights
(read back from the package; the quantized folder for q8/q4), plus the graph's tolerance that
verify holds the package to (convert/verify.py's logits_rtol times the largest |logit|, at least 1).
"""

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from openelm_mlx.convert.coreai.bundle import read_bundle
from openelm_mlx.convert.coreai.runtime import read_model
from openelm_mlx.convert.coreai.verify import stored_weights as bundle_weights
from openelm_mlx.convert.coreml.swift_transformers import CoreMLRunner
from openelm_mlx.convert.coreml.verify import stored_weights as mlpackage_weights
from openelm_mlx.convert.numerics import calibration_tokens
from openelm_mlx.convert.package import model_weights
from openelm_mlx.convert.verify import LOGITS_RTOL, logits_rtol, weights_model
from openelm_mlx.files import read_json
from openelm_mlx.loader import load, load_model


def flippable(items: Sequence[dict], tolerance: float) -> List[bool]:
    """Per item (samples.jsonl's loglikelihoods and tokens per choice): whether a logit error of at
    most `tolerance` per token could change its answer (see the module docstring)."""
    flags = []
    for item in items:
        ll, k = item["loglikelihoods"], item["tokens"]
        b = int(np.argmax(ll))  # lm-eval's answer: the first of the highest
        flags.append(any(ll[b] - ll[j] <= 2 * tolerance * (k[b] + k[j]) for j in range(len(ll)) if j != b))
    return flags


@dataclass
class Check:
    name: str
    backend: str
    items: int
    acc: float  # %
    acc_stderr: float  # %
    acc_norm: float  # %
    delta: float  # acc - fp32's acc, in %
    tolerance: Optional[float]  # t, absolute logits (None for the reference)
    flippable: int
    bound: float  # flippable / N, in %
    changed: int  # items whose acc differs from fp32's
    changed_outside: int  # of those, items the bound says cannot change (must be 0)
    observed: float  # max over requests of |loglikelihood - fp32's| / 2k: the t the task itself shows
    seconds_per_100: float

    @property
    def holds(self) -> bool:
        return abs(self.delta) <= self.bound + 1e-9 and self.changed_outside == 0


def check(name: str, folder: Path, reference: List[dict], tolerance: Optional[float]) -> Check:
    """One configuration's results against the reference's on the same items (a --limit run: its
    first N). One task per folder."""
    meta = read_json(folder / "results.json")
    items = _items(folder)
    by_key = {(i["task"], i["doc_id"]): i for i in reference}
    if any((i["task"], i["doc_id"]) not in by_key for i in items):
        raise SystemExit(f"{folder}: items the reference has not scored (run it with the same --tasks)")
    reference = [by_key[(i["task"], i["doc_id"])] for i in items]
    metric = {(r["task"], r["metric"]): r for r in meta["results"]}
    acc, norm = (metric[(items[0]["task"], m)] for m in ("acc", "acc_norm"))
    flags = flippable(reference, tolerance or 0.0)
    changed = [a["acc"] != b["acc"] for a, b in zip(items, reference)]
    observed = max(
        abs(x - y) / (2 * k)
        for a, b in zip(items, reference)
        for x, y, k in zip(a["loglikelihoods"], b["loglikelihoods"], b["tokens"])
    )
    n = len(items)
    return Check(
        name,
        meta["backend"],
        n,
        acc["value"],
        acc["stderr"],
        norm["value"],
        100 * (sum(i["acc"] for i in items) - sum(i["acc"] for i in reference)) / n,
        tolerance,
        sum(flags),
        100 * sum(flags) / n,
        sum(changed),
        sum(c and not f for c, f in zip(changed, flags)),
        observed,
        100 * meta["seconds"] / n,
    )


def _items(folder: Path) -> List[dict]:
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]


def logit_tolerance(reference, model, rtol: float, windows: List[List[int]]) -> Dict[str, float]:
    """t on the calibration windows: max |logits(model) - logits(reference)| (the weights' share)
    plus rtol * max(1, max |logits(reference)|) (the graph's share, verify's tolerance)."""
    weights, largest = 0.0, 1.0
    for tokens in windows:
        ref = reference(mx.array([tokens]))[0].astype(mx.float32)
        got = model(mx.array([tokens]))[0].astype(mx.float32)
        weights = max(weights, mx.abs(got - ref).max().item())
        largest = max(largest, mx.abs(ref).max().item())
    return {"weights": weights, "graph": rtol * largest, "tolerance": weights + rtol * largest}


def configuration_model(meta: dict, reference_model):
    """(MLX model of the configuration's weights, float32; the graph's rtol) of a results.json."""
    model, backend = meta["model"], meta["backend"]
    if backend == "mlx":  # a quantized folder: the same float32 compute as fp32
        return load_model(model, dtype="float32")[0], LOGITS_RTOL["float32"]
    names = list(model_weights(reference_model))
    if backend == "coreai":
        bundle = read_bundle(model)
        info, graph = read_model(bundle)
        stored = bundle_weights(bundle, info, list(graph))(names)
    else:  # the weights read from the saved program, whichever runs it
        runner = CoreMLRunner(model, "mil-reference")
        info, stored = runner.info, mlpackage_weights(runner)(names)
    return weights_model(reference_model.config, stored, info), logits_rtol(backend, info.compute_precision)


def table(checks: List[Check]) -> str:
    head = (
        "| configuration | backend | items | acc (%) | acc_norm (%) | Δacc vs fp32 | t (logits) | flippable items "
        "| bound on Δacc | items changed (outside the bound) | observed t | within | time per 100 items |"
    )
    lines = [head, "|" + "---|" * 13]
    for c in checks:
        t = "" if c.tolerance is None else f"{c.tolerance:.3g}"
        lines.append(
            f"| {c.name} | {c.backend} | {c.items} | {c.acc:.2f} ± {c.acc_stderr:.2f} | {c.acc_norm:.2f} | "
            f"{c.delta:+.2f} | {t} | {c.flippable} | ± {c.bound:.2f} | {c.changed} ({c.changed_outside}) | "
            f"{c.observed:.3g} | {'yes' if c.holds else 'NO'} | {c.seconds_per_100:.0f} s |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a folder of `openelm eval tasks --out` folders")
    parser.add_argument("--reference", default="fp32", help="the fp32 MLX run's folder name")
    args = parser.parse_args(argv)
    folders = sorted(
        (p for p in args.results.iterdir() if (p / "samples.jsonl").is_file()),
        key=lambda p: (p.name != args.reference, p.name),
    )
    reference_items = _items(args.results / args.reference)
    reference_meta = read_json(args.results / args.reference / "results.json")
    reference_model, tokenizer = load(reference_meta["model"], dtype="float32")
    windows = calibration_tokens(tokenizer, reference_model.config.max_context_length)
    checks, tolerances = [], {}
    for folder in folders:
        tolerance = None
        if folder.name != args.reference:
            model, rtol = configuration_model(read_json(folder / "results.json"), reference_model)
            tolerances[folder.name] = logit_tolerance(reference_model, model, rtol, windows)
            tolerance = tolerances[folder.name]["tolerance"]
        checks.append(check(folder.name, folder, reference_items, tolerance))
    text = table(checks)
    print(text)
    (args.results / "table.md").write_text(text + "\n")
    records = [{**asdict(c), "holds": c.holds, "tolerance_parts": tolerances.get(c.name)} for c in checks]
    (args.results / "table.json").write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
