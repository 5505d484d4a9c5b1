"""Bad-input rows for `openelm eval tasks`: option values, task names and task files that are not
tasks, data that the task cannot read, outputs, and lm-eval missing. Each row runs through
tests/test_bad_input.py's runner; every row fails before a request is scored."""

from bad_input import SHADOW, Row, both, category, missing_module, nothing, root_file, root_folder

from openelm_mlx.apps.eval_tasks import DEMO_TASK

TASKS = ("eval", "tasks", "{model}", "--tasks", "task.yaml", "--limit", "2")
YAML = DEMO_TASK.read_text().replace("demo_cloze.jsonl", "items.jsonl")
COUNT = "must be an integer from 1 to 2,147,483,648, got"


def task(data: bytes, yaml: str = YAML):
    """root/task.yaml (the demo cloze's) reading root/items.jsonl, which holds `data`."""
    return both(root_file("task.yaml", yaml.encode()), root_file("items.jsonl", data))


ITEM = b'{"context": "In the beginning", "choices": ["God created", "the end"], "label": 0}\n'

EVAL_TASK_ROWS = category(
    "eval-tasks",
    Row("limit-0", (*TASKS, "--limit", "0"), task(ITEM), f"--limit {COUNT} 0"),
    Row("limit-negative", (*TASKS, "--limit", "-4"), task(ITEM), f"--limit {COUNT} -4"),
    Row("limit-fraction", (*TASKS, "--limit", "0.5"), task(ITEM), "argument --limit: invalid int value", exit=2),
    Row("fewshot-negative", (*TASKS, "--num-fewshot", "-1"), task(ITEM), "--num-fewshot must be an integer from 0"),
    Row("backend-unknown", (*TASKS, "--backend", "metal"), task(ITEM), "argument --backend: invalid choice", exit=2),
    Row("backend-needs-package", (*TASKS, "--backend", "coreai"), task(ITEM), "is not a Core AI bundle"),
    Row("paper-and-tasks", (*TASKS, "--paper"), task(ITEM), "--paper sets the tasks and shots"),
    Row("no-task", ("eval", "tasks", "{model}"), nothing, "no task given: pass --tasks"),
    Row(
        "unknown-task",
        ("eval", "tasks", "{model}", "--tasks", "arc_easyy"),
        nothing,
        "unknown task 'arc_easyy' (close: arc_easy",
    ),
    Row("task-file-missing", TASKS, nothing, "no task file at task.yaml"),
    Row("task-file-not-yaml", TASKS, task(ITEM, "task: [unclosed\n"), "task.yaml is not a valid task file"),
    Row("task-file-no-task", TASKS, task(ITEM, "dataset_path: json\n"), "it names no `task`"),
    Row("data-file-missing", TASKS, root_file("task.yaml", YAML.encode()), "items.jsonl does not exist"),
    Row("data-not-json", TASKS, task(b'{"context": "a", "choices": ["b"'), "cannot read the data of demo_cloze"),
    Row("data-other-fields", TASKS, task(b'{"text": "a"}\n'), "'context' is undefined"),
    Row("out-there", (*TASKS, "--out", "{out}"), both(task(ITEM), root_folder("out")), "out already exists"),
    Row(
        "float16-overflow",
        (*TASKS, "--dtype", "float16"),
        task(ITEM),
        "not finite (inf or NaN) in float16",
        base="massive",
    ),
    Row(
        "no-lm-eval", TASKS, both(task(ITEM), missing_module("lm_eval")), "pip install 'openelm-mlx[eval]'", env=SHADOW
    ),
)
