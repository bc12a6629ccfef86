"""`--help` lists each command's options under titled sections (issue 18.9): every option has a section, so an
option added tomorrow without one shows up here, not silently at the bottom of the list."""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from streamconv.cli import cli
from streamconv.help_sections import OTHER, SECTIONS
from streamconv.planning.options import BatchOptions, ConvertOptions, RunOptions, command_fields

REPO = Path(__file__).resolve().parent.parent
SCREEN_LINES = 50


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


@pytest.mark.parametrize("command", [None, "convert", "plan", "verify", "batch", "inspect"])
def test_help_fits_a_screen(command):
    """Each command's --help in an 80-column terminal is at most SCREEN_LINES lines; the long explanations are
    docs/options.md's (convert's was 106 lines before the options were grouped and shortened)."""
    env = dict(os.environ, COLUMNS="80", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = [sys.executable, "-m", "streamconv"] + ([command] if command else []) + ["--help"]
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, check=True).stdout
    lines = out.splitlines()
    assert len(lines) <= SCREEN_LINES, f"{command} --help is {len(lines)} lines:\n{out}"
    assert max(len(line) for line in lines) <= 80, out


def test_every_flag_comes_from_an_options_field():
    """No command declares a flag by hand: every option but --json and --help is a field of ConvertOptions,
    RunOptions or BatchOptions whose metadata names that command."""
    by_name = {f.name: f for cls in (ConvertOptions, RunOptions, BatchOptions) for f in dataclasses.fields(cls)}
    for command, cmd in cli.commands.items():
        params = [p for p in cmd.params if isinstance(p, click.Option) and p.name not in ("help", "as_json")]
        assert [p.name for p in params] == [f.name for f in command_fields(command)], command
        for p in params:
            f = by_name[p.name]
            assert f.metadata["flag"].split("/")[0] in p.opts, (command, p.opts)
            # the field's default, also None for an on/off pair (--crc: "not given", decided by --verify)
            default = f.metadata["default_in"].get(command, f.default)
            assert (tuple(p.default or ()) if p.multiple else p.default) == default, (command, p.name, p.default)


def test_the_option_reference_agrees_with_the_metadata():
    """docs/options.md's table has a row for every convert option, with the default the field declares."""
    doc = (REPO / "docs" / "options.md").read_text(encoding="utf-8")
    rows = {spelling: line.split("|")[2] for line in doc.splitlines() if line.startswith("| `-")
            for spelling in re.findall(r"--?[\w-]+", line.split("|")[1].split(" ")[1])}
    for f in command_fields("convert"):
        flag = f.metadata["flag"].split("/")[0]
        row = rows.get(flag)
        assert row is not None, f"docs/options.md has no row for {flag}"
        if f.metadata["show_default"]:
            assert f"`{f.default}`" in row, (flag, f.default, row)
