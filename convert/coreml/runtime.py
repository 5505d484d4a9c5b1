"""A saved Core ML package run by Core ML itself (macOS 15+) or by the numpy MIL executor (anywhere,
slow, for checking), behind the shared PackageRunner."""

import sys
from pathlib import Path

from openelm_mlx.errors import OpenELMError

from ..package import PackageInfo, require
from ..package_runner import PackageRunner
from .executor import MILExecutor


def package_info(package) -> PackageInfo:
    ct = require("coremltools", "coreml")
    package = Path(package)
    if not (package / "Manifest.json").is_file():
        raise OpenELMError(f"{package} is not a Core ML package (no Manifest.json): pass the .mlpackage folder")
    try:
        meta = dict(ct.models.MLModel(str(package), skip_model_load=True).get_spec().description.metadata.userDefined)
    except Exception as e:  # a spec that protobuf cannot parse
        raise OpenELMError(f"{package} cannot be read ({type(e).__name__}: {e}): re-export it") from None
    return PackageInfo.from_metadata(meta, package, "export-coreml")


class CoreMLRunner(PackageRunner):
    def __init__(self, package, backend: str = "coreml"):
        super().__init__(package, package_info(package))
        self.backend = backend
        self.executor = None  # the MIL executor of the mil-reference backend
        if backend == "coreml":
            if sys.platform != "darwin":
                raise OpenELMError(
                    "the coreml backend needs macOS 15+ (Core ML); use --backend mil-reference elsewhere"
                )
            import coremltools as ct

            self._models = {
                f: ct.models.MLModel(str(self.package), function_name=f, compute_units=ct.ComputeUnit.CPU_AND_GPU)
                for f in ("prefill", "decode")
            }
        else:
            self.executor = MILExecutor(self.package)
        self.reset()

    def _reset_states(self):
        if self.backend == "coreml":
            self._state = self._models["prefill"].make_state()  # one state serves both functions
        else:
            self._state = self.executor.make_state("prefill")

    def _run(self, function: str, inputs: dict):
        if self.backend == "coreml":
            return self._models[function].predict(inputs, state=self._state)["logits"]
        return self.executor.run(function, inputs, self._state)["logits"]
