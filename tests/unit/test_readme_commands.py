"""Every ``vna`` command the README shows parses against the CLI's argument parser (issue 20).

Command lines in fenced code blocks must parse exactly; the Operations table
(which uses placeholders such as ``UID`` and ``[--json]``) must name verbs
that exist.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex

import pytest

from tests.conftest import ROOT
from vna.cli import build_parser

README = (ROOT / "README.md").read_text()


def _code_block_commands() -> list[list[str]]:
    commands: list[list[str]] = []
    for lang, body in re.findall(r"^ *```(\w*)\n(.*?)^ *```", README, re.S | re.M):
        if lang in ("toml", "python"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and (words[0] == "vna" or words[0].endswith("/vna")):
                commands.append(words[1:])
    return commands


def _table_verbs() -> list[list[str]]:
    verbs: list[list[str]] = []
    first_cells = [line.split(" | ")[0] for line in README.splitlines() if line.startswith("| `vna ")]
    for cell in re.findall(r"`vna ([a-z][^`]*)`", "\n".join(first_cells)):
        words = re.match(r"[a-z |\\]+", cell)
        assert words is not None
        head = words.group(0).replace("\\|", "|").split()
        if not head:
            continue
        *path, last = head
        verbs += [[*path, alt] for alt in last.split("|") if alt]
    return verbs


def _parses(argv: list[str]) -> int:
    """The exit status argparse gives ``argv`` (0: parsed, or --help printed)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            return int(exc.code or 0) or (1 if err.getvalue() else 0)
    return 0


def test_the_readme_shows_commands() -> None:
    assert _code_block_commands() and len(_table_verbs()) >= 15


@pytest.mark.parametrize("argv", _code_block_commands(), ids=" ".join)
def test_code_block_command_parses(argv: list[str]) -> None:
    assert _parses(argv) == 0, f"vna {' '.join(argv)}"


@pytest.mark.parametrize("verb", _table_verbs(), ids=" ".join)
def test_operations_table_verb_exists(verb: list[str]) -> None:
    assert _parses([*verb, "--help"]) == 0, f"vna {' '.join(verb)}"
