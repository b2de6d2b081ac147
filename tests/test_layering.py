"""The house's rules, checked over the source (ast, no imports run):

- gan_core is plain PyTorch: it never imports flows, Prefect, Ray or MLflow.
- flows' packages follow the data path, and every import (module level or inside a function)
  points down this order, never up: shared edges < snapshots < ingest < train < tune <
  registry < orchestration < cli < bench. Prefect is imported by orchestration (and cli) only.
- Some edges the order allows are forbidden all the same (FORBIDDEN): training and search
  take a resolved snapshot and never reach back into ingest.
- Only the edges (cli, orchestration and the benchmarks above them) resolve a dataset
  reference (ensure_snapshot): once per command or flow run, never inside training or search.
- No import cycles between flows modules.
- Every third-party package imported by gan_core or flows is a declared dependency (the
  benchmarks may use the dev extras).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    "shared",  # settings, storage, package, tracking, orphans, preflight, console, errors
    "snapshots",
    "ingest",
    "train",
    "tune",
    "registry",
    "orchestration",
    "cli",
    "bench",
]
SHARED = {"settings", "storage", "package", "tracking", "orphans", "preflight", "console", "errors"}
# (importer, imported) packages: allowed by the order, refused by the house.
FORBIDDEN = [
    ("train", "ingest"),  # run_training takes a Manifest; the caller resolved it
    ("tune", "ingest"),  # run_search too
]
# Where a dataset reference may be resolved (and a source ingested) on the way to training.
RESOLVERS = ("flows.cli", "flows.orchestration", "flows.bench", "flows.ingest")


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path) -> list[tuple[str, int]]:
    """(module imported, line) for every import in the file, including function-level ones.
    ``from flows.x import y`` yields flows.x.y when that is a module, else flows.x."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "flows" or len(parts) < 2:
        return None
    return "shared" if parts[1] in SHARED else parts[1]


def test_gan_core_is_plain_pytorch():
    banned = ("flows", "prefect", "ray", "mlflow", "s3fs", "boto3")
    for module, path in _modules("gan_core").items():
        for name, line in _imports(path):
            assert name.split(".")[0] not in banned, f"{module}:{line} imports {name}"


def test_flows_imports_point_down_the_data_path():
    modules = _modules("flows")
    rank = {name: i for i, name in enumerate(LAYERS)}
    for module, path in modules.items():
        mine = _layer(module)
        if mine is None:
            continue
        assert mine in rank, f"{module}: package {mine!r} is not in the layer map"
        for name, line in _imports(path):
            if name not in modules:
                if name.split(".")[0] == "prefect":
                    assert mine in ("orchestration", "cli"), f"{module}:{line} imports Prefect"
                continue
            theirs = _layer(name)
            if theirs is None or theirs == mine:
                continue
            assert rank[theirs] < rank[mine], (
                f"{module}:{line} imports {name}: {mine} may not import {theirs} "
                f"(order: {' < '.join(LAYERS)})"
            )


def test_forbidden_edges_stay_out():
    modules = _modules("flows")
    for module, path in modules.items():
        for name, line in _imports(path):
            if name in modules and (_layer(module), _layer(name)) in FORBIDDEN:
                raise AssertionError(
                    f"{module}:{line} imports {name}: {_layer(module)} may not import "
                    f"{_layer(name)} (FORBIDDEN)"
                )


def test_only_the_edges_resolve_dataset_references():
    for module, path in _modules("flows").items():
        if module.startswith(RESOLVERS):
            continue
        for name, line in _imports(path):
            assert not name.endswith("ensure_snapshot"), (
                f"{module}:{line} imports {name}: resolve the dataset at the edge "
                f"({', '.join(RESOLVERS[:3])}) and pass the Manifest down"
            )


def test_no_import_cycles_between_flows_modules():
    modules = _modules("flows")
    graph = {
        m: {n for n, _ in _imports(p) if n in modules and n != m and not m.startswith(n + ".")}
        for m, p in modules.items()
    }
    # A package's __init__ re-exporting its own submodules is not a cycle of the house.
    for m in graph:
        graph[m] = {n for n in graph[m] if not (n.startswith(m + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_every_imported_package_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {
        re.split(r"[<>=!\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")
        for req in project["dependencies"]
    }
    # torch-fidelity is installed without its dependencies (Makefile: its torchvision pin
    # would replace torch); it is a runtime dependency all the same.
    declared.add("torch-fidelity")
    dev = {
        re.split(r"[<>=!\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")
        for req in project["optional-dependencies"]["dev"]
    }
    dists = metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    missing = set()
    for package in ("gan_core", "flows"):
        for module, path in _modules(package).items():
            for name, line in _imports(path):
                top = name.split(".")[0]
                if top in stdlib or top in ("gan_core", "flows", "__future__"):
                    continue
                owners = {d.lower().replace("_", "-") for d in dists.get(top, [])}
                allowed = declared | dev if module.startswith("flows.bench") else declared
                if owners and not owners & allowed:
                    missing.add(f"{top} ({', '.join(sorted(owners))}) in {module}:{line}")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(sorted(missing))


def test_manifest_sits_at_the_bottom_of_snapshots():
    # Every layer above reads manifests; the type must import no flows module, or reading a
    # manifest would drag the store (or worse) into whatever imports it.
    path = ROOT / "flows" / "snapshots" / "manifest.py"
    assert _layer("flows.snapshots.manifest") == "snapshots"
    for name, line in _imports(path):
        assert name.split(".")[0] != "flows", f"flows.snapshots.manifest:{line} imports {name}"
