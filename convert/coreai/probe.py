"""`python -m openelm_mlx.convert.coreai.probe MODEL.aimodel`: the model's program read by Apple's
runtime in a process of its own, printed as JSON (function -> inputs, outputs, states -> type).

Core AI's bytecode reader aborts the whole process on a program it cannot read (SIGABRT, a C++
terminate: measured on every truncated or bit-flipped main.mlirb whose main.hash was rewritten to
match), so the command that reads a bundle runs this first: a broken bundle is then one line from
the parent (runtime.read_graph), never a dead command."""

import asyncio
import json
import os
import sys


def describe(asset: str) -> dict:
    from coreai.authoring import AIModelAsset

    summary = AIModelAsset.load(asset).summary(include_statistics=False)
    return {
        name: {
            "inputs": dict(summary.function_inputs(name)),
            "outputs": dict(summary.function_outputs(name)),
            "states": dict(summary.function_states(name)),
        }
        for name in summary.function_names
    }


async def load(asset: str, report: dict):
    """What the engines do at load (runtime.CoreAIEngine), where a damaged program aborts; the
    report is printed with every function loaded, and the process ends there: closing the model
    can abort at exit (runtime._close), which must not read as a broken bundle."""
    from coreai.authoring import AIModelAsset

    executable = await AIModelAsset.load(asset).executable().__aenter__()
    for name in report["functions"]:
        executable.load_function(name)
    print(json.dumps(report), flush=True)
    os._exit(0)


if __name__ == "__main__":
    try:
        asyncio.run(load(sys.argv[1], {"functions": describe(sys.argv[1])}))
    except Exception as e:  # the runtime's own errors: reported, the parent words the line
        print(json.dumps({"error": str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}))
