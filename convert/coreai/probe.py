"""`python -m openelm_mlx.convert.coreai.probe MODEL.aimodel`: the model's program read by Apple's
runtime in a process of its own, printed as JSON (function -> inputs, outputs, states -> type).

Core AI's bytecode reader aborts the whole process on a program it cannot read (SIGABRT, a C++
terminate: measured on every truncated or bit-flipped main.mlirb whose main.hash was rewritten to
match), so the command that reads a bundle runs this first: a broken bundle is then one line from
the parent (runtime.read_graph), never a dead command."""

import asyncio
import json
import sys


def describe(asset: str) -> dict:
    from coreai.authoring import AIModelAsset

    summary = AIModelAsset.load(asset).summary(include_statistics=False)
    asyncio.run(load(AIModelAsset.load(asset), list(summary.function_names)))
    return {
        name: {
            "inputs": dict(summary.function_inputs(name)),
            "outputs": dict(summary.function_outputs(name)),
            "states": dict(summary.function_states(name)),
        }
        for name in summary.function_names
    }


async def load(model, names):
    """What the engines do at load (runtime.CoreAIEngine): where a damaged program aborts."""
    async with model.executable() as executable:
        for name in names:
            executable.load_function(name)


if __name__ == "__main__":
    try:
        print(json.dumps({"functions": describe(sys.argv[1])}))
    except Exception as e:  # the runtime's own errors: reported, the parent words the line
        print(json.dumps({"error": str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}))
