"""A bundle's Core AI model run by Apple's runtime (coreai.runtime: on Linux the reference runtime in
the coreai-core wheel, on macOS 27 the OS framework): what the engine twins share (CoreAIEngine,
behind the shared PackageRunner), the integrity check and the openelm.* metadata read back."""

import asyncio
import hashlib
import json
import os
import sys
import threading
import weakref
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import List

from openelm_mlx.errors import OpenELMError

from ..package import PackageInfo, require
from ..package_runner import PackageRunner
from .bundle import Bundle


def check_integrity(package: Path):
    """main.mlirb against the SHA-256 that save_asset wrote to main.hash. Core AI's bytecode reader
    aborts the whole process on some corruptions (a C++ terminate, nothing to catch), so a changed
    or damaged file is refused here, before anything parses it."""
    try:
        expected = (package / "main.hash").read_bytes()
        actual = hashlib.sha256((package / "main.mlirb").read_bytes()).digest()
    except OSError as e:
        raise OpenELMError(f"{package} is not a complete Core AI model ({e.strerror}: {e.filename})") from None
    if actual != expected:
        raise OpenELMError(f"{package}/main.mlirb does not match its main.hash (corrupted or edited): re-export it")


def package_info(bundle: Bundle) -> PackageInfo:
    """The openelm.* metadata in the bundle's model (its own metadata.json, readable without
    coreai-core), once main.mlirb has passed check_integrity."""
    check_integrity(bundle.asset)
    try:
        meta = json.loads((bundle.asset / "metadata.json").read_text())["creatorDefinedMetadata"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OpenELMError(
            f"{bundle.asset} is not a Core AI model with openelm metadata ({type(e).__name__}: {e})"
        ) from None
    return PackageInfo.from_metadata(meta, bundle.path, "export-coreai")


def function_names(bundle: Bundle) -> List[str]:
    """The model's functions, read from main.mlirb after check_integrity (the engine choice needs them)."""
    from coreai.authoring import AIModelAsset

    check_integrity(bundle.asset)
    try:
        with native_stderr_silenced():
            return list(AIModelAsset.load(bundle.asset).summary(include_statistics=False).function_names)
    except (RuntimeError, ValueError) as e:
        raise OpenELMError(f"{bundle.asset} cannot be read by Core AI ({_first_line(e)}): re-export it") from None


class CoreAIEngine(PackageRunner):
    """What every engine twin shares: one `async with asset.executable()` open on one event loop
    for the engine's life (loading lowers the program for the device, so it is done once), the
    named functions loaded from it, and calls that update NDArray states in place. Engines provide
    reset(), prefill() and decode()."""

    def __init__(self, bundle: Bundle, functions: List[str]):
        super().__init__(bundle.path, package_info(bundle))
        require("coreai.runtime", "coreai")
        from coreai.authoring import AIModelAsset

        self.bundle = bundle
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

        call = self.functions[function]({k: NDArray(v) for k, v in inputs.items()}, state=states)
        return {name: value.numpy() for name, value in self._loop.run_until_complete(call).items()}


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
