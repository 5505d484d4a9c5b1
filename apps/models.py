"""`openelm models`: the models to pass with --model: Apple's released OpenELM sizes (base and
Instruct repo ids, parameters, context) and the demo model shipped with the package, with which of
the released ones are in the local Hugging Face cache (read offline: nothing is downloaded)."""

from typing import Dict

from openelm_mlx.config import PRESETS, OpenELMConfig
from openelm_mlx.loader import DEMO_MODEL
from openelm_mlx.units import count_text, size_text

COLUMNS = ("model", "size", "parameters", "context", "local copy")


def released() -> Dict[str, str]:
    """Hub repo id -> size, base then Instruct: apple/OpenELM-270M, ..., apple/OpenELM-1_1B-Instruct."""
    repos = {}
    for size in PRESETS:
        base = f"apple/OpenELM-{size.replace('.', '_')}"
        repos.update({base: size, f"{base}-Instruct": size})
    return repos


def cached_sizes() -> Dict[str, int]:
    """Hub repo id -> bytes on disk of the model repos in the local Hugging Face cache ($HF_HOME)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return {r.repo_id: r.size_on_disk for r in scan_cache_dir().repos if r.repo_type == "model"}
    except CacheNotFound:  # no cache yet: nothing downloaded
        return {}


def rows():
    cached = cached_sizes()
    for repo, size in released().items():
        config = OpenELMConfig.preset(size)
        local = f"cached, {size_text(cached[repo])}" if repo in cached else ""
        yield repo, size, count_text(config.num_parameters()), str(config.max_context_length), local
    demo = OpenELMConfig.from_pretrained(DEMO_MODEL)
    yield "demo model", "demo", count_text(demo.num_parameters()), str(demo.max_context_length), str(DEMO_MODEL)


def add_arguments(parser):
    parser.epilog = (
        "pass a repo id with --model (downloaded once into the Hugging Face cache); no --model runs the demo "
        "model. apple's repos ship no tokenizer: give LLaMA-2's tokenizer.model with --tokenizer"
    )


def main(args):
    table = [COLUMNS, *rows()]
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
