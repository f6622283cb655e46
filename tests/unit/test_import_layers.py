"""The import-layer contract (DESIGN "Layers import one way"): every module of keyeflow imports only from its
own layer or lower ones, imports inside functions and classes included.

Layers, low → high: config → model → datasets → quality → longcot → training → lineage → steps → tasks →
flows → synthetic → cli. `config` is keyeflow/config.py, keyeflow/faults.py (the named kill points) and
keyeflow/__init__.py, `lineage` keyeflow/lineage.py,
`cli` keyeflow/cli.py; the others are the subpackages keyeflow/<name>/. Two more rules:
- `keyeflow.synthetic` (generated sample data, the scripted teacher) is imported by keyeflow.cli only;
- domain code (model, datasets, quality, longcot, training) never imports prefect or mlflow: it runs under
  torchrun, in a notebook and in tests without a server.

The checker reads the source with `ast` (nothing is imported), so it also sees imports under
`if TYPE_CHECKING:` and inside functions: a type-only or deferred upward import still ties a low layer to a
high one.
"""

from __future__ import annotations

import ast
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "keyeflow"
LAYERS = (
    "config",
    "model",
    "datasets",
    "quality",
    "longcot",
    "training",
    "lineage",
    "steps",
    "tasks",
    "flows",
    "synthetic",
    "cli",
)
RANK = {name: rank for rank, name in enumerate(LAYERS)}
DOMAIN = ("model", "datasets", "quality", "longcot", "training")
ORCHESTRATION = ("prefect", "mlflow")  # third-party packages domain code must not import
SYNTHETIC_IMPORTERS = ("synthetic", "cli")
MODULE_LAYERS = ("config", "lineage", "cli")  # layers that are one module, keyeflow/<name>.py
BASE_MODULES = ("faults",)  # keyeflow/<name>.py modules of the lowest layer besides config.py
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Violation:
    path: str  # relative to the directory holding the package
    line: int
    module: str
    target: str
    why: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.module} imports {self.target}: {self.why}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer of a keyeflow module; None for a module outside keyeflow or one no layer names."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in BASE_MODULES):  # keyeflow/__init__.py, faults.py
        return "config"
    if parts[1] in MODULE_LAYERS:  # keyeflow/<name>.py: a module, nothing below it
        return parts[1] if len(parts) == 2 else None
    return parts[1] if parts[1] in RANK else None


def _imported(node: ast.AST, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """The modules an import statement names, relative imports resolved against the importing module's
    package. `from a import b` names `a.b` when that is a module of the tree (b is a submodule), else `a`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = package[: len(package) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return [
        f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names
    ]


def import_violations(root: Path) -> list[Violation]:
    """Every import of a module under `root / PACKAGE` that breaks the layer rules, in file and line order."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    modules = {module_name(path, root) for path in files}
    violations = []
    for path in files:
        module = module_name(path, root)
        rel = path.relative_to(root).as_posix()
        layer = layer_of(module)
        if layer is None:
            violations.append(
                Violation(rel, 1, module, "-", f"not in a layer; layers are {', '.join(LAYERS)}")
            )
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=rel)):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in dict.fromkeys(_imported(node, module, path.name == "__init__.py", modules)):
                top = target.split(".")[0]
                if top in ORCHESTRATION and layer in DOMAIN:
                    violations.append(
                        Violation(
                            rel, node.lineno, module, target, f"domain layer {layer!r} must not import {top}"
                        )
                    )
                if top != PACKAGE:
                    continue
                target_layer = layer_of(target)
                if target_layer is None:
                    violations.append(Violation(rel, node.lineno, module, target, "target is not in a layer"))
                elif target_layer == "synthetic" and layer not in SYNTHETIC_IMPORTERS:
                    violations.append(
                        Violation(
                            rel,
                            node.lineno,
                            module,
                            target,
                            "only keyeflow.cli may import keyeflow.synthetic",
                        )
                    )
                elif RANK[target_layer] > RANK[layer]:
                    violations.append(
                        Violation(rel, node.lineno, module, target, f"upward, {layer} → {target_layer}")
                    )
    # ast.walk goes breadth first; a report reads best in file and line order.
    return sorted(violations, key=lambda v: (Path(v.path).parts, v.line))


def _report(violations: list[Violation]) -> str:
    return f"{len(violations)} import(s) break the layer order {' → '.join(LAYERS)}:\n" + "\n".join(
        f"  {v}" for v in violations
    )


def test_keyeflow_imports_follow_the_layers():
    violations = import_violations(REPO_ROOT)
    if violations:
        pytest.fail(_report(violations), pytrace=False)


# ---------------------------------------------------------------------------------------------- the checker


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_layer_of_maps_modules_to_layers():
    assert layer_of("keyeflow") == "config" and layer_of("keyeflow.config") == "config"
    assert layer_of("keyeflow.lineage") == "lineage" and layer_of("keyeflow.cli") == "cli"
    assert layer_of("keyeflow.training.rl") == "training" and layer_of("keyeflow.datasets") == "datasets"
    assert layer_of("keyeflow.synthetic.teacher") == "synthetic"
    assert layer_of("keyeflow.helpers") is None and layer_of("keyeflow.cli.sub") is None
    assert layer_of("numpy") is None


def test_checker_reports_upward_imports_and_passes_downward_ones(tmp_path):
    root = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "config.py": "import json\n",
            # mlflow above the domain: fine
            "lineage.py": "import mlflow\nfrom keyeflow.training import loop\n",
            "cli.py": "from keyeflow.synthetic import teacher\nfrom keyeflow import lineage\n",
            "model/__init__.py": "",
            "model/net.py": """
            from keyeflow import config
            from . import layers

            def build():
                from keyeflow.training.loop import train  # upward, hidden in a function
                return train
            """,
            "model/layers.py": "import torch\n",
            "datasets/__init__.py": "",
            "datasets/tables.py": """
            from typing import TYPE_CHECKING

            from ..model import net
            from keyeflow.model.layers import *

            if TYPE_CHECKING:
                from keyeflow.lineage import Run  # upward, even if only for type hints

            class Loader:
                import prefect  # orchestration in the domain
            """,
            "training/__init__.py": "",
            "training/loop.py": """
            import keyeflow.config
            import keyeflow.datasets.tables
            from keyeflow.model import net, layers
            from .. import config
            from . import loop as myself
            """,
            "tasks/__init__.py": "",
            "tasks/run.py": "from prefect import task\nfrom keyeflow.synthetic.teacher import answer\n",
            "synthetic/__init__.py": "",
            "synthetic/teacher.py": "from keyeflow.tasks import run\nfrom . import samples\n",
            "synthetic/samples.py": "",
            "helpers.py": "",
        },
    )
    found = [(v.path, v.line, v.target) for v in import_violations(root)]
    assert found == [
        ("keyeflow/datasets/tables.py", 8, "keyeflow.lineage"),
        ("keyeflow/datasets/tables.py", 11, "prefect"),
        ("keyeflow/helpers.py", 1, "-"),
        ("keyeflow/model/net.py", 6, "keyeflow.training.loop"),
        ("keyeflow/tasks/run.py", 2, "keyeflow.synthetic.teacher"),
    ]
    report = _report(import_violations(root))
    assert (
        "keyeflow/model/net.py:6: keyeflow.model.net imports keyeflow.training.loop: upward, model → training"
        in report
    )
    assert "only keyeflow.cli may import keyeflow.synthetic" in report
    assert "domain layer 'datasets' must not import prefect" in report


def test_checker_on_a_copy_of_keyeflow_sees_a_planted_upward_import(tmp_path):
    shutil.copytree(
        REPO_ROOT / PACKAGE, tmp_path / PACKAGE, ignore=shutil.ignore_patterns("__pycache__", "assets")
    )
    before = {str(v) for v in import_violations(tmp_path)}
    config = tmp_path / PACKAGE / "config.py"
    config.write_text(config.read_text() + "\n\ndef _late():\n    from keyeflow.flows import pretrain\n")
    line = len(config.read_text().splitlines())
    added = [v for v in import_violations(tmp_path) if str(v) not in before]
    assert [(v.path, v.line, v.target, v.why) for v in added] == [
        ("keyeflow/config.py", line, "keyeflow.flows.pretrain", "upward, config → flows")
    ]


@pytest.mark.parametrize(
    ("module", "is_package", "statement", "expected"),
    [
        ("keyeflow.training.rl", False, "from .config import StageConfig", ["keyeflow.training.config"]),
        ("keyeflow.training", True, "from .config import StageConfig", ["keyeflow.training.config"]),
        ("keyeflow.training.rl", False, "from ..model import checkpoint", ["keyeflow.model.checkpoint"]),
        ("keyeflow.training.rl", False, "from .. import lineage", ["keyeflow.lineage"]),
        (
            "keyeflow.training.rl",
            False,
            "import keyeflow.model.checkpoint as ck",
            ["keyeflow.model.checkpoint"],
        ),
        (
            "keyeflow.training.rl",
            False,
            "from keyeflow.training import hints, losses",
            ["keyeflow.training.hints", "keyeflow.training.losses"],
        ),
    ],
)
def test_relative_and_from_imports_resolve_to_modules(module, is_package, statement, expected):
    modules = {
        "keyeflow.training.config",
        "keyeflow.model.checkpoint",
        "keyeflow.lineage",
        "keyeflow.training.hints",
        "keyeflow.training.losses",
    }
    node = ast.parse(statement).body[0]
    assert _imported(node, module, is_package, modules) == expected
