"""`manifest.json`: the size and sha256 of every model file, and where it came from.

`pull` and `export` write it; `verify` compares every file against it. One writer, one schema.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..engines.contracts import one_line
from ..errors import ModelFileError
from .layout import models_root

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    size: int
    sha256: str
    source: str


def manifest_path(config: Config) -> Path:
    return models_root(config) / MANIFEST_NAME


def manifest_key(root: Path, path: Path) -> str:
    """Path relative to the manifest's folder, or absolute for a file outside it."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return Path(path).resolve().as_posix() if rel.startswith("..") else Path(rel).as_posix()


def read_manifest(path: Path) -> dict[str, ManifestEntry]:
    """Entries keyed by path relative to the manifest's folder; `ModelFileError` if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        return {k: ManifestEntry(int(v["size"]), str(v["sha256"]), str(v.get("source", ""))) for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelFileError(
            f"{path}: unreadable manifest ({one_line(e)}); delete it and run "
            f"`asr-server models pull` to record the files again"
        ) from None


def write_manifest(path: Path, entries: dict[str, ManifestEntry]) -> None:
    """Write atomically, so an interrupted write never leaves half a manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "format": MANIFEST_FORMAT,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {k: {"size": e.size, "sha256": e.sha256, "source": e.source} for k, e in sorted(entries.items())},
    }
    fd, tmp = tempfile.mkstemp(prefix=".manifest.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def record_files(config: Config, paths: Iterable[Path], source: str, *, replace: bool = True) -> list[Path]:
    """Hash `paths` into the manifest with `source`; with `replace=False` keep existing entries."""
    mpath = manifest_path(config)
    root = mpath.parent
    entries = read_manifest(mpath)
    recorded = []
    for p in paths:
        p = Path(p)
        key = manifest_key(root, p)
        if not p.is_file() or (not replace and key in entries):
            continue
        entries[key] = ManifestEntry(p.stat().st_size, sha256_file(p), source)
        recorded.append(p)
    if recorded:
        write_manifest(mpath, entries)
    return recorded
