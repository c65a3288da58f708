"""The documentation: the pages made from the code are current."""

from __future__ import annotations

import shutil

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
