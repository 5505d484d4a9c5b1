"""A bundle's Core AI model run by Apple's runtime (coreai.runtime: on Linux the reference runtime in
the coreai-core wheel, on macOS 27 the OS framework): what the engine twins share (CoreAIEngine,
behind the shared PackageRunner), the integrity check, and the model read back once per open
(read_model: its openelm.* metadata held to the program)."""

import asyncio
import hashlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import weakref
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Dict, List, Tuple

from openelm_mlx.errors import OpenELMError
from openelm_mlx.files import open_regular, parse_json, read_bytes, read_json

from ..package import require
from ..package_input import PackageInfo, check_files, check_graph
from ..package_runner import PackageRunner
from .bundle import LOGITS, Bundle, check_static_functions, engine_kind

# The model's own metadata.json: a few kilobytes (the chat template is the largest field).
MAX_METADATA_BYTES = 1 << 20
log = logging.getLogger(__name__)
SHAPE = re.compile(r"NDArray \((\w+), ([^)]*)\)")  # the runtime's "NDArray (Float16, 1 × ? × 384)"
# Said once per engine, before its first model step: Apple's reference runtime on Linux computes
# float16 ~300x slower than float32 (2 tokens in 180 s for a float16 export of the 270M shape).
SLOW_FLOAT16 = (
    "note: {bundle} computes in float16, which Apple's reference runtime on Linux runs ~300x slower "
    "than float32 (minutes per token for the 270M shape): to check an export on Linux, make it with "
    "`openelm export-coreai --compute-precision float32`"
)


def check_integrity(package: Path) -> bytes:
    """main.mlirb against the SHA-256 that save_asset wrote to main.hash (returned). Core AI's
    bytecode reader aborts the whole process on some corruptions (a C++ terminate, nothing to
    catch), so a changed or damaged file is refused here, before anything parses it (and read_graph
    isolates the rest)."""
    check_files(package)
    expected = read_bytes(package / "main.hash", 64)
    digest = hashlib.sha256()
    with open_regular(package / "main.mlirb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    if digest.digest() != expected:
        raise OpenELMError(f"{package}/main.mlirb does not match its main.hash (corrupted or edited): re-export it")
    return expected


def read_model(bundle: Bundle) -> Tuple[PackageInfo, Dict[str, dict]]:
    """The bundle's model, read once per open (main.mlirb hashed once): (its openelm.* metadata,
    held to the bundle's metadata.json and to the program's functions and states as the runtime
    reads them; the program's functions, read_graph's)."""
    meta = read_json(bundle.asset / "metadata.json", MAX_METADATA_BYTES, "re-export the bundle")
    meta = meta.get("creatorDefinedMetadata") if isinstance(meta, dict) else None
    info = PackageInfo.from_metadata(meta, bundle.asset, "export-coreai")
    for key, value in (("max_context_length", info.context), ("vocab_size", info.vocab_size)):
        if getattr(bundle, key) != value:
            raise OpenELMError(
                f"{bundle.path}/metadata.json: language.{key} {getattr(bundle, key)} is not the model's {value}: "
                "re-export the bundle"
            )
    graph = read_graph(bundle)
    names = list(graph)
    if engine_kind(names) == "sequential":
        # the dynamic engine's states: [layers, 1, kv heads, context, head dim]; logits [1, q, vocab]
        states = _shapes(graph, bundle.main_functions[0], "states").values()
        contexts = [shape[-2] for shape in states if len(shape) == 5]
        vocab = [shape[-1] for shape in _shapes(graph, bundle.main_functions[0], "outputs").values()][:1]
    else:  # the static engine's own checks hold its functions to the context (StaticShapeEngine, Swift:94-108)
        check_static_functions(bundle, names)
        contexts = []
        # out_logits [1, 1, q, vocab] of every extend (prompt_opt's is a dummy [1]), read by vocab_size rows
        vocab = [_shapes(graph, n, "outputs").get(LOGITS, [None])[-1] for n in names if n.startswith("extend")]
    check_graph(info, bundle.path, "export-coreai", contexts, vocab)
    return info, graph


def _shapes(graph: dict, function: str, kind: str) -> Dict[str, list]:
    """{name: shape (None for a dynamic dimension)} of a function's inputs, outputs or states."""
    if function not in graph:
        raise OpenELMError(f"the model has no function '{function}' (it has {', '.join(graph)}): re-export the bundle")
    shapes = {}
    for name, kind_text in graph[function][kind].items():
        match = SHAPE.fullmatch(str(kind_text))
        dims = match.group(2).split(" × ") if match else []
        shapes[name] = [int(d) if d.isdigit() else None for d in dims] or [None]
    return shapes


_GRAPHS: Dict[tuple, dict] = {}  # read_graph's answers in this process, by the program's path and hash


def read_graph(bundle: Bundle) -> dict:
    """The model's functions {name: {"inputs"|"outputs"|"states": {name: type}}}, read and loaded
    by Apple's runtime in a child process (probe.py: a damaged program aborts that process, not
    this one; about 0.9 s, measured on the tiny test bundles, mostly importing coreai), once per
    program per process."""
    key = (str(bundle.asset.resolve()), check_integrity(bundle.asset))
    if key not in _GRAPHS:
        require("coreai.runtime", "coreai")
        child = subprocess.run(
            [sys.executable, "-m", "openelm_mlx.convert.coreai.probe", str(bundle.asset)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        fail = f"{bundle.path} cannot be loaded by Core AI: {{}}; re-export it"
        if child.returncode < 0:
            why = (
                f"the runtime aborted reading {bundle.asset.name}/main.mlirb ({signal.Signals(-child.returncode).name})"
            )
            raise OpenELMError(fail.format(why))
        try:
            report = parse_json(child.stdout, "the runtime's report")
        except OpenELMError:
            report = {"error": f"the runtime ended with status {child.returncode}"}
        if not isinstance(report, dict) or "error" in report or not report.get("functions"):
            raise OpenELMError(fail.format(report.get("error", "the model holds no function")))
        _GRAPHS[key] = report["functions"]
    return _GRAPHS[key]


class CoreAIEngine(PackageRunner):
    """What every engine twin shares: one `async with asset.executable()` open on one event loop
    for the engine's life (loading lowers the program for the device, so it is done once), the
    named functions loaded from it, and calls that update NDArray states in place. Engines provide
    reset(), prefill() and decode()."""

    def __init__(self, bundle: Bundle, info: PackageInfo, functions: List[str]):
        super().__init__(bundle.path, info)
        require("coreai.runtime", "coreai")
        from coreai.authoring import AIModelAsset

        self.bundle = bundle
        self._slow_note = sys.platform == "linux" and self.info.compute_precision == "float16"
        self._loop = asyncio.new_event_loop()
        self._stack = AsyncExitStack()
        self._closer = weakref.finalize(self, _close, self._loop, self._stack)
        try:
            model = self._loop.run_until_complete(
                self._stack.enter_async_context(AIModelAsset.load(bundle.asset).executable())
            )
            with native_stderr_silenced():
                self.functions = {name: model.load_function(name) for name in functions}
        except (RuntimeError, KeyError, ValueError) as e:
            self.close()
            raise OpenELMError(f"{bundle.path} cannot be loaded by Core AI ({_first_line(e)}): re-export it") from None

    def close(self):
        self._closer()

    def _checked(self, tokens) -> List[int]:
        """Token ids in range and room for them in the context, else one line."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise OpenELMError("prefill needs at least one token")
        if any(not 0 <= t < self.info.vocab_size for t in tokens):
            raise OpenELMError(f"token ids must be in 0..{self.info.vocab_size - 1}, got {max(tokens)}")
        self._check_room(len(tokens))
        return tokens

    def run(self, function: str, inputs: dict, states: dict) -> dict:
        """One call: numpy inputs, NDArray states (updated in place); numpy outputs by name."""
        from coreai.runtime import NDArray

        if states and self._slow_note:  # a model step (it updates the KV cache), the first of this engine
            self._slow_note = False
            log.info(SLOW_FLOAT16.format(bundle=self.bundle.path))

        try:
            call = self.functions[function]({k: NDArray(v) for k, v in inputs.items()}, state=states)
            outputs = self._loop.run_until_complete(call)
        except (RuntimeError, ValueError, KeyError) as e:  # the runtime's raw error, with the bundle it is about
            raise OpenELMError(
                f"{self.bundle.path}: Core AI failed running function {function} ({_first_line(e)}): re-export it"
            ) from None
        return {name: value.numpy() for name, value in outputs.items()}


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@contextmanager
def native_stderr_silenced():
    """The runtime prints "ODIE [default]: Loading function 'x'" for each function it loads, from
    native code straight to file descriptor 2: the commands' stderr is for their own messages.
    (Failures still raise, with their message, in Python.)"""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _close(loop, stack):
    """Close the model and its loop on a thread of its own: the finalizer may run inside another
    event loop (garbage collection during another runner's call), where this loop cannot run."""

    def close():
        # The runtime completes calls from its own threads; closing the model or the loop before
        # those late callbacks ran aborts the process at exit ("C++ exception handling detected"),
        # every other run measured here. A few milliseconds of running loop around the close drain them.
        loop.run_until_complete(asyncio.sleep(0.02))
        loop.run_until_complete(stack.aclose())
        loop.run_until_complete(asyncio.sleep(0.02))
        loop.close()

    thread = threading.Thread(target=close)
    thread.start()
    thread.join()
