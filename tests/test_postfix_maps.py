"""Reading Postfix maps with Postfix's own postmap and postconf."""

import os
import shutil
import subprocess

import pytest

from sapd_nfq.engine.errors import MapError
from sapd_nfq.wiring import postfix_maps


@pytest.fixture
def confdir(tmp_path):
    if shutil.which("postmap") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("postmap not found (CI=true: a missing capability is a failure)")
        pytest.skip("postmap not found (apt-get install postfix)")
    conf = tmp_path / "postfix"
    conf.mkdir()
    (conf / "main.cf").write_text("recipient_delimiter = +\n")
    return conf


def test_a_hash_map_is_read_through_postmap(tmp_path, confdir):
    source = tmp_path / "virtual"
    source.write_text("Alice@Lab.example alice\n@catch.example whoever\n")
    subprocess.run(["postmap", "-c", str(confdir), f"hash:{source}"], check=True)
    delimiter = postfix_maps.recipient_delimiter(confdir)
    pmap = postfix_maps.load(f"hash:{source}", confdir, delimiter)
    assert delimiter == "+" and len(pmap) == 2
    assert pmap.is_local("alice+x@lab.example") and pmap.is_local("z@catch.example")
    assert not pmap.is_local("bob@lab.example")
    assert postfix_maps.watched_files(f"hash:{source}") == [tmp_path / "virtual.db", source]


def test_a_texthash_map_is_its_own_file(tmp_path, confdir):
    source = tmp_path / "vmailbox"
    source.write_text("bob@lab.example bob/Maildir/\n")
    assert postfix_maps.load(f"texthash:{source}", confdir, "").is_local("bob@lab.example")
    assert postfix_maps.watched_files(f"texthash:{source}") == [source]


def test_a_map_postmap_cannot_open_is_an_error_naming_it(tmp_path, confdir):
    with pytest.raises(MapError, match=r"postmap .* -s hash:.*/missing failed: .*missing\.db"):
        postfix_maps.load(f"hash:{tmp_path}/missing", confdir, "+")


@pytest.mark.parametrize("spec", ["regexp:/etc/postfix/v", "proxy:hash:/x", "/etc/postfix/v", "hash:"])
def test_maps_that_cannot_be_listed_are_refused(spec):
    with pytest.raises(ValueError):
        postfix_maps.split_spec(spec)
