"""The speculation part of `openelm bench`'s report (report.py writes it): a Markdown table with
its notes, and CSV rows, one per model, precision and task."""

from typing import List

SPECULATION_CSV_FIELDS = [
    "model",
    "precision",
    "activation_dtype",
    "task",
    "drafter",
    "prompt_kind",
    "prompt_tokens",
    "trials",
    "plain_decode_tps_median",
    "plain_decode_tps_stdev",
    "speculative_decode_tps_median",
    "speculative_decode_tps_stdev",
    "speedup_median",
    "speedup_min",
    "speedup_max",
    "speedup_total_median",
    "drafted_per_trial",
    "accepted_per_trial",
    "acceptance",
    "tokens_per_call",
    "identical",
    "error",
]


def settings_line(s: dict) -> str:
    speculation = s["speculation"]
    drafter = (
        f"prompt lookup (up to {speculation['prompt_lookup']} drafted tokens)"
        if speculation["prompt_lookup"]
        else f"draft model {speculation['draft_model']} ({speculation['num_draft']} drafted tokens)"
    )
    return (
        f"- Settings: speculative decoding, {drafter}, against plain decoding: greedy, {s['generation_tokens']} "
        f"tokens generated after prompts of up to {s['prompt_tokens']} tokens that fit the context with them, "
        f"{s['trials']} trial pairs after {s['warmup']} warm-up pair (≤ 16 tokens), seed {s['seed']}."
    )


def speculation_rows(results: dict) -> List[dict]:
    """One row per model, precision and task of a speculation run."""
    out = []
    for e in results["speculation"]:
        row = {k: e.get(k) for k in SPECULATION_CSV_FIELDS}
        s = e.get("summary")
        if s:
            row["trials"] = s["speedup"]["n"]
            for metric in ("plain_decode_tps", "speculative_decode_tps", "speedup"):
                row[f"{metric}_median"] = s[metric]["median"]
            for metric in ("plain_decode_tps", "speculative_decode_tps"):
                row[f"{metric}_stdev"] = s[metric]["stdev"]
            row.update(speedup_min=s["speedup"]["min"], speedup_max=s["speedup"]["max"])
            row["speedup_total_median"] = s["speedup_total"]["median"]
            row.update({k: s[k] for k in ("drafted_per_trial", "accepted_per_trial", "acceptance")})
            row.update({k: s[k] for k in ("tokens_per_call", "identical")})
        out.append(row)
    return out


def speculation_lines(results: dict) -> List[str]:
    """The speculation table (Markdown), its notes and its failures."""
    entries = results["speculation"]
    lines = [
        "",
        "Speculative against plain greedy decoding of the same model, prompt and length (interleaved pairs, "
        "fresh caches; median ± stdev over trials, speed-up: median of per-pair ratios, min–max):",
        "",
        "| model | precision | task | drafter | plain tok/s | speculative tok/s | speed-up | acceptance "
        "| tokens/call | identical |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for e in entries:
        s = e.get("summary")
        if not s:
            continue
        acceptance = "–" if s["acceptance"] is None else f"{s['acceptance']:.0%}"
        up = s["speedup"]
        lines.append(
            f"| {e['model']} | {e['precision']} ({e['activation_dtype']}) | {e['task']} ({e['prompt_tokens']} "
            f"{'text' if e['prompt_kind'] == 'text' else 'random'} tokens) | {e['drafter']} "
            f"| {_pm(s['plain_decode_tps'], 2)} | {_pm(s['speculative_decode_tps'], 2)} "
            f"| {up['median']:.2f}× ({up['min']:.2f}–{up['max']:.2f}) | {acceptance} | {s['tokens_per_call']:.2f} "
            f"| {'yes' if s['identical'] else '**NO**'} |"
        )
    notes = dict.fromkeys(f"- {e['model']}: {e['note']}" for e in entries if e.get("note"))
    failed = [f"- {e['model']} {e['precision']} {e['task']}: {e['error']}" for e in entries if e.get("error")]
    lines += ["", *notes] if notes else []
    lines += ["", "Failed or interrupted:", "", *failed] if failed else []
    return lines + [
        "",
        "tok/s: decode speed, tokens after the first ÷ the time since the first (as `openelm generate` "
        "reports it; the prefill and first call are in neither). Acceptance: accepted ÷ drafted tokens. "
        "Tokens/call: generated tokens ÷ the target model's forward passes after the prefill (plain: 1). "
        "Identical: the speculative tokens equal the plain greedy tokens in every trial.",
    ]


def _pm(stats: dict, digits: int) -> str:
    return f"{stats['median']:.{digits}f} ± {stats['stdev']:.{digits}f}"
