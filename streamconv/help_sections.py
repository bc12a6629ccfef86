"""`--help` in titled sections, so a reader finds an option by what it is about (issue 18.9).

click has no option groups; this is the small part of them the CLI needs: a command class whose option list is
written as several sections instead of one. Which section an option belongs to is data (`SECTIONS`), keyed by the
parameter's name, so `convert`, `plan`, `verify` and `batch` list a shared option under the same title. The full
reference of every option is docs/options.md.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import click

# Title, then the parameter names it holds, in the order the sections are printed.
SECTIONS: List[Tuple[str, Tuple[str, ...]]] = [
    ("Batch", ("output_template", "from_file", "jobs", "max_memory", "ray_address")),
    ("What is written", ("max_shard_size", "dtype", "include", "exclude", "renames", "subtree", "source_format",
                         "expert_layout")),
    ("Reference model and storage", ("config_from", "no_config", "allow_unmatched", "storage_options")),
    ("Output folder", ("overwrite", "overwrite_any", "resume", "discard_partial")),
    ("Checking", ("verify", "crc")),
    ("Memory and threads", ("buffer_size", "workers")),
    ("Reporting", ("as_json", "quiet", "progress")),
]
OTHER = "Other options"     # what SECTIONS does not name: --help, and an option added without a section
SECTION_OF: Dict[str, str] = {name: title for title, names in SECTIONS for name in names}


class SectionedCommand(click.Command):
    """A click command whose `--help` lists its options under the titles of `SECTIONS`."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows: Dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:          # hidden options have none; arguments are in the usage line
                rows.setdefault(SECTION_OF.get(param.name, OTHER), []).append(record)
        for title in [t for t, _ in SECTIONS] + [OTHER]:
            if title in rows:
                with formatter.section(title):
                    formatter.write_dl(rows[title])
