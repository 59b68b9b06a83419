"""The package's layering: importing it is light (vllm, deepspeed, Ray and MLflow only in
the adapters that need them), and no part imports a part above it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ["vllm", "deepspeed"]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        check=True, capture_output=True, text=True,
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


# The adapters that exist to load a heavy engine; every other module must import without it.
ADAPTERS = {"qpo_ray.backends.vllm_backend", "qpo_ray.training.deepspeed_engine"}


def test_no_module_but_the_adapters_pulls_in_vllm_or_deepspeed():
    """Every module of the package imported in one process (the adapters aside): neither
    engine loads, so a machine without them (a GPU box with torch alone) can run the rest."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "qpo_ray"
    modules = sorted(".".join(("qpo_ray",) + p.relative_to(root).with_suffix("").parts)
                     .removesuffix(".__init__") for p in root.rglob("*.py"))
    # __main__ modules run the CLI when imported: not modules to import.
    modules = [m for m in modules if m not in ADAPTERS and not m.endswith(".__main__")]
    assert len(modules) > 80
    loaded = _modules_after("import importlib\n" + "\n".join(
        f"importlib.import_module({m!r})" for m in modules))
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]


@pytest.mark.parametrize(
    "module",
    ["qpo_ray.config", "qpo_ray.cli", "qpo_ray.backends", "qpo_ray.tasks", "qpo_ray.data.schema"],
)
def test_core_modules_stay_light(module):
    loaded = _modules_after(f"import {module}")
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
    assert not heavy, f"{module} imported {heavy[:3]}"


def test_core_never_imports_ray_or_mlflow():
    loaded = _modules_after("import qpo_ray.tasks, qpo_ray.data.schema, qpo_ray.config")
    assert not [m for m in loaded if m.split(".")[0] in ("ray", "mlflow", *HEAVY)]


# The parts of qpo_ray, bottom to top: a module may import its own part and those below
# it, never one above (docs/ARCHITECTURE.md draws it). cli is the top.
LAYERS = ["common", "config", "prompts", "tasks", "data", "backends", "policy", "scoring",
          "training", "testphase", "run", "serving", "cli"]


def _imported_parts(path) -> set[str]:
    import ast

    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):  # imports inside functions too
        names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                 [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            if name.startswith("qpo_ray."):
                parts.add(name.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and name == "qpo_ray":
                parts.update(a.name for a in node.names)
    return parts & set(LAYERS)


def test_nothing_imports_upward_and_every_part_is_a_layer():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "qpo_ray"
    tops = {p.stem if p.is_file() else p.name for p in root.iterdir()
            if not p.name.startswith(("_", ".")) and (p.suffix == ".py" or p.is_dir())}
    assert tops - {"__pycache__"} <= set(LAYERS), "a new top-level part needs its layer"
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for path in root.rglob("*.py"):
        own = path.relative_to(root).parts[0].removesuffix(".py")
        if own not in rank:
            continue
        upward += [f"{path.relative_to(root)} imports qpo_ray.{part}"
                   for part in _imported_parts(path) if rank[part] > rank[own]]
    assert upward == []
