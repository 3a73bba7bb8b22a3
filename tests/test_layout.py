"""The package's shape: data flows one way (no module imports from a layer above it), no module is
too large to read, and the wheel holds the package alone (no tests, benchmarks or load test)."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "asr_server"

#: Top to bottom, as the README's map draws them; a unit imports only from units below it (and itself).
LAYERS: dict[str, int] = {
    "__main__": 8,
    "cli": 7,
    "workers": 6,
    "app": 5,
    "adapters": 4,
    "core": 3,
    "modelfiles": 3,
    "engines": 2,
    "audio": 2,
    "config": 1,
    "sharing": 1,
    "types": 0,
    "constants": 0,
    "errors": 0,
    "logs": 0,
}
MAX_LINES = 500
#: The modules where one concept needs more than MAX_LINES, each with its own limit and the reason.
#: A smell alarm, not a target: a concept is never split to pass it.
LARGER: dict[str, tuple[int, str]] = {
    "asr_server/config/sections.py": (
        650,
        "the configuration's schema: every section, key, default and validation in one place (the archive, "
        "hotwords and OTA sections took it past 600); split (config/base.py, config/inference.py), a reader "
        "looked for one key's rules in three files",
    ),
}


def unit_of(module: str) -> str:
    """`asr_server.core.pipeline` → `core`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> set[str]:
    """Every asr_server module `path` imports, at the top or inside a function."""
    rel = path.relative_to(REPO).with_suffix("")
    here = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
    package = here if rel.name == "__init__" else ".".join(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("asr_server")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("asr_server"):
                out.add(target)
    return out


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_unit_has_a_layer():
    units = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in modules()} - {"__init__"}
    assert units <= set(LAYERS), f"units without a layer: {units - set(LAYERS)}"


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for path in modules():
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        unit = unit_of(module)
        if unit == "__init__":
            continue
        for target in imports(path):
            other = unit_of(target)
            if other in ("__init__", unit):
                continue
            if LAYERS[other] >= LAYERS[unit]:
                upward.append(
                    f"{module} ({unit}, layer {LAYERS[unit]}) imports {target} ({other}, layer {LAYERS[other]})"
                )
    assert upward == []


def test_no_two_modules_import_each_other():
    """Data flows one way inside a unit too: no import cycle between modules, not even one hidden
    under `TYPE_CHECKING` (a FunASR session once held its server, which creates it)."""
    names = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p for p in modules()}
    graph = {m: {t for t in imports(p) if t in names and t != m} for m, p in names.items()}
    cycles = []
    for module, targets in graph.items():
        for target in targets:
            seen, todo = set(), [target]
            while todo:
                current = todo.pop()
                if current == module:
                    cycles.append(f"{module} -> {target} -> ... -> {module}")
                    break
                if current not in seen:
                    seen.add(current)
                    todo.extend(graph[current])
    assert cycles == []


def test_no_module_is_over_the_size_a_newcomer_reads_at_once():
    large = {}
    for p in modules():
        name, n = str(p.relative_to(REPO)), len(p.read_text().splitlines())
        if n > LARGER.get(name, (MAX_LINES, ""))[0]:
            large[name] = n
    assert large == {}


@pytest.mark.slow
def test_the_wheel_holds_the_package_and_nothing_else(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("asr_server-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"asr_server", next(n.split("/")[0] for n in names if ".dist-info/" in n)}, tops
    assert "asr_server/core/pipeline.py" in names
    assert not [n for n in names if any(part in n for part in ("tests/", "benchmarks/", "loadtest/", "standins"))]
    # The browser console's files, served from the installed package.
    static = PACKAGE / "adapters" / "http" / "static"
    shipped = {f"asr_server/adapters/http/static/{p.name}" for p in static.iterdir() if p.is_file()}
    assert shipped and shipped <= set(names), shipped - set(names)
