"""The manual pages the Debian package installs (packaging/man/, made by
`python -m sapd_nfq.docgen` with the other generated pages, whose test checks that
they are current): every command and key is in them, and man reads them without a
complaint."""

from __future__ import annotations

import subprocess
from dataclasses import fields

import pytest

from sapd_nfq import docgen
from sapd_nfq.wiring.config import Config

PAGES = ["packaging/man/sapd-nfq.8", "packaging/man/sapd-nfq.toml.5"]


def test_the_pages_are_generated():
    assert set(PAGES) <= set(docgen.PAGES)


def test_every_command_and_key_is_in_the_pages():
    command, keys = docgen.man_command(), docgen.man_config()
    for row in docgen.command_rows():
        assert f"\n\\fB{docgen.roff(row.synopsis)}\\fR\n" in command, row.synopsis
    for field in fields(Config):
        assert f"\n.TP\n\\fB{docgen.roff(field.name)}\\fR = " in keys, field.name


@pytest.mark.parametrize("name", PAGES)
def test_man_reads_the_page_without_complaint(name):
    done = subprocess.run(["man", "--warnings", "-l", "-Tutf8", str(docgen.ROOT / name)],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80"})
    assert done.returncode == 0 and not done.stderr, done.stderr
