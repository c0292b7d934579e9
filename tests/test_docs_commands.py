"""Every ragdist-index / -train / -eval / -plan command shown in the README and docs/ composes.

A renamed config key or option would otherwise leave the documentation telling users to type
commands that fail. Only the composition is checked (no job runs); multirun sweeps are expanded to
their first point.
"""

from __future__ import annotations

import re
import shlex

import pytest

from ragdist.config import RunConfig, as_object, compose
from tests.conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"^\s*(?:\$\s*)?(?:[A-Z_]+=\S+\s+)*(ragdist-(?:index|train|eval|plan))\s+(.*?)(?:\s+#.*)?$")


def _commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCS:
        in_code = False
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_code = not in_code
                continue
            if not in_code:
                continue
            m = COMMAND.match(line)
            if not m:
                continue
            text = m.group(2).rstrip("\\").strip()
            words = [w for w in shlex.split(text) if w != "-m"]
            # a sweep `a=1,2,4`: its first point (lists in brackets stay whole)
            words = [w.split(",")[0] if ("=" in w and "[" not in w and "," in w) else w for w in words]
            found.append((f"{path.name}:{n}", words))
    return found


COMMANDS = _commands()


def test_the_docs_show_commands():
    assert len(COMMANDS) >= 15


@pytest.mark.parametrize("where,overrides", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_composes(where, overrides):
    overrides = [o for o in overrides if not o.startswith("hydra/launcher=") and not o.startswith("hydra.")]
    assert isinstance(as_object(compose([*overrides, "run_dir=/tmp/x"])), RunConfig)
