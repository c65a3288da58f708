"""The documentation: the pages made from the code are current, every relative
link leads somewhere, and the README's tree is the package's."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from sapd_nfq import docgen
from sapd_nfq.docgen import PAGES


def test_the_generated_pages_are_current():
    assert docgen.stale() == [], "run python -m sapd_nfq.docgen"


@pytest.mark.parametrize("name", PAGES)
def test_a_hand_edit_of_a_generated_page_is_stale(tmp_path, name):
    for page in PAGES:
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(docgen.ROOT / page, tmp_path / page)
    text = (tmp_path / name).read_text()
    # a row added to a generated table, or a line to the generated file
    edited = (text.replace("<!-- end of", "| a | row |\n<!-- end of", 1) if "<!-- end of" in text
              else text + "# a line\n")
    (tmp_path / name).write_text(edited)
    assert docgen.stale(tmp_path) == [name]
    assert docgen.write(tmp_path) == [name]
    assert (tmp_path / name).read_text() == text


# --- links --------------------------------------------------------------------------

#: pages the index links to that are still being written; a link to one of these
#: may point nowhere until the page exists, and no longer once it does
PENDING: set[str] = set()
PAGES_LINKING = [docgen.ROOT / "README.md", *sorted((docgen.ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    return {re.sub(r"[^a-z0-9 _-]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in page.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def links(page: Path) -> list[tuple[str, Path, str]]:
    """(link, target, anchor) of every relative link on a page."""
    found = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        found.append((target, (page.parent / path).resolve() if path else page, anchor))
    return found


@pytest.mark.parametrize("page", PAGES_LINKING, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for link, target, anchor in links(page):
        if not target.exists():
            if str(target.relative_to(docgen.ROOT)) not in PENDING:
                broken.append(link)
        elif anchor and anchor not in anchors(target):
            broken.append(link)
    assert not broken, f"{page.name}: {broken}"


def test_the_index_links_every_page():
    index = docgen.ROOT / "docs" / "index.md"
    linked = {target for _, target, _ in links(index)}
    unlisted = sorted(page.name for page in index.parent.glob("*.md") if page not in linked | {index})
    assert not unlisted, f"docs/index.md does not link {unlisted}"


def test_pending_pages_are_still_missing():
    """A page that has been written leaves PENDING, so its links are checked."""
    written = sorted(name for name in PENDING if (docgen.ROOT / name).exists())
    assert not written, f"remove {written} from PENDING in {__file__}"


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[gone](gone.md) [here](#title) [there](#nowhere) [web](https://example.org)\n")
    found = [(link, target.exists(), anchor in anchors(target) if anchor else None)
             for link, target, anchor in links(page)]
    assert found == [("gone.md", False, None), ("#title", True, True), ("#nowhere", True, False)]


# --- the README's tree -------------------------------------------------------------


def readme_tree() -> set[str]:
    """The paths the README's tree names, relative to the repository."""
    text = (docgen.ROOT / "README.md").read_text()
    block = text[text.index("```\nsapd_nfq/\n") + 4:]
    block = block[:block.index("```")]
    stack: list[str] = []
    named = set()
    for line in block.splitlines():
        start = len(line) - len(line.lstrip("│├└─ "))
        depth = start // 4
        for name in re.split(r" {2,}", line[start:])[0].split(", "):
            path = "/".join([*stack[:depth], name.rstrip("/")])
            named.add(path)
            if name.endswith("/"):
                stack[depth:] = [name.rstrip("/")]
    return named


def test_the_readmes_tree_is_the_package():
    named = readme_tree()
    package = docgen.ROOT / "sapd_nfq"
    modules = {str(p.relative_to(docgen.ROOT)) for p in package.rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py")}
    groups = {str(p.relative_to(docgen.ROOT)) for p in package.iterdir() if (p / "__init__.py").exists()}
    assert not modules - named, "modules the README's tree leaves out"
    assert not groups - named, "groups the README's tree leaves out"
    assert all((docgen.ROOT / path).exists() for path in named), \
        sorted(path for path in named if not (docgen.ROOT / path).exists())
