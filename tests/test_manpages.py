"""The shipped manual pages (packaging/man/) are the ones packaging/manpages.py makes now
from the command parser and the config key table: change either, run it, commit the pages."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "packaging" / "manpages.py"


def _generator():
    spec = importlib.util.spec_from_file_location("manpages", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


manpages = _generator()


@pytest.mark.parametrize("name", sorted(manpages.PAGES))
def test_the_shipped_page_is_current(name):
    shipped = (manpages.MAN_DIR / name).read_text()
    assert shipped == manpages.PAGES[name](), f"run python3 {GENERATOR.relative_to(ROOT)}"


def test_every_command_and_key_is_in_the_pages():
    command, keys = manpages.command_page(), manpages.config_page()
    for name in ("check", "auth add", "replay", "up", "down", "run", "reload", "why", "status"):
        assert f"sapd\\-nfq {name.replace('-', chr(92) + '-')} " in command, name
    for field in manpages.config.Config.__dataclass_fields__:
        assert f"\n.TP\n\\fB{field}\\fR = " in keys, field


@pytest.mark.parametrize("name", sorted(manpages.PAGES))
def test_man_reads_the_page_without_complaint(name):
    done = subprocess.run(["man", "--warnings", "-l", "-Tutf8", str(manpages.MAN_DIR / name)],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80"})
    assert done.returncode == 0 and not done.stderr, done.stderr
