"""A saved Core AI model run by Apple's runtime (coreai.runtime: on Linux the reference runtime in
the coreai-core wheel, on macOS 27 the OS framework), behind the shared PackageRunner."""

import asyncio
import hashlib
import json
import os
import sys
import threading
import weakref
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

import numpy as np

from openelm_mlx.errors import OpenELMError

from ..package import FUNCTIONS, PackageInfo, require
from ..package_runner import PackageRunner


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


def package_info(package) -> PackageInfo:
    """The openelm.* metadata in the model's metadata.json (readable without coreai-core), once
    main.mlirb has passed check_integrity."""
    package = Path(package)
    check_integrity(package)
    try:
        meta = json.loads((package / "metadata.json").read_text())["creatorDefinedMetadata"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OpenELMError(
            f"{package} is not a Core AI model with openelm metadata ({type(e).__name__}: {e})"
        ) from None
    return PackageInfo.from_metadata(meta, package, "export-coreai")


class CoreAIRunner(PackageRunner):
    """Keeps one `async with asset.executable()` open on one event loop for the runner's life (loading
    lowers the program for the device, so it is done once), and the states as NDArrays that the
    runtime updates in place."""

    def __init__(self, package):
        super().__init__(package, package_info(package))
        require("coreai.runtime", "coreai")
        from coreai.authoring import AIModelAsset

        self._loop = asyncio.new_event_loop()
        self._stack = AsyncExitStack()
        self._closer = weakref.finalize(self, _close, self._loop, self._stack)
        try:
            model = self._loop.run_until_complete(
                self._stack.enter_async_context(AIModelAsset.load(self.package).executable())
            )
            with native_stderr_silenced():
                self._functions = {name: model.load_function(name) for name in FUNCTIONS}
        except (RuntimeError, KeyError, ValueError) as e:
            self.close()
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OpenELMError(f"{self.package} cannot be loaded by Core AI ({first}): re-export it") from None
        desc = self._functions["decode"].desc
        self._state_specs = {
            name: (desc.state_descriptor(name).shape, desc.state_descriptor(name).dtype) for name in desc.state_names
        }
        self.reset()

    def close(self):
        self._closer()

    def _reset_states(self):
        from coreai.runtime import NDArray

        # Fresh zeros: storage the runtime allocates is not zeroed on Linux.
        self._states = {name: NDArray(np.zeros(shape, dtype)) for name, (shape, dtype) in self._state_specs.items()}

    def _run(self, function: str, inputs: dict) -> np.ndarray:
        from coreai.runtime import NDArray

        call = self._functions[function]({k: NDArray(v) for k, v in inputs.items()}, state=self._states)
        return self._loop.run_until_complete(call)["logits"].numpy()


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
