"""OpenELM on lm-evaluation-harness: the model (`OpenELMLM`, answering lm-eval's three requests,
loglikelihood, loglikelihood_rolling and generate_until, with either scorer below) and the tasks
(`load_tasks`, `run_tasks`). The one module that imports lm-eval: the [eval] extra.

- `ModelScorer`: the MLX model. A context shared by several continuations (every choice of a
  multiple-choice item) is scored once: its KV cache is filled once, each continuation runs on top
  of it, and the cache is trimmed back to the context (openelm_mlx/cache.py) for the next one.
- `RunnerScorer`: an exported package through its PackageRunner (convert/package_runner.py), so a
  package's accuracy is measured on what the app runs. The context is prefilled once; each
  continuation is one decode per token after the runner rewinds to the context (its cache slots
  past the context are rewritten before they are read), reading the logits each call returns: a
  runner returns the last position's only.

Tokens as lm-eval's Hugging Face model makes them (lm_eval/models/huggingface.py, `_encode_pair`):
the context's trailing spaces move to the continuation, the pair is encoded whole, and the
continuation is what follows the context's own tokens. BOS starts every context when `add_bos`
(Apple's protocol, `add_bos_token=True`); an empty context without it is BOS alone, as lm-eval does.
"""

import contextlib
import difflib
import io
import logging
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Collection, Iterable, List, Optional, Sequence, Tuple

import datasets
import lm_eval
import mlx.core as mx
import numpy as np
from datasets.exceptions import DatasetGenerationError
from jinja2 import TemplateError
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from openelm_mlx.cache import make_cache
from openelm_mlx.checkpoint import resolve_source
from openelm_mlx.convert.runner import PackageModel, load_package
from openelm_mlx.errors import OpenELMError
from openelm_mlx.files import read_json
from openelm_mlx.generate import GenerationOptions, prefill, stream_generate
from openelm_mlx.loader import DEMO_MODEL, load
from openelm_mlx.overflow import OTHER_DTYPE_OPTION, check_finite
from openelm_mlx.progress import progress_bar
from openelm_mlx.tokenizer import Tokenizer

LM_EVAL_TASKS = Path(lm_eval.tasks.__file__).parent
# A name lm-eval's index would read from a task file: `task: arc_easy`, `group: mmlu`, `tag: ai2_arc`.
DECLARED = re.compile(rb"^(?:task|group|tag):\s*['\"]?([\w.\-]+)", re.MULTILINE)
DEFAULT_GEN_TOKENS = 256  # lm-eval's own default for a task that names no max_gen_toks
Score = Tuple[float, bool]  # (log-probability of the continuation, whether greedy decoding gives it)


def open_scorer(model, backend: str, tokenizer=None, dtype: str = "auto"):
    """(scorer, tokenizer, source): the MLX model or an exported package's runner, and what its
    weights came from (config.json's converted_by.source, the package's openelm.source_model)."""
    if backend == "mlx":
        mlx_model, tok = load(model, tokenizer, dtype)
        converted = read_json(resolve_source(model or DEMO_MODEL) / "config.json").get("converted_by") or {}
        return ModelScorer(mlx_model), tok, str(converted.get("source") or model or "demo model")
    package, tok = load_package(model, backend, tokenizer)
    converted = package.runner.info.config.get("converted_by") or {}
    return RunnerScorer(package.runner), tok, str(converted.get("source") or package.runner.info.source_model)


class ModelScorer:
    """The MLX model: the context's cache is filled once and trimmed back after each continuation."""

    def __init__(self, model):
        self.model = model
        self.context = model.config.max_context_length
        self.generator = model

    def score(self, context: List[int], continuations: Sequence[List[int]]) -> List[Score]:
        cache = make_cache(self.model)
        prefill(self.model, context[:-1], cache)
        first = self._logprobs(context[-1:], cache)[0]  # for every continuation's first token
        scores = []
        for cont in continuations:
            logprob, greedy = float(first[cont[0]]), bool(mx.argmax(first).item() == cont[0])
            if len(cont) > 1:
                rest = self._logprobs(cont[:-1], cache)
                targets = mx.array(cont[1:])
                logprob += mx.take_along_axis(rest, targets[:, None], axis=-1).sum().item()
                greedy &= bool(mx.all(mx.argmax(rest, axis=-1) == targets).item())
                for c in cache:
                    c.trim(len(cont) - 1)  # back to the context, for the next continuation
            scores.append((logprob, greedy))
        return scores

    def _logprobs(self, tokens: List[int], cache) -> mx.array:
        logits = self.model(mx.array(tokens)[None], cache=cache)[0]
        check_finite(logits, logits.dtype, OTHER_DTYPE_OPTION)  # float16 overflow: say so, not score NaN
        logits = logits.astype(mx.float32)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def reset(self):
        pass  # each generation makes its own cache


class RunnerScorer:
    """An exported package: the context prefilled once; each continuation decoded token by token
    after a rewind to the context (PackageRunner.rewind, as Apple's engines reuse a prefix)."""

    def __init__(self, runner):
        self.runner = runner
        self.context = runner.info.context
        self.generator = PackageModel(runner)

    def score(self, context: List[int], continuations: Sequence[List[int]]) -> List[Score]:
        self.runner.reset()
        first = self.runner.prefill(context)  # for every continuation's first token
        scores = []
        for cont in continuations:
            self.runner.rewind(len(context))  # back to the context, for this continuation
            logits = [first] + [self.runner.decode(t) for t in cont[:-1]]
            logprobs = [_log_softmax(x) for x in logits]
            logprob = sum(float(lp[t]) for lp, t in zip(logprobs, cont))
            scores.append((logprob, all(int(np.argmax(lp)) == t for lp, t in zip(logprobs, cont))))
        return scores

    def reset(self):
        self.runner.reset()  # the package keeps its cache: a new prompt starts from position 0


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


class OpenELMLM(LM):
    """lm-eval's model interface over a scorer; batch size 1, greedy generation."""

    def __init__(self, scorer, tokenizer: Tokenizer, add_bos: bool = True, progress: bool = True):
        super().__init__()
        self.scorer, self.tokenizer, self.add_bos, self.progress = scorer, tokenizer, add_bos, progress

    def encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        """As lm-eval's TemplateLM (api/model.py: _encode_pair, and loglikelihood's empty context):
        trailing whitespace of the context moves to the continuation; an empty context is BOS."""
        if not context:
            whole = self.tokenizer.encode(continuation, bos=False)
            bos = self.tokenizer.bos_id
            return ([bos], whole) if whole[:1] != [bos] else (whole[:1], whole[1:])
        spaces = len(context) - len(context.rstrip())
        context, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx) :]

    def _encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, bos=self.add_bos) or [self.tokenizer.bos_id]

    def loglikelihood(self, requests) -> List[Score]:
        return self.score_pairs([self.encode_pair(*r.args) for r in requests])

    def score_pairs(self, pairs: Sequence[Tuple[List[int], List[int]]]) -> List[Score]:
        """Scores of (context tokens, continuation tokens) pairs, each context scored once."""
        groups = defaultdict(list)  # context -> [(request index, continuation)]
        for i, (ctx, cont) in enumerate(pairs):
            groups[tuple(ctx)].append((i, cont))
        results = [None] * len(pairs)
        for ctx, members in progress_bar(groups.items(), show=self.progress, desc="loglikelihood", unit="context"):
            conts = [cont for _, cont in members]
            scores = self.scorer.score(self._fit(list(ctx), conts), conts)
            for (i, _), score in zip(members, scores):
                results[i] = score
        return results

    def _fit(self, context: List[int], continuations: Sequence[List[int]]) -> List[int]:
        """The context cut from the front so that the longest continuation fits the model's context
        (the model sees the context and all but the last continuation token), as lm-eval's HF model."""
        if any(not cont for cont in continuations):
            raise OpenELMError("a task gave a continuation of no tokens: check its doc_to_choice/doc_to_target")
        room = self.scorer.context + 1 - max(len(cont) for cont in continuations)
        if room < 1:
            raise OpenELMError(
                f"a continuation of {self.scorer.context + 1 - room} tokens does not fit the model's context of "
                f"{self.scorer.context}"
            )
        return context[-room:]

    def loglikelihood_rolling(self, requests) -> List[float]:
        """Each text in windows of the model's context: every token scored once, BOS first, as
        `openelm eval ppl` scores a document."""
        results = []
        for r in progress_bar(requests, show=self.progress, desc="loglikelihood_rolling", unit="text"):
            tokens = self.tokenizer.encode(r.args[0], bos=False)
            windows = get_rolling_token_windows(tokens, self.tokenizer.bos_id, self.scorer.context, 1)
            pairs = [make_disjoint_window(w) for w in windows]
            results.append(sum(logprob for logprob, _ in self.score_pairs(pairs)))
        return results

    def generate_until(self, requests) -> List[str]:
        """Greedy text after each context, cut at the first of its `until` strings."""
        results = []
        for r in progress_bar(requests, show=self.progress, desc="generate_until", unit="text"):
            context, options = r.args
            self.scorer.reset()
            chunks = stream_generate(
                self.scorer.generator,
                self.tokenizer,
                self._encode(context),
                GenerationOptions(
                    max_tokens=options.get("max_gen_toks", DEFAULT_GEN_TOKENS),
                    stop=_strings(options.get("until", [])),
                    truncate=True,
                ),
            )
            results.append("".join(chunk.text for chunk in chunks))
        return results


def _strings(until) -> Iterable[str]:
    return [until] if isinstance(until, str) else list(until)


def load_tasks(names: List[str], include_path: Optional[Path]):
    """(lm-eval task specs, the TaskManager that knows them), checked before the model is loaded."""
    if include_path is not None and not include_path.is_dir():
        raise OpenELMError(f"--include-path {include_path} is not a folder: pass a folder of task YAML files")
    specs = [task_spec(name) for name in names]
    registered = [s for s in specs if isinstance(s, str)]
    manager = TaskManager(include_path=include_path, include_defaults=False)
    missing = [name for name in registered if name not in manager.all_tasks]
    if missing:
        refuse_unmentioned(missing)
        manager = TaskManager(include_path=include_path)  # lm-eval's ~14,000 task files parsed: 8-14 s
    for name in registered:
        if name not in manager.all_tasks:
            raise unknown_task(name, manager.all_tasks)
    return specs, manager


def refuse_unmentioned(names: List[str]):
    """One line for a name that no file in lm-eval's task folder holds, before TaskManager parses
    its ~14,000 task files: read as bytes they take about a second. Every task, group and tag lm-eval
    knows is named in a task file or in a file one includes (`_arc_yaml`, no suffix), so such a
    name is none of them; a name found anywhere, or a file that cannot be read, leaves it to the index."""
    left, declared = [name.encode() for name in names], set()
    for path in LM_EVAL_TASKS.rglob("*"):
        if "__pycache__" in path.parts or not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            return
        left = [name for name in left if name not in data]
        if not left:  # every name found: the rest need not be read
            return
        declared.update(name.decode(errors="replace") for name in DECLARED.findall(data))
    raise unknown_task(left[0].decode(), declared)


def unknown_task(name: str, known: Collection[str]) -> OpenELMError:
    close = difflib.get_close_matches(name, known, n=3)  # by score: the order of `known` is not used
    hint = f" (close: {', '.join(close)})" if close else ""
    return OpenELMError(
        f"unknown task '{name}'{hint}: give an lm-eval task name (lm-eval ls tasks), a task YAML file, "
        "or --include-path DIR for a folder of them"
    )


def run_tasks(lm: LM, specs: list, manager, shots: Optional[int], limit: Optional[int], seed: int) -> dict:
    """lm-eval's results of `specs`; what lm-eval and datasets raise for a task's data, one line."""
    # datasets logs a file it cannot parse, and draws a bar per split: the error line says it all
    datasets.disable_progress_bars()
    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    names = ", ".join(s if isinstance(s, str) else s["task"] for s in specs)
    # lm-eval draws a bar while it builds the requests, with no option to turn it off: off a
    # terminal it goes nowhere, as ours do (logging keeps its own handle on stderr)
    quiet = contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=specs,
                num_fewshot=shots,
                limit=limit,
                task_manager=manager,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=None,
                fewshot_random_seed=seed,
                bootstrap_iters=1000,
            )
    except ConnectionError as e:
        raise OpenELMError(f"cannot download the data of {names} ({e}): offline, use local task files") from None
    except DatasetGenerationError as e:  # what datasets raises for a data file it cannot parse
        why = " ".join(str(e.__cause__ or e).split())[:200]
        raise OpenELMError(f"cannot read the data of {names}: {why}: fix the task's data files") from None
    except TemplateError as e:
        raise OpenELMError(f"the prompts of {names} do not fit their data ({e}): fix the task's doc_to_*") from None
    return results


def task_spec(name: str):
    """An lm-eval task name as is, or a YAML file as lm-eval's config dict with its `data_files`
    made absolute (lm-eval would read them against the current folder)."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        return name
    if not path.is_file():
        raise OpenELMError(f"no task file at {path}: pass an existing YAML file or an lm-eval task name")
    try:
        config = load_yaml(path)
    except Exception as e:  # yaml's, lm-eval's and a !function's errors alike: the file is not a task
        raise OpenELMError(f"{path} is not a valid task file: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(config.get("task"), str):
        raise OpenELMError(f"{path} is not a valid task file: it names no `task`")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, (str, list, dict)):
        config["dataset_kwargs"]["data_files"] = _absolute(files, path.parent)
    return config


def _absolute(files, folder: Path):
    if isinstance(files, dict):
        return {split: _absolute(f, folder) for split, f in files.items()}
    if isinstance(files, list):
        return [_absolute(f, folder) for f in files]
    full = folder / files
    if not full.is_file():
        raise OpenELMError(f"the task's data file {full} does not exist: fix data_files in the task YAML")
    return str(full.resolve())
