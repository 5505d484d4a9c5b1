"""The import structure ARCHITECTURE.md describes, read from the source with `ast` (nothing is
imported): no import cycles, the layer rule between the library and its users, which third-party
packages each layer may use, and function-local imports only where they keep an optional extra
optional or start-up fast (each one listed below with its reason)."""

import ast
import re
from pathlib import Path
from typing import Dict, List, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = "openelm_mlx"
USERS = {"convert": "openelm_mlx.convert", "apps": "openelm_mlx.apps", "benchmarks": "openelm_mlx.benchmarks"}

# Which layer may import which (besides itself). The library imports none of the others; the
# CLI dispatcher (apps/cli.py) reaches convert/ and benchmarks/ commands by name, with importlib.
MAY_IMPORT = {
    "library": {"library"},
    "convert": {"library"},
    "apps": {"library", "convert"},
    "benchmarks": {"library", "convert"},
}
# `python -m openelm_mlx` is the CLI's entry point, not part of the library's API.
LAYER_EXCEPTIONS = {("openelm_mlx.__main__", "openelm_mlx.apps.cli")}

# mlx-lm is used for comparison (benchmarks/, tests/) and interop; outside those, only here.
# Each entry is due to go (issue 11: the generation path stops importing mlx-lm for start-up time).
MLX_LM_USERS = {
    "openelm_mlx.model": "mlx-lm's quantized attention, for mlx-lm's quantized KV cache (generate_step(kv_bits=...))",
}

# Function-local imports besides those of an optional extra (apps/cli.py's EXTRAS) or of a
# project module that needs one at import time: (importing module, imported module) -> why.
LAZY_IMPORTS = {
    # Downloads only: huggingface_hub's API takes ~0.3 s to import and most runs read local folders.
    ("openelm_mlx.checkpoint", "huggingface_hub"): "keeps start-up fast",
    ("openelm_mlx.checkpoint", "huggingface_hub.errors"): "keeps start-up fast",
    ("openelm_mlx.tokenizer", "huggingface_hub"): "keeps start-up fast",
    ("openelm_mlx.tokenizer", "huggingface_hub.errors"): "keeps start-up fast",
    ("openelm_mlx.apps.models", "huggingface_hub"): "keeps start-up fast",
    ("openelm_mlx.apps.models", "huggingface_hub.errors"): "keeps start-up fast",
    # Only mlx-lm makes a quantized KV cache, so mlx-lm is imported already when it is attended.
    ("openelm_mlx.model", "mlx_lm.models.base"): "never loads mlx-lm on our own paths",
    # Only a preset's layer-wise multipliers need numpy (0.35-0.7 s to import under load).
    ("openelm_mlx.config", "numpy"): "keeps start-up fast",
    ("openelm_mlx.speculative", "numpy"): "keeps start-up fast",
    # generate imports progress for `forward` (a prompt a layer at a time); its bars are other commands'.
    ("openelm_mlx.progress", "tqdm"): "keeps generate's start-up fast",
    # Only --compare mlx-lm builds an mlx-lm model, whose own cache it times with.
    ("openelm_mlx.benchmarks.timing", "mlx_lm.models.cache"): "keeps start-up fast",
    # readline is interactive line editing, absent on some platforms.
    ("openelm_mlx.apps.chat", "readline"): "optional, platform-dependent",
    # Only --backend coreml|coreai|mil-reference needs the package runner (0.18 s of imports).
    ("openelm_mlx.apps.generate", "openelm_mlx.convert.runner"): "keeps start-up fast",
    ("openelm_mlx.benchmarks.bench", "openelm_mlx.benchmarks.package_bench"): "only --backend needs it",
    ("openelm_mlx.benchmarks.subjects", "mlx_lm.models"): "only --compare mlx-lm needs mlx-lm",
}
# importlib.import_module with a computed name: module -> why.
DYNAMIC_IMPORTS = {
    "openelm_mlx.apps.cli": "the dispatcher imports only the chosen subcommand's module",
    "openelm_mlx.convert.package": "require() imports an optional extra by name, or names the extra to install",
}


class Import(NamedTuple):
    module: str  # the importing module
    target: str  # the imported module (a project module when one matches)
    line: int
    local: bool  # inside a function


def package_dirs() -> Dict[str, str]:
    """pyproject.toml's [tool.setuptools.package-dir]: package -> folder."""
    text = (ROOT / "pyproject.toml").read_text()
    table = re.search(r"^\[tool\.setuptools\.package-dir\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M).group(1)
    return dict(re.findall(r'^"([\w.]+)"\s*=\s*"([\w/]+)"', table, re.M))


def project_files() -> Dict[str, Path]:
    """Every installed module -> its file, by the package-dir mapping."""
    files = {}
    for package, folder in package_dirs().items():
        for path in sorted((ROOT / folder).glob("*.py")):
            files[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return files


FILES = project_files()


def layer(module: str) -> str:
    for name, package in USERS.items():
        if module == package or module.startswith(package + "."):
            return name
    return "library"


def resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module
    package = module if FILES[module].stem == "__init__" else module.rsplit(".", 1)[0]
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def imports_of(module: str) -> List[Import]:
    tree = ast.parse(FILES[module].read_text())
    found = []

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend(Import(module, a.name, child.lineno, inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = resolve(module, child)
                for a in child.names:  # `from package import module` imports that module
                    name = f"{base}.{a.name}"
                    found.append(Import(module, name if name in FILES else base, child.lineno, inner))
            visit(child, inner)

    visit(tree, False)
    return found


IMPORTS = [i for module in FILES for i in imports_of(module)]


def project_target(name: str):
    """The project module an import runs, or None for a third-party one."""
    while name and name not in FILES:
        name = name.rpartition(".")[0]
    return name or None


def top(name: str) -> str:
    return name.split(".")[0]


def optional_extras() -> set:
    """apps/cli.py's EXTRAS: the import names of the optional extras."""
    tree = ast.parse(FILES["openelm_mlx.apps.cli"].read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["EXTRAS"]:
            return set(ast.literal_eval(node.value))
    raise AssertionError("apps/cli.py has no EXTRAS")


def test_every_file_belongs_to_an_installed_package():
    dirs = package_dirs()
    for folder in set(dirs.values()):
        for path in (ROOT / folder).rglob("*.py"):
            assert path in FILES.values(), f"{path.relative_to(ROOT)} is in no package of pyproject.toml"
    assert dirs["openelm_mlx.convert"] == "convert" and dirs["openelm_mlx.apps"] == "apps"


def test_no_import_cycles():
    """Function-local imports count too: a lazy import that closes a circle is still a circle."""
    graph = {m: set() for m in FILES}
    for i in IMPORTS:
        target = project_target(i.target)
        if target and target != i.module:
            graph[i.module].add(target)
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n) :] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_layers():
    problems = []
    for i in IMPORTS:
        target = project_target(i.target)
        if target and layer(target) not in MAY_IMPORT[layer(i.module)] | {layer(i.module)}:
            if (i.module, target) not in LAYER_EXCEPTIONS:
                problems.append(f"{FILES[i.module].relative_to(ROOT)}:{i.line} ({layer(i.module)}) imports {target}")
    assert not problems, "\n".join(problems)


def test_mlx_lm_only_for_comparison_and_interop():
    users = {i.module for i in IMPORTS if top(i.target) == "mlx_lm" and layer(i.module) != "benchmarks"}
    assert users <= set(MLX_LM_USERS), f"mlx-lm imported by {sorted(users - set(MLX_LM_USERS))}"
    assert set(MLX_LM_USERS) <= users, f"no longer import mlx-lm, drop from MLX_LM_USERS: {set(MLX_LM_USERS) - users}"


def test_function_local_imports_are_optional_extras_or_listed():
    extras = optional_extras()
    # a project module that imports an extra at module level is as optional as the extra
    needs_extra = {i.module for i in IMPORTS if not i.local and top(i.target) in extras}
    problems, used = [], set()
    for i in IMPORTS:
        if not i.local or top(i.target) in extras or project_target(i.target) in needs_extra:
            continue
        key = (i.module, project_target(i.target) or i.target)
        if key in LAZY_IMPORTS:
            used.add(key)
        else:
            problems.append(f"{FILES[i.module].relative_to(ROOT)}:{i.line} imports {key[1]} inside a function")
    assert not problems, "\n".join(problems) + "\n(import at module level, or list it in LAZY_IMPORTS with why)"
    assert used == set(LAZY_IMPORTS), f"no longer lazy, drop from LAZY_IMPORTS: {set(LAZY_IMPORTS) - used}"


def test_dynamic_imports_are_listed():
    found = set()
    for module, path in FILES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module",
                "__import__",
            ):
                found.add(module)
    assert found == set(DYNAMIC_IMPORTS), found ^ set(DYNAMIC_IMPORTS)
