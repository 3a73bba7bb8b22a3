#!/usr/bin/env python3
"""Install lock files into the running interpreter's environment, exactly, or say in one line why not.

    python scripts/install_locked.py requirements/build.txt requirements.txt

Each lock is installed with `pip install --require-hashes --no-deps`: nothing is resolved again,
so the versions are the lock's. pip's own output goes to `build/setup-pip.log`; when it fails,
the message names the package and what to run instead of pip's backtrace. Standard library only.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOG = REPO / "build" / "setup-pip.log"
REGENERATE = "python3 scripts/lock.py"


@dataclass(frozen=True)
class Failure:
    """Why pip stopped, in words a user can act on."""

    summary: str
    advice: str


_PATTERNS: tuple[tuple[str, str, str], ...] = (
    # (regex on pip's output, summary with {0} = the match, advice); the first that matches wins
    (
        r"THESE PACKAGES DO NOT MATCH THE HASHES FROM THE REQUIREMENTS FILE[\s\S]*?\n\s+([A-Za-z0-9._-]+==[^\s]+)",
        "the file downloaded for {0} does not match the hash in the lock (a changed upload or a corrupt download)",
        "run the set-up again; if it repeats, regenerate the locks (`" + REGENERATE + "`)",
    ),
    (
        r"In --require-hashes mode, all requirements must have their versions pinned[^\n]*\n\s*([^\n]+)",
        "the lock holds an unpinned requirement: {0}",
        "regenerate the locks (`" + REGENERATE + "`) instead of editing them",
    ),
    (
        r"Hashes are required in --require-hashes mode, but they are missing from some requirements[\s\S]*?\n\s+([A-Za-z0-9._-]+==[^\s]+)",
        "the lock has no hash for {0}",
        "regenerate the locks (`" + REGENERATE + "`) instead of editing them",
    ),
    (
        r"No matching distribution found for ([^\s]+)",
        "{0} is not on the package index for Python {py} on {platform} (a release withdrawn from the "
        "registry, or no wheel for this Python)",
        "regenerate the locks on a machine with the index (`" + REGENERATE + "`), or use Python 3.11, which the "
        "locks were made for",
    ),
    (
        r"(Could not fetch URL[^\n]*|Failed to establish a new connection[^\n]*|Network is unreachable)",
        "the package index cannot be reached ({0})",
        "check the network or set PIP_INDEX_URL to a mirror, then run the set-up again",
    ),
    (
        r"Failed building wheel for ([^\s]+)",
        "{0} has no wheel for this platform and building it from source failed",
        "install the compiler and headers it needs (see build/setup-pip.log), or use Python 3.11 on x86_64 or aarch64",
    ),
)


def diagnose(output: str) -> Failure:
    """The first known cause in pip's output, else a pointer to the log."""
    import platform

    for pattern, summary, advice in _PATTERNS:
        m = re.search(pattern, output)
        if m:
            what = m.group(1).strip().rstrip(".") if m.groups() else m.group(0)
            return Failure(
                summary.format(what[:200], py=platform.python_version(), platform=platform.machine()), advice
            )
    last = [line for line in output.strip().splitlines() if line.startswith("ERROR")][-1:] or ["pip failed"]
    return Failure(last[0][:300], f"see {LOG} for pip's full output")


def install(locks: list[str], log: Path = LOG) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as out:
        for lock in locks:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--require-hashes",
                "--no-deps",
                "--disable-pip-version-check",
                "-r",
                lock,
            ]
            print(f"setup: pip install --require-hashes --no-deps -r {lock}", file=sys.stderr, flush=True)
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            out.write(result.stdout + result.stderr)
            if result.returncode != 0:
                failure = diagnose(result.stdout + "\n" + result.stderr)
                print(
                    f"setup: cannot install {lock}: {failure.summary}.\n"
                    f"setup: what to do: {failure.advice}.\n"
                    f"setup: pip's full output: {log}",
                    file=sys.stderr,
                )
                return 2
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(install(sys.argv[1:]))
