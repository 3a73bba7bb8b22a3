#!/usr/bin/env python3
"""The dependency locks: generated from pyproject.toml's ranges, checked against them.

    python3 scripts/lock.py            regenerate every lock (needs the package index)
    python3 scripts/lock.py --check    fail when a lock and pyproject.toml disagree (offline)

pyproject.toml keeps the ranges; each lock pins every package one purpose installs, direct and
transitive, with hashes, so two fresh machines get the same versions. `uv pip compile` resolves
them (universal: one lock serves every platform and Python >= 3.11). The widest lock is resolved
first and each narrower one is constrained by it, so a package shared by two locks has one version
in both, and installing one lock over another changes nothing they share.

Every lock starts with a header recording what it was generated from: the requirement lines
taken from pyproject.toml, the overrides and the constraints (`inputs-sha256`), and its own
body (`body-sha256`). `--check` recomputes both, so a range changed in pyproject.toml without
regenerating, or a lock edited by hand, fails the test command before any test runs.

Only the standard library is used: this runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
UV_VERSION = "0.13.9"
PYTHON_VERSION = "3.11"  # the oldest Python the package supports; the locks cover newer ones too
TOOLS_VENV = REPO / "build" / "lock-tools"
REGENERATE = "python3 scripts/lock.py"


@dataclass(frozen=True)
class Lock:
    """One lock file: what it holds and what it is resolved against."""

    path: str
    purpose: str
    extras: tuple[str, ...] = ()
    #: Packages removed from the resolution (a dependency this lock must not install).
    never: tuple[str, ...] = ()
    #: The lock whose pins this one keeps for every package they share.
    constrained_by: str | None = None
    #: Lock pyproject's [build-system] requires (plus pip) instead of the package's dependencies.
    build: bool = False


LOCKS = (
    # Resolved widest first: each narrower lock keeps the wider lock's pin of every package they share, so
    # a version one purpose needs (torch 2.11 caps setuptools, say) holds for every lock.
    Lock(
        "requirements/test.txt",
        "the test suite, the load test and the benchmarks",
        extras=("silero", "torch", "test", "loadtest", "ray"),
    ),
    Lock(
        "requirements/build.txt",
        "pip and the build backend that installs the package itself",
        build=True,
        constrained_by="requirements/test.txt",
    ),
    Lock(
        "requirements/torch.txt",
        "model pull/export from PyTorch weights and the torch backend",
        extras=("silero", "torch"),
        constrained_by="requirements/test.txt",
    ),
    # silero-vad ships silero_vad.onnx; its torch dependency serves only its own Python API.
    Lock(
        "requirements.txt",
        "`asr-server serve` on ONNX Runtime (CPU): no torch",
        extras=("silero",),
        never=("torch",),
        constrained_by="requirements/torch.txt",
    ),
    # The nodes of a Ray cluster (docs/ray.md): the server and Ray Serve, no torch.
    Lock(
        "requirements/ray.txt",
        "serving with `inference.mode: ray` (Ray Serve deployments and the front ends that call them): no torch",
        extras=("silero", "ray"),
        never=("torch",),
        constrained_by="requirements/test.txt",
    ),
    Lock(
        "requirements/gpu.txt",
        "serving on ONNX Runtime with CUDA (onnxruntime-gpu in place of onnxruntime)",
        extras=("silero", "gpu"),
        never=("torch", "onnxruntime"),
        constrained_by="requirements.txt",
    ),
)


class LockError(Exception):
    """A lock is missing, edited by hand, or out of date with pyproject.toml."""


def _pyproject(path: Path = PYPROJECT) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def requirements(lock: Lock, pyproject: dict) -> list[str]:
    """The requirement lines pyproject.toml gives this lock, in a stable order."""
    if lock.build:
        return sorted(["pip>=23.2", *pyproject["build-system"]["requires"]])
    project = pyproject["project"]
    extras = project.get("optional-dependencies", {})
    lines = list(project["dependencies"])
    for name in lock.extras:
        if name not in extras:
            raise LockError(f"pyproject.toml has no optional-dependencies.{name} (used by {lock.path})")
        lines += extras[name]
    self_name = _normalise(project["name"])
    # `asr-server[x]` inside an extra is already covered by listing extra x here.
    return sorted({line for line in lines if _normalise(_requirement_name(line)) != self_name})


def _requirement_name(line: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    if not match:
        raise LockError(f"cannot read the requirement {line!r}")
    return match.group(1)


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def inputs_digest(lock: Lock, pyproject: dict, repo: Path = REPO) -> str:
    """What the lock was resolved from: requirements, overrides, constraints, tool, Python."""
    parts = [
        f"uv {UV_VERSION}",
        f"python {PYTHON_VERSION}",
        *requirements(lock, pyproject),
        *(f"never {n}" for n in lock.never),
    ]
    if lock.constrained_by:
        parts.append(f"constraints {_sha256((repo / lock.constrained_by).read_text(encoding='utf-8'))}")
    return _sha256("\n".join(parts))


def _header(lock: Lock, inputs: str, body: str) -> str:
    extras = ", ".join(lock.extras) if lock.extras else ("build-system" if lock.build else "none")
    lines = [
        f"# {lock.purpose}.",
        f"# Generated by `{REGENERATE}` from pyproject.toml (extras: {extras}); do not edit by hand.",
        "# Install with: pip install --require-hashes --no-deps -r " + lock.path,
    ]
    if lock.never:
        lines.append("# Left out on purpose: " + ", ".join(lock.never) + ".")
    if lock.constrained_by:
        lines.append(f"# Shares every common pin with {lock.constrained_by}.")
    lines += [f"# inputs-sha256: {inputs}", f"# body-sha256: {_sha256(body)}"]
    return "\n".join(lines) + "\n"


def split_lock(text: str) -> tuple[dict[str, str], str]:
    """The `# key: value` header fields and the body (everything after the header comments)."""
    fields: dict[str, str] = {}
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        m = re.match(r"#\s*([a-z0-9-]+):\s*(\S+)\s*$", lines[i])
        if m:
            fields[m.group(1)] = m.group(2)
        i += 1
    return fields, "".join(lines[i:])


def pins(body: str) -> dict[str, str]:
    """Package name → pinned version, for every `name==version` line of a lock body."""
    out: dict[str, str] = {}
    for line in body.splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", line)
        if m:
            out.setdefault(_normalise(m.group(1)), m.group(2))
    return out


def check(repo: Path = REPO, locks: tuple[Lock, ...] = LOCKS) -> list[str]:
    """Every way the locks disagree with pyproject.toml (or were edited); empty when all agree."""
    problems: list[str] = []
    pyproject = _pyproject(repo / "pyproject.toml")
    for lock in locks:
        path = repo / lock.path
        if not path.is_file():
            problems.append(f"{lock.path} is missing: run `{REGENERATE}`")
            continue
        fields, body = split_lock(path.read_text(encoding="utf-8"))
        if "inputs-sha256" not in fields or "body-sha256" not in fields:
            problems.append(f"{lock.path} has no generation header: run `{REGENERATE}`")
            continue
        if fields["body-sha256"] != _sha256(body):
            problems.append(f"{lock.path} was edited by hand (its pins no longer match its header): run `{REGENERATE}`")
        try:
            inputs = inputs_digest(lock, pyproject, repo)
        except (LockError, OSError) as e:
            problems.append(f"{lock.path}: {e}")
            continue
        if fields["inputs-sha256"] != inputs:
            problems.append(
                f"{lock.path} is out of date: pyproject.toml (or {lock.constrained_by or 'the lock tool'}) "
                f"changed since it was generated: run `{REGENERATE}`"
            )
        pinned = pins(body)
        for line in requirements(lock, pyproject):
            name = _normalise(_requirement_name(line))
            if name in lock.never or ";" in line:
                continue
            if name not in pinned:
                problems.append(f"{lock.path} pins no version of {name}, which pyproject.toml requires")
    return problems


# --------------------------------------------------------------------------- generation


def _uv() -> list[str]:
    """A uv of the pinned version: on PATH, else installed into build/lock-tools."""
    for candidate in ("uv", str(TOOLS_VENV / "bin" / "uv")):
        try:
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        if out.split()[1:2] == [UV_VERSION]:
            return [candidate]
    print(f"lock: installing uv {UV_VERSION} into {TOOLS_VENV}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(TOOLS_VENV)], check=True)
    subprocess.run([str(TOOLS_VENV / "bin" / "python"), "-m", "pip", "install", "-q", f"uv=={UV_VERSION}"], check=True)
    return [str(TOOLS_VENV / "bin" / "uv")]


def _constraints(lock_path: Path) -> str:
    """`name==version ; marker` lines of a lock, hashes dropped (constraints take no hashes)."""
    out = []
    for line in split_lock(lock_path.read_text(encoding="utf-8"))[1].splitlines():
        if re.match(r"[A-Za-z0-9]", line):
            out.append(line.rstrip(" \\"))
    return "\n".join(out) + "\n"


_NEVER = "sys_platform == 'never'"


def _drop_never(body: str) -> str:
    """Remove the entries of the overridden-away packages: a universal resolution still lists
    them, under a marker no platform matches, hashes included."""
    out: list[str] = []
    skipping = False
    for line in body.splitlines(keepends=True):
        if re.match(r"[A-Za-z0-9]", line):
            skipping = _NEVER in line
        if not skipping:
            out.append(line)
    return "".join(out)


def generate(lock: Lock, uv: list[str], pyproject: dict) -> None:
    path = REPO / lock.path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "requirements.in"
        req.write_text("\n".join(requirements(lock, pyproject)) + "\n", encoding="utf-8")
        # uv prefers the pins already in its output file: seeded with the current lock, adding one
        # dependency does not move every other package to its newest release.
        out = Path(tmp) / "lock.txt"
        if path.is_file():
            out.write_text(split_lock(path.read_text(encoding="utf-8"))[1], encoding="utf-8")
        cmd = [
            *uv,
            "pip",
            "compile",
            str(req),
            "--universal",
            "--python-version",
            PYTHON_VERSION,
            "--generate-hashes",
            "--no-header",
            "--no-annotate",
            "--quiet",
            "--index-url",
            os.environ.get("UV_INDEX_URL", "https://pypi.org/simple"),
            "--output-file",
            str(out),
        ]
        if lock.never:
            overrides = Path(tmp) / "overrides.txt"
            overrides.write_text("".join(f"{n} ; sys_platform == 'never'\n" for n in lock.never), encoding="utf-8")
            cmd += ["--overrides", str(overrides)]
        if lock.constrained_by:
            constraints = Path(tmp) / "constraints.txt"
            constraints.write_text(_constraints(REPO / lock.constrained_by), encoding="utf-8")
            cmd += ["--constraints", str(constraints)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise LockError(f"uv could not resolve {lock.path}:\n{result.stderr.strip()}")
        body = _drop_never(out.read_text(encoding="utf-8"))
    path.write_text(_header(lock, inputs_digest(lock, pyproject), body) + body, encoding="utf-8")
    print(f"lock: wrote {lock.path} ({len(pins(body))} packages)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check the locks against pyproject.toml, offline")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for p in problems:
            print(f"lock check: {p}", file=sys.stderr)
        return 1 if problems else 0
    uv = _uv()
    pyproject = _pyproject()
    try:
        for lock in LOCKS:  # in order: each constraint lock is written before the locks built on it
            generate(lock, uv, pyproject)
    except LockError as e:
        print(f"lock: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
