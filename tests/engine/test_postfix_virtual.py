"""Postfix's virtual(5) lookup order, on keys held in memory."""

import pytest

from sapd_nfq.engine.policy import AnyOf
from sapd_nfq.engine.postfix_virtual import PostfixMap
from sapd_nfq.engine.virtusertable import VirtUserTable

DUMP = "alice@lab.example\talice/Maildir/\nBob@Lab.Example bob/Maildir/\n@catch.example\tx\n\n"


@pytest.fixture
def pmap():
    return PostfixMap.from_dump(DUMP, "texthash:vmailbox", delimiter="+-")


@pytest.mark.parametrize("address, local", [
    ("alice@lab.example", True),
    ("<ALICE@LAB.EXAMPLE>", True),            # keys and lookups folded to lower case
    ("bob@lab.example", True),
    ("alice+news@lab.example", True),         # the extension is stripped
    ("alice-news@lab.example", True),         # any delimiter character
    ("alice+a-b@lab.example", True),          # cut at the first of them
    ("+alice@lab.example", False),            # no user before the delimiter
    ("carol@lab.example", False),
    ("anyone@catch.example", True),           # @domain catches the domain
    ("alice@other.example", False),
    ("alice", False),                         # the bare user form is not consulted
    ("", False),                              # the null sender
    ("@lab.example:alice@lab.example", False),  # a source route is never local
])
def test_lookup_order(pmap, address, local):
    assert pmap.is_local(address) is local


def test_without_a_delimiter_an_extension_is_part_of_the_user():
    pmap = PostfixMap.from_dump(DUMP, "m", delimiter="")
    assert not pmap.is_local("alice+news@lab.example")
    assert pmap.keys_for("alice+news@lab.example") == ["alice+news@lab.example", "@lab.example"]


def test_any_of_several_maps(pmap):
    vut = VirtUserTable.parse("dave@lab.example dave\n", "vut")
    both = AnyOf([vut, pmap])
    assert both.is_local("dave@lab.example") and both.is_local("alice@lab.example")
    assert not both.is_local("erin@lab.example")
    assert len(both) == 1 + 3


def test_local_keys_of_a_map_and_of_several(pmap):
    assert pmap.local_keys() == {"alice@lab.example", "bob@lab.example", "@catch.example"}
    vut = VirtUserTable.parse("dave@lab.example dave\nerin@lab.example error:nouser\n", "vut")
    assert AnyOf([vut, pmap]).local_keys() == pmap.local_keys() | {"dave@lab.example"}
