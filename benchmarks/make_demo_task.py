"""Build the demo model's held-out task: `python -m openelm_mlx.benchmarks.make_demo_task`.

A 4-way cloze over the verses of `openelm_mlx/demo_model/validation.txt` (text the demo model never
trained on): the context is the verse before and the start of a verse, the choices are the verse's
last ENDING_WORDS words and the last words of three other verses of the held-out text. A model that
has learned the language picks the true ending far more often than chance (25%).

Deterministic (a fixed seed, the text's own order), so the committed files are what this writes.
"""

import json
import random
import re

from openelm_mlx.loader import DEMO_MODEL

TASK_DIR = DEMO_MODEL / "tasks"
TASK_NAME = "demo_cloze"
ENDING_WORDS = 5  # words a choice holds: long enough to tell apart, short enough to stay a cloze
MIN_WORDS, MAX_WORDS = 10, 40  # verses kept: a context of at least 5 words, none too long
ITEMS = 300
SEED = 18  # issue 18

# The task as lm-eval reads it; `data_files` is resolved against this file's folder by
# `openelm eval tasks` (lm-eval itself reads it against the current folder).
YAML = f"""\
# Built by benchmarks/make_demo_task.py: do not edit, rerun it.
task: {TASK_NAME}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {TASK_NAME}.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def verses(text: str):
    """Sentences and clauses of the text, in order: cut after . ? ; : before a capital letter."""
    for line in text.splitlines():
        yield from re.split(r"(?<=[.?;:]) (?=[A-Z(])", line.strip())


def build_items(text: str):
    rng = random.Random(SEED)
    all_verses = [v for v in verses(text) if v]
    kept = [i for i, v in enumerate(all_verses) if MIN_WORDS <= len(v.split()) <= MAX_WORDS and i > 0]
    endings = [" ".join(all_verses[i].split()[-ENDING_WORDS:]) for i in kept]
    items = []
    for n in sorted(rng.sample(range(len(kept)), min(ITEMS, len(kept)))):
        i, words = kept[n], all_verses[kept[n]].split()
        others = sorted({e for e in endings if e != endings[n]})
        choices = rng.sample(others, 3) + [endings[n]]
        rng.shuffle(choices)
        context = f"{all_verses[i - 1]} {' '.join(words[:-ENDING_WORDS])}"
        items.append({"context": context, "choices": choices, "label": choices.index(endings[n])})
    return items


def main():
    items = build_items((DEMO_MODEL / "validation.txt").read_text(encoding="utf-8"))
    TASK_DIR.mkdir(exist_ok=True)
    (TASK_DIR / f"{TASK_NAME}.yaml").write_text(YAML)
    lines = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    (TASK_DIR / f"{TASK_NAME}.jsonl").write_text(lines, encoding="utf-8")
    print(f"{len(items)} items written to {TASK_DIR}")


if __name__ == "__main__":
    main()
