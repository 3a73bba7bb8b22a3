"""The README and docs stay true: the fresh-machine commands CI runs, every config key and file they
name exists, every `asr-server` command line they show parses, and the README stays short."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from asr_server.cli import build_parser
from asr_server.config import Config
from asr_server.config.sections import RETIRED_KEYS
from tests.test_config import schema_keys

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "models" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_readme_opens_with_what_it_is_then_the_two_commands_ci_runs():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250
    first = text.split("\n## ")[1]
    block = re.search(r"```sh\n(.*?)```", first, re.S)
    assert block is not None
    assert [line.split("#")[0].strip() for line in block.group(1).splitlines()] == [
        "scripts/serve.sh",
        "scripts/test.sh",
    ]
    assert "scripts/test.sh" in (REPO / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_key_and_file_a_doc_names_exists(doc):
    keys = schema_keys(Config)
    sections = {k for k in keys if "." not in k}
    text = doc.read_text(encoding="utf-8")
    # a dotted name in backticks that starts with a section is a key (`asr.budget_ms`, `speaker.model`)
    named = [m for m in re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)`", text) if m.split(".")[0] in sections]
    # a retired key may be named where a doc says what replaced it (the overload governor's history)
    retired = {f"{section}.{key}" for section, names in RETIRED_KEYS.items() for key in names}
    assert [m for m in named if m not in keys and m not in retired] == []
    files = re.findall(r"(?<![\w/.])((?:docs|models|scripts|benchmarks)/[\w./-]+\.(?:md|sh|yaml|py))", text)
    assert [f for f in files if not (REPO / f).exists()] == []


def test_every_command_line_the_readme_shows_parses():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = re.findall(r"^(?:\.venv/bin/)?asr-server ([^#\n]+)", text, re.M)
    assert len(lines) >= 6
    parser = build_parser()
    for line in lines:
        argv = shlex.split(line.replace(" | export | list | verify", ""))
        parser.parse_args(argv)  # exits (SystemExit) on an unknown command or option
