"""The package's shape: one import name, and imports that only run down the layers.

Layers, from the ground up:
- the kernel: the modules directly in ``epwatch/`` (schema, wire codec, frame format,
  cost model, Hockney fit, sample catalogue, shared argument types) and
  ``epwatch.protos``;
- the components: ``epwatch.hooks``, ``epwatch.agent``, ``epwatch.simulator``,
  ``epwatch.collector`` and ``epwatch.dashboards``, each on the kernel only;
- the application: ``epwatch.cli`` (commands, demo, promstack), on anything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
KERNEL = "kernel"
APP = "epwatch.cli"
COMPONENTS = {"epwatch.hooks", "epwatch.agent", "epwatch.simulator", "epwatch.collector",
              "epwatch.dashboards"}  # fmt: skip
OLD_TOP_LEVEL = {"agent", "collector", "simulator", "protos", "dashboards", "hooks", "cli"}


def source_modules() -> dict[str, Path]:
    """Every module of the package, by its dotted name under ``epwatch``."""
    out: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if any(p in ("grafana", "prometheus", "scenarios") for p in parts):
                continue
            name = ".".join([package, *parts])
            if package == "epwatch" and len(parts) > 1:
                continue  # a subfolder of epwatch/ would be a package of its own
            out.setdefault(name, path)
    return out


def layer_of(module: str) -> str:
    """The layer (kernel, a component's name, or the app) a module belongs to."""
    for top in (APP, *COMPONENTS):
        if module == top or module.startswith(top + "."):
            return top
    return KERNEL


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, function-level ones too."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from epwatch.x import y` may import the module epwatch.x.y
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            found.append((node.lineno, base))
    return found


def test_every_package_folder_is_listed_for_setuptools() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    packages = {m for m, p in source_modules().items() if p.name == "__init__.py"}
    assert packages == listed, "pyproject's packages and the folders with __init__.py differ"
    assert set(PACKAGE_DIRS) <= listed


def test_no_module_imports_a_layer_above_its_own() -> None:
    modules = source_modules()
    back_edges = []
    for module, path in sorted(modules.items()):
        mine = layer_of(module)
        for line, target in imports_of(path, module):
            where = f"{path.relative_to(ROOT)}:{line}"
            top = target.split(".")[0]
            if top in OLD_TOP_LEVEL:
                back_edges.append(f"{where}: imports {target}, a name outside epwatch")
                continue
            ours = target in modules or target.rpartition(".")[0] in modules
            if top != "epwatch" or not ours:
                continue
            theirs = layer_of(target)
            if mine != APP and theirs not in (KERNEL, mine):
                back_edges.append(f"{where}: {module} ({mine}) imports {target} ({theirs})")
    assert not back_edges, "imports against the layers:\n" + "\n".join(back_edges)


def test_the_walker_sees_a_back_edge(tmp_path: Path) -> None:
    """The check above can fail: a kernel module importing the collector is caught."""
    bad = tmp_path / "schema.py"
    bad.write_text("def f():\n    from epwatch.collector.service import CollectorService\n")
    (line, target), *_ = imports_of(bad, "epwatch.schema")
    assert (line, layer_of(target), layer_of("epwatch.schema")) == (2, "epwatch.collector", KERNEL)


def test_engine_import_loads_only_numpy_and_protobuf(tmp_path: Path) -> None:
    """What an engine pays for ``from epwatch.hooks import ...``: no grpc, no pyarrow,
    no collector, no agent daemon; run from outside the checkout."""
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "from epwatch.hooks import get_probe, DISPATCH, COMBINE\n"
        "new = set(sys.modules) - before\n"
        "print('\\n'.join(sorted(new)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    outside = {m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names)
    assert outside <= {"epwatch", "numpy", "google"}, sorted(outside)
    assert "google.protobuf" in loaded and "numpy" in loaded
    ours = {m for m in loaded if m.startswith("epwatch.")}
    assert all(layer_of(m) in (KERNEL, "epwatch.hooks") for m in ours), sorted(ours)
    assert not any(m.startswith(("grpc", "pyarrow", "pandas", "torch")) for m in loaded)


@pytest.mark.slow
def test_the_wheel_has_one_top_level_name(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("epwatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"epwatch", wheel.name.split("-py")[0] + ".dist-info"}, sorted(top)
    expected = {
        "epwatch/hooks/__init__.py",
        "epwatch/agent/daemon.py",
        "epwatch/collector/service.py",
        "epwatch/protos/epwatch_pb2.py",
        "epwatch/dashboards/prometheus/ep.rules.yml",
        "epwatch/cli/__main__.py",
    }
    assert expected <= set(names)
