"""`--help` lists each command's options under titled sections (issue 18.9): every option has a section, so an
option added tomorrow without one shows up here, not silently at the bottom of the list."""
from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from streamconv.cli import cli
from streamconv.help_sections import OTHER, SECTIONS


def sections_of(help_text: str) -> dict:
    """{section title: [option spellings listed under it]} as --help prints them."""
    found, title = {}, None
    for line in help_text.splitlines():
        heading = re.match(r"^(\S[^:]*):$", line)
        if heading:
            title = heading.group(1)
            found[title] = []
        elif title and re.match(r"^  -", line):
            found[title].append(line.split()[0].rstrip(","))
    return found


@pytest.mark.parametrize("command", ["convert", "plan", "verify", "batch", "inspect"])
def test_every_option_is_listed_under_its_section(command):
    result = CliRunner().invoke(cli, [command, "--help"], terminal_width=120)
    assert result.exit_code == 0, result.output
    listed = sections_of(result.output)
    assert "Options" not in listed, f"{command}: options outside any section: {listed['Options']}"
    assert listed.get(OTHER) == ["-h"], f"{command}: give these a place in help_sections.SECTIONS: {listed.get(OTHER)}"
    shown = [p for p in cli.commands[command].params if isinstance(p, click.Option) and not p.hidden
             and p.name != "help"]
    in_sections = [o for title, opts in listed.items() if title != OTHER for o in opts]
    assert len(in_sections) == len(shown), (command, in_sections, [p.opts for p in shown])
    for p in shown:             # --help writes the shortest spelling first (`-q, --quiet`)
        assert set(p.opts) & set(in_sections), (command, p.opts, listed)
    titles = [t for t, _ in SECTIONS]
    assert [t for t in listed if t != OTHER] == [t for t in titles if t in listed], "sections out of order"


def test_a_shared_option_has_one_section_on_every_command():
    seen = {}
    for command in ("convert", "plan", "verify", "batch"):
        output = CliRunner().invoke(cli, [command, "--help"], terminal_width=120).output
        for title, opts in sections_of(output).items():
            for o in opts:
                assert seen.setdefault(o, title) == title, (command, o, seen[o], title)
    assert seen["--dtype"] == "What is written" and seen["--verify"] == "Checking", seen
