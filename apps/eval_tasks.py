"""`openelm eval tasks`: accuracy on lm-evaluation-harness tasks, for a model folder (MLX) or an
exported package (through its runner), as a table on stdout and JSON/CSV/Markdown in --out.

Tasks are lm-eval's names (their data comes from the Hugging Face Hub) or task YAML files (a local
`json` dataset works offline; `data_files` are read relative to the YAML file). The demo model's
default task is the held-out cloze shipped beside it (benchmarks/make_demo_task.py). `--paper` runs
the paper's tasks and shot counts; BOS starts every context unless --no-bos (Apple's protocol is
lm-eval with add_bos_token=True). lm-eval is imported only by eval_model.py: the [eval] extra.
"""

import csv
import io
import json
import logging
import re
import sys
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import List, Optional, Tuple

from openelm_mlx.errors import OpenELMError
from openelm_mlx.files import json_text
from openelm_mlx.loader import DEMO_MODEL, DTYPES
from openelm_mlx.options import EVAL_TASK_RULES, check_options
from openelm_mlx.outputs import check_output, staged_output

DEMO_TASK = DEMO_MODEL / "tasks" / "demo_cloze.yaml"
BACKENDS = ["mlx", "coreai", "coreml", "mil-reference"]

# The paper's protocol (Apple's model cards): zero-shot on seven tasks, whose figures are published
# per size; the few-shot set is the Open LLM leaderboard's, published as averages only.
PRESETS = {
    "zero-shot": [(t, 0) for t in ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande")],
    "few-shot": [("mmlu", 5), ("winogrande", 5), ("arc_challenge", 25), ("hellaswag", 10), ("truthfulqa_mc2", 0)],
}
# Zero-shot accuracy (%) of the released base models (/work/shared/reference/openelm.md, section 5).
PAPER = {
    "270M": [26.45, 45.08, 53.98, 46.71, 69.75, 84.70, 53.91],
    "450M": [27.56, 48.06, 55.78, 53.97, 72.31, 87.20, 58.01],
    "1_1B": [32.34, 55.43, 63.58, 64.81, 75.57, 90.60, 61.72],
    "3B": [35.58, 59.89, 67.40, 72.44, 78.24, 92.70, 65.51],
}
# The metric each figure is set beside. The model cards do not name it: length-normalized accuracy
# for the tasks whose published figures only it reaches at these sizes (lm-eval's convention for
# ARC, HellaSwag and PIQA), plain accuracy for the others.
PAPER_METRIC = {"arc_challenge": "acc_norm", "arc_easy": "acc_norm", "hellaswag": "acc_norm", "piqa": "acc_norm"}
RELEASED = re.compile(r"apple/OpenELM-(270M|450M|1_1B|3B)$")  # base models: Instruct has averages only


@dataclass
class Row:
    task: str
    metric: str
    value: float  # in %
    stderr: Optional[float]  # in %; None where lm-eval gives none
    items: int
    shots: int
    paper: Optional[float] = None  # the published figure, for a released model


def add_arguments(sub, prog: str):
    p = sub.add_parser(
        "tasks",
        help="accuracy on lm-evaluation-harness tasks",
        description="accuracy on lm-evaluation-harness tasks (lm-eval's names or task YAML files), for a model "
        "folder or an exported package, as a table; the paper's figures beside a released model's",
        command_prog=prog,
    )
    p.add_argument("model", nargs="?", help="model folder, repo id or exported package (default: the demo model)")
    p.add_argument("--tasks", help="comma-separated lm-eval task names or task YAML files (demo model: its cloze)")
    p.add_argument(
        "--paper",
        nargs="?",
        const="zero-shot",
        choices=list(PRESETS),
        help="the paper's tasks and shots (zero-shot when given alone)",
    )
    p.add_argument("--num-fewshot", type=int, help="examples before each item (default: each task's own)")
    p.add_argument("--limit", type=int, help="score only the first N items of each task (default: all)")
    p.add_argument("--backend", default="mlx", choices=BACKENDS, help="what runs the model: MLX or a package runner")
    p.add_argument("--tokenizer", help="tokenizer.model file or folder (default: the model's)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="MLX activation dtype")
    p.add_argument("--no-bos", action="store_true", help="no BOS before contexts (lm-eval's default, not Apple's)")
    p.add_argument("--include-path", type=Path, help="a folder of task YAML files, as lm-eval's --include_path")
    p.add_argument("--seed", type=int, default=1234, help="seed of the draw of few-shot examples, as lm-eval's")
    p.add_argument("--out", type=Path, help="folder for results.json/.csv/.md and samples.jsonl (per item)")
    p.add_argument("--json", action="store_true", help="print results.json's object on stdout instead of the table")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")


def main(args):
    check_options(vars(args), EVAL_TASK_RULES)
    if args.paper and (args.tasks or args.num_fewshot is not None):
        raise OpenELMError("--paper sets the tasks and shots: leave out --tasks and --num-fewshot")
    if args.out is not None:
        check_output(args.out, args.force, reads=[args.model])
    tasks = task_plan(args)  # before lm-eval's import (~1 s) and its index
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # lm-eval logs every step at WARNING
    from openelm_mlx.apps import eval_model  # needs lm_eval, the [eval] extra

    plan = [(*eval_model.load_tasks(names, args.include_path), shots) for names, shots in tasks]
    scorer, tokenizer, source = eval_model.open_scorer(args.model, args.backend, args.tokenizer, args.dtype)
    lm = eval_model.OpenELMLM(scorer, tokenizer, add_bos=not args.no_bos)
    start = time.perf_counter()
    rows, items = [], []
    for specs, manager, shots in plan:
        results = eval_model.run_tasks(lm, specs, manager, shots, args.limit, args.seed)
        rows += rows_of(results)
        items += item_records(lm, results)
    seconds = time.perf_counter() - start
    for row in rows:
        row.paper = paper_figure(source, row)
    meta = {
        "model": str(args.model or DEMO_MODEL),
        "source": source,
        "backend": args.backend,
        "bos": not args.no_bos,
        "limit": args.limit,
        "seconds": round(seconds, 2),
        "lm_eval": version("lm_eval"),
    }
    print(json_text(results_json(rows, meta)) if args.json else table(rows, meta))
    if args.out is not None:
        write_results(args.out, args.force, rows, items, meta, reads=[args.model])


def task_plan(args) -> List[Tuple[list, Optional[int]]]:
    """[(task specs, shots)]: lm-eval takes one shot count per run, so the paper's are grouped."""
    if args.paper:
        shots = {}
        for task, n in PRESETS[args.paper]:
            shots.setdefault(n, []).append(task)
        return [(tasks, n) for n, tasks in shots.items()]
    if args.tasks:
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    elif args.model is None or Path(args.model).resolve() == DEMO_MODEL.resolve():
        names = [str(DEMO_TASK)]
    else:
        raise OpenELMError("no task given: pass --tasks arc_easy,piqa,... (lm-eval names or YAML files) or --paper")
    if not names:
        raise OpenELMError("--tasks holds no task name: pass --tasks arc_easy,piqa,...")
    return [(names, args.num_fewshot)]


def rows_of(results: dict) -> List[Row]:
    rows = []
    for task, metrics in results["results"].items():
        items = results["n-samples"].get(task, {}).get("effective", 0)
        shots = results.get("n-shot", {}).get(task, 0)
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or not isinstance(value, (int, float)) or not filt:
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            stderr = 100 * stderr if isinstance(stderr, (int, float)) else None
            rows.append(Row(task, metric, 100 * value, stderr, items, shots))
    return rows


def item_records(lm, results: dict) -> List[dict]:
    """Per multiple-choice item: each choice's loglikelihood and continuation tokens, and its acc
    (samples.jsonl in --out: what benchmarks/eval_packages.py bounds a package's change with)."""
    records = []
    for task, samples in results.get("samples", {}).items():
        for sample in samples:
            scores = [r[0] for r in sample["resps"]]
            if "acc" not in sample or not all(isinstance(x, (tuple, list)) and len(x) == 2 for x in scores):
                continue  # not a loglikelihood-scored choice among several
            records.append(
                {
                    "task": task,
                    "doc_id": sample["doc_id"],
                    "acc": sample["acc"],
                    "loglikelihoods": [float(logprob) for logprob, _ in scores],
                    "tokens": [len(lm.encode_pair(*args)[1]) for args in sample["arguments"]],
                }
            )
    return records


def paper_figure(source: str, row: Row) -> Optional[float]:
    """The published zero-shot figure for a released base model's task and metric, else None."""
    match = RELEASED.search(source or "")
    tasks = [t for t, _ in PRESETS["zero-shot"]]
    if not match or row.task not in tasks or row.shots != 0 or row.metric != PAPER_METRIC.get(row.task, "acc"):
        return None
    return PAPER[match.group(1)][tasks.index(row.task)]


COLUMNS = ["task", "metric", "value", "stderr", "items", "shots", "paper"]


def _cells(row: Row) -> List[str]:
    stderr = "" if row.stderr is None else f"± {row.stderr:.2f}"
    paper = "" if row.paper is None else f"{row.paper:.2f}"
    return [row.task, row.metric, f"{row.value:.2f}", stderr, str(row.items), str(row.shots), paper]


def table(rows: List[Row], meta: dict) -> str:
    """The stdout table; the same as results.md's."""
    lines = [f"| {' | '.join(COLUMNS)} |", f"|{'---|' * len(COLUMNS)}"]
    lines += [f"| {' | '.join(_cells(r))} |" for r in rows]
    items = sum({r.task: r.items for r in rows}.values())
    per_100 = f", {100 * meta['seconds'] / items:.1f} s per 100 items" if items else ""
    bos = "BOS before every context" if meta["bos"] else "no BOS"
    head = f"model: {meta['model']} ({meta['backend']}; {bos}); source: {meta['source']}"
    return "\n".join([head, "accuracy in %, ± its standard error", *lines, f"time: {meta['seconds']:.1f} s{per_100}"])


def results_json(rows: List[Row], meta: dict) -> dict:
    """results.json's object, which --json prints."""
    return {**meta, "results": [asdict(r) for r in rows]}


def write_results(out: Path, force: bool, rows: List[Row], items: List[dict], meta: dict, reads):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    with staged_output(out, force, reads) as tmp:
        tmp.mkdir()
        (tmp / "results.json").write_text(json_text(results_json(rows, meta)) + "\n")
        (tmp / "results.csv").write_text(text.getvalue())
        (tmp / "results.md").write_text(table(rows, meta) + "\n")
        (tmp / "samples.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    # on stderr: stdout holds the results alone
    print(f"wrote {out}/results.json, results.csv, results.md, samples.jsonl", file=sys.stderr)
