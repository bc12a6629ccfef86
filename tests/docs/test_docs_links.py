"""The README is a front door and the reference lives in docs/ (issue 18.9): the front door stays small, and no
link in it or in a reference page leads nowhere (a moved section, a renamed heading, a page not written yet)."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_BYTES = 24_000       # issue 18.9 asks for ~20 KB; the margin is for a sentence, not a section

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)


def _prose(text: str) -> str:
    """The text a reader sees as prose: links inside code blocks and code spans are examples, not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def anchors(page: Path) -> set:
    """Heading anchors as GitHub makes them: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(page: Path) -> list:
    return [t for t in LINK.findall(_prose(page.read_text(encoding="utf-8")))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]         # http:, https:, mailto: are not checked here


def broken_links(page: Path) -> list:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(REPO) if REPO in dest.parents else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name} (it has: {sorted(anchors(dest))})")
    return broken


def test_readme_is_a_front_door():
    size = len(README.read_bytes())
    assert size < README_MAX_BYTES, f"README.md is {size} bytes; move reference text into docs/*.md and link it"


def test_every_relative_link_in_readme_and_docs_leads_somewhere():
    problems = {p.relative_to(REPO).as_posix(): broken_links(p) for p in PAGES}
    assert not any(problems.values()), {k: v for k, v in problems.items() if v}
    assert len(relative_links(README)) >= 10, "the front door should link the reference pages"


def test_the_checker_sees_a_broken_link_and_a_broken_anchor(tmp_path):
    """The checker itself can fail: a missing file and a missing heading are both reported."""
    (tmp_path / "other.md").write_text("# A title\n\n## Some `code` section: here\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#some-code-section-here) [self](#top) [gone](missing.md) "
                    "[bad](other.md#no-such) `[not a link](nowhere.md)`\n\n# Top\n"
                    "```\n[in a block](nowhere-either.md)\n```\n")
    found = broken_links(page)
    assert len(found) == 2 and found[0].startswith("missing.md") and found[1].startswith("other.md#no-such"), found


def test_every_reference_page_is_in_readme_s_reference_table():
    """A page in docs/ that README's Reference table does not list is a page a newcomer never finds."""
    table = README.read_text(encoding="utf-8").split("## Reference", 1)[1]
    listed = set(re.findall(r"^\| \[docs/([\w.-]+\.md)\]", table, re.M))
    assert listed == {p.name for p in (REPO / "docs").glob("*.md")}, listed ^ {p.name for p in (REPO / "docs").glob("*.md")}


REPO_PATH = re.compile(r"(?<![\w/.-])((?:tests|streamconv|benchmarks)/[\w./-]*[\w/])")


def test_every_repository_path_the_docs_name_exists():
    """`tests/end_to_end/test_safety.py`, `streamconv/failpoints.py`...: a path named in README, docs/*.md, the
    Makefile or pyproject.toml's comments is a place a reader goes to look (benchmarks/.cache is made by a run)."""
    missing = {}
    for page in [*PAGES, REPO / "Makefile", REPO / "pyproject.toml"]:
        gone = sorted({p for p in REPO_PATH.findall(page.read_text(encoding="utf-8"))
                       if not (REPO / p).exists() and p != "benchmarks/.cache"})
        if gone:
            missing[page.name] = gone
    assert not missing, missing


# `source/remote.py`, `source/remote.folder_reader`, `output/crc.PieceCrcs`: a module of the package named by its
# layer (a bare `runs/a` is an example folder, not checked), and the function, class or constant after the dot.
MODULE_REF = re.compile(r"(?<![\w/.-])((?:fs|source|planning|output|execution|hf|verification|runs)(?:/\w+)+)"
                        r"(?:(\.py)|\.([A-Za-z_]\w*))")


def test_every_module_and_name_the_docs_point_into_exists():
    """A doc that says where code lives (`fs/objects.BufferReader`) goes stale silently when the code moves."""
    missing = []
    for page in PAGES:
        for path, py, name in MODULE_REF.findall(page.read_text(encoding="utf-8")):
            module = REPO / "streamconv" / f"{path}.py"
            if not module.exists() and not (py and (REPO / "streamconv" / path).is_dir()):
                missing.append(f"{page.name}: {path}{py or '.' + name}: no streamconv/{path}.py")
            elif name and not re.search(rf"^\s*(?:def|class) {name}\b|^{name}\b\s*[:=]", module.read_text(), re.M):
                missing.append(f"{page.name}: {path}.{name}: streamconv/{path}.py defines no {name}")
    assert not missing, missing


def test_code_layout_names_every_module():
    """docs/code-layout.md says which module does what: each module of a layer folder is named in its row (as
    `name`, or `sub/name` below the folder), each top-level module in the entry or ground row."""
    rows = {}
    for line in (REPO / "docs" / "code-layout.md").read_text(encoding="utf-8").splitlines():
        cells = line.split("|")
        if len(cells) > 3 and not line.startswith(("| layer", "|---")):
            rows[cells[1].strip()] = cells[1] + cells[2]
    package = REPO / "streamconv"
    unnamed = []
    for layer, text in rows.items():
        named = set(re.findall(r"`([\w/]+?)(?:\.py)?`", text)) | set(re.findall(r"`(\w+/)`", text))
        folder = re.match(r"`(\w+)/`", layer)
        modules = ([str(p.relative_to(package / folder.group(1)).with_suffix("")) for p in
                    (package / folder.group(1)).rglob("*.py") if p.name != "__init__.py"] if folder else [])
        unnamed += [f"{layer.split(':')[0]}: {m}" for m in modules        # `trainers/` names the whole sub-folder
                    if not {m, m.split("/")[-1], m.split("/")[0] + "/"} & named]
    top = {p.stem for p in package.glob("*.py")} - {"__init__", "__main__"}
    named_top = {m for text in rows.values() for m in re.findall(r"`(\w+)\.py`", text)}
    unnamed += sorted(f"top level: {m}.py" for m in top - named_top)
    assert not unnamed, unnamed
