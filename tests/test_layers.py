"""The package's layers, checked statically: every module of ``safecode_kernels`` is parsed with
:mod:`ast` (nothing is imported or run), each import it holds (absolute or relative, at module
level or inside a function, ``TYPE_CHECKING`` blocks included) is resolved to the module it
names, and no module may import from a layer above its own.

The layers, lowest first (a module may import from its own layer and the ones below):

- ``domain``: the modules at the package root (``params``, ``verdict``, ``refusal``,
  ``recipes``, ``validation``);
- ``ops``: the step op, its backends (the compiled ``_C`` extension among them), dispatch;
- ``decoding``: the decoder, steering, the KV cache, requests, adapters, baselines; ``hf``
  (SafeCoDe as a transformers ``custom_generate`` method over them) ranks with it;
- ``api``: ``safecode_kernels/__init__.py``, the public facade over the three layers below
  (``from safecode_kernels import __version__`` and the like name it);
- ``judges``;
- ``evaluation``;
- ``testing``: the tiny models built in code (imported by nothing but ``app`` and the tests);
- ``app``: the command line, the demo, ``info``, the benchmarks, ``__main__``.

A subpackage missing from :data:`SUBPACKAGES` fails the test until it is given a layer.
Imports made at run time by name (``importlib.import_module``) are not followed.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from pathlib import Path

import pytest

PACKAGE = "safecode_kernels"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE

LAYERS = ("domain", "ops", "decoding", "api", "judges", "evaluation", "testing", "app")
#: The subpackages (and the root modules outside ``domain``) -> their layer; any other module
#: at the root of the package is ``domain``.
SUBPACKAGES = {
    "ops": "ops",
    "decoding": "decoding",
    "hf": "decoding",
    "judges": "judges",
    "evaluation": "evaluation",
    "testing": "testing",
    "app": "app",
    "__main__": "app",
    "_C": "ops",  # the C++ backend of the step op (built from csrc/; not a .py file)
}
#: Modules that exist without a .py file here (built extensions).
EXTENSIONS = frozenset({f"{PACKAGE}._C"})


@dataclasses.dataclass(frozen=True)
class Import:
    module: str  # the importing module's dotted name
    path: str  # its file, relative to the repository
    line: int
    statement: str  # the import as written
    target: str  # the dotted name of the module it imports from


def layer_of(module: str) -> str | None:
    """The layer of a module of the package; ``None`` for one in a subpackage with no layer."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        raise ValueError(f"{module} is not in {PACKAGE}")
    if len(parts) == 1:
        return "api"
    if parts[1] in SUBPACKAGES:
        return SUBPACKAGES[parts[1]]
    return "domain" if len(parts) == 2 and (PACKAGE_DIR / f"{parts[1]}.py").is_file() else None


@functools.cache
def package_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its ``__init__.py``)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _known(name: str) -> bool:
    return name in package_modules() or name in EXTENSIONS


def resolve(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package modules that one import statement of ``module`` imports from (others: none).

    ``from X import name`` names the module ``X.name`` when there is one (``from . import
    released_flow``), else ``X`` (``from .base import Judgement``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        if node.level > 1:
            base = base[: -(node.level - 1)]
        if not base:
            raise ValueError(f"{module}: relative import beyond the top-level package")
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    if source.split(".")[0] != PACKAGE:
        return []
    targets = []
    for alias in node.names:
        submodule = f"{source}.{alias.name}"
        target = submodule if _known(submodule) else source
        if target not in targets:
            targets.append(target)
    return targets


def imports_of(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel = str(path.relative_to(PACKAGE_DIR.parent))
    found = []
    for node in ast.walk(tree):  # every statement, functions and classes included
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in resolve(module, path.name == "__init__.py", node):
                found.append(Import(module, rel, node.lineno, ast.unparse(node), target))
    return sorted(found, key=lambda imp: (imp.line, imp.target))


@functools.cache
def all_imports() -> list[Import]:
    return [imp for module, path in package_modules().items() for imp in imports_of(module, path)]


def allowed(importer: str, target: str) -> bool:
    """Whether ``importer`` may import from ``target`` (unknown layers: see the test below)."""
    if layer_of(importer) is None or layer_of(target) is None:
        return True
    return LAYERS.index(layer_of(target)) <= LAYERS.index(layer_of(importer))


def describe(imp: Import) -> str:
    below = ", ".join(LAYERS[: LAYERS.index(layer_of(imp.module)) + 1])
    return (
        f"{imp.path}:{imp.line}: {imp.module} (layer {layer_of(imp.module)}) imports {imp.target} "
        f"(layer {layer_of(imp.target)}) in `{imp.statement}`; layer {layer_of(imp.module)} may import "
        f"only from: {below}"
    )


def test_no_module_imports_from_a_layer_above_it():
    violations = [describe(imp) for imp in all_imports() if not allowed(imp.module, imp.target)]
    assert not violations, (
        "imports against the layering (lowest first: " + " < ".join(LAYERS) + "):\n" + "\n".join(violations)
    )


def test_every_module_has_a_layer():
    missing = sorted({f"{PACKAGE}.{module.split('.')[1]}" for module in package_modules() if layer_of(module) is None})
    assert not missing, (
        f"subpackages with no layer: {', '.join(missing)}; add each to SUBPACKAGES in "
        f"tests/test_layers.py (layers, lowest first: {' < '.join(LAYERS)})"
    )


def test_every_import_resolves_to_a_module_of_the_package():
    unknown = [
        f"{imp.path}:{imp.line}: `{imp.statement}` -> {imp.target}" for imp in all_imports() if not _known(imp.target)
    ]
    assert not unknown, "imports of modules that do not exist:\n" + "\n".join(unknown)


def test_the_scan_sees_every_layer_and_imports_inside_functions():
    layers = {layer_of(module) for module in package_modules()}
    assert layers == set(LAYERS)
    # app/demo.py imports the tiny LLaVA inside a function; the scan must see it.
    assert any(imp.module == f"{PACKAGE}.app.demo" and imp.target == f"{PACKAGE}.testing.tiny" for imp in all_imports())


def _resolved(module: str, source: str, is_package: bool = False) -> list[str]:
    (node,) = ast.parse(source).body
    return resolve(module, is_package, node)


@pytest.mark.parametrize(
    "module,is_package,source,want",
    [
        (
            "safecode_kernels.decoding.requests",
            False,
            "from ..ops.step import safecode_step",
            ["safecode_kernels.ops.step"],
        ),
        (
            "safecode_kernels.decoding.requests",
            False,
            "from .adapters import get_adapter",
            ["safecode_kernels.decoding.adapters"],
        ),
        (
            "safecode_kernels.decoding",
            True,
            "from .decoder import SafeCoDeDecoder",
            ["safecode_kernels.decoding.decoder"],
        ),
        ("safecode_kernels", True, "from .ops.step import StepOutput", ["safecode_kernels.ops.step"]),
        (
            "safecode_kernels.judges.openai",
            False,
            "from . import released_flow",
            ["safecode_kernels.judges.released_flow"],
        ),
        ("safecode_kernels.app.cli", False, "from .. import __version__", ["safecode_kernels"]),
        ("safecode_kernels.ops.step_cpu", False, "from .. import _C", ["safecode_kernels._C"]),
        (
            "safecode_kernels.app.benchmarking.decode",
            False,
            "from ...decoding.kv_cache import new_cache",
            ["safecode_kernels.decoding.kv_cache"],
        ),
        (
            "safecode_kernels.testing.tiny_models",
            False,
            "from safecode_kernels.params import SteeringParams",
            ["safecode_kernels.params"],
        ),
        (
            "safecode_kernels.app.demo",
            False,
            "import safecode_kernels.testing.tiny as tiny",
            ["safecode_kernels.testing.tiny"],
        ),
        ("safecode_kernels.ops.step", False, "import torch", []),
        ("safecode_kernels.ops.step", False, "from torch import nn", []),
    ],
)
def test_resolve(module, is_package, source, want):
    assert _resolved(module, source, is_package) == want


@pytest.mark.parametrize(
    "importer,target,ok",
    [
        ("safecode_kernels.verdict", "safecode_kernels.ops.step", False),
        ("safecode_kernels.ops.step", "safecode_kernels.params", True),
        ("safecode_kernels.decoding.decoder", "safecode_kernels", False),  # the facade sits above decoding
        ("safecode_kernels", "safecode_kernels.decoding", True),
        ("safecode_kernels", "safecode_kernels.judges", False),
        ("safecode_kernels.judges.self_judge", "safecode_kernels.decoding.requests", True),
        ("safecode_kernels.evaluation.run", "safecode_kernels.testing.tiny", False),
        ("safecode_kernels.testing.tiny", "safecode_kernels.evaluation.run", True),
        ("safecode_kernels.testing.tiny", "safecode_kernels.app.cli", False),
        ("safecode_kernels.__main__", "safecode_kernels.app.cli", True),
    ],
)
def test_allowed(importer, target, ok):
    assert allowed(importer, target) is ok
