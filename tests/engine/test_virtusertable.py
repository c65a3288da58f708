import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sapd_nfq.engine.errors import MapError
from sapd_nfq.engine.virtusertable import VirtUserTable

# One key per lookup step, each naming itself, so a lookup shows which step hit.
EVERY_STEP = """\
user+detail@dom\tfull
user++@dom\tplusplus
user+*@dom\tplusstar
user@dom\tuser
++@dom\tanyplusplus
+*@dom\tanyplusstar
@dom\tcatchall
"""
ORDER = ["user+detail@dom", "user++@dom", "user+*@dom", "user@dom",
         "++@dom", "+*@dom", "@dom"]


def without(*keys: str) -> VirtUserTable:
    lines = [line for line in EVERY_STEP.splitlines() if line.split()[0] not in keys]
    return VirtUserTable.parse("\n".join(lines))


# --- lookup order ---------------------------------------------------------------

@pytest.mark.parametrize("step", range(len(ORDER)))
def test_detail_lookup_order(step):
    table = without(*ORDER[:step])
    expected = EVERY_STEP.splitlines()[step].split("\t")[1]
    assert table.lookup("user+detail@dom") == expected


def test_empty_detail_skips_the_plusplus_keys():
    table = without("user+*@dom")
    assert table.lookup("user+@dom") == "user"   # not user++@dom
    table = without("user+*@dom", "user@dom")
    assert table.lookup("user+@dom") == "anyplusstar"  # not ++@dom


def test_empty_detail_matches_its_own_key_first():
    table = VirtUserTable.parse("user+@dom exact\nuser+*@dom star\n")
    assert table.lookup("user+@dom") == "exact"


def test_without_detail_only_user_then_domain():
    table = without("user@dom")
    assert table.lookup("user@dom") == "catchall"  # no +* or ++ keys for a plain user
    table = VirtUserTable.parse("user+*@dom star\n++@dom pp\n+*@dom ps\n")
    assert table.lookup("user@dom") is None


def test_detail_splits_at_first_plus():
    table = VirtUserTable.parse("a+*@dom star\n")
    assert table.lookup("a+b+c@dom") == "star"
    assert VirtUserTable.parse("a+b++@dom x\n").lookup("a+b+c@dom") is None


def test_empty_user_goes_straight_to_domain():
    table = VirtUserTable.parse("++@dom pp\n+*@dom ps\n@dom all\n")
    assert table.lookup("+x@dom") == "all"


def test_catch_all_does_not_cover_subdomains_or_other_domains():
    table = VirtUserTable.parse("@dom all\n")
    assert table.is_local("anyone@dom")
    assert not table.is_local("anyone@sub.dom")
    assert not table.is_local("anyone@dom.evil")


# --- normalisation of the queried address ---------------------------------------

@pytest.mark.parametrize("address", [
    "alice@example.org", "ALICE@Example.ORG", "<alice@example.org>", "  <alice@example.org> ",
    "alice@example.org.", '"alice"@example.org',
])
def test_spellings_of_one_address(address):
    assert VirtUserTable.parse("alice@example.org a\n").is_local(address)


@pytest.mark.parametrize("address", [
    "", "<>", "alice", "<alice>", "@example.org", "alice@", "<@example.org>",
])
def test_not_an_address_is_never_local(address):
    table = VirtUserTable.parse("@example.org all\nalice@example.org a\n")
    assert table.lookup(address) is None
    assert not table.is_local(address)


@pytest.mark.parametrize("address", [
    "bob%evil.com@example.org",       # percent hack
    "evil.com!bob@example.org",       # bang path
    '"bob@evil.com"@example.org',     # quoted @
    "@example.org:bob@evil.com",      # source route
    "<@example.org:bob@evil.com>",
])
def test_sender_specified_routing_is_never_local(address):
    # the MTA could forward these: judging them local would open a relay
    assert not VirtUserTable.parse("@example.org all\n").is_local(address)


# --- file format ------------------------------------------------------------------

def test_comments_blank_lines_and_values_with_spaces():
    table = VirtUserTable.parse(
        "# a comment\n\n   \n\t\nalice@example.org   alice, bob  \n#x@example.org x\n")
    assert len(table) == 1
    assert table.lookup("alice@example.org") == "alice, bob"
    assert table.lookup("x@example.org") is None


def test_keys_are_case_folded():
    table = VirtUserTable.parse("Alice@Example.ORG Alice\n@EXAMPLE.NET All\n")
    assert table.lookup("alice@example.org") == "Alice"  # values keep their case
    assert table.is_local("x@example.net")


def test_first_duplicate_wins_and_is_reported():
    table = VirtUserTable.parse("a@dom first\nA@DOM second\n", source="vt")
    assert table.lookup("a@dom") == "first"
    assert table.warnings == ("vt:2: duplicate key 'a@dom': line 1 wins",)


@pytest.mark.parametrize("value", [
    "error:nouser User unknown", "error:5.1.1:550 no", "ERROR:nouser", "error :nouser",
])
def test_error_values_are_not_local(value):
    table = VirtUserTable.parse(f"bad@dom {value}\n@dom catchall\n")
    assert table.lookup("bad@dom") == value  # found, and it stops the lookup
    assert not table.is_local("bad@dom")
    assert table.is_local("good@dom")


def test_a_user_named_error_is_local():
    assert VirtUserTable.parse("x@dom error\n").is_local("x@dom")


def test_local_keys_leave_out_error_entries():
    table = VirtUserTable.parse("A@dom a\nb@dom error:nouser\n@dom error:nouser\n+*@dom c\n")
    assert table.local_keys() == {"a@dom", "+*@dom"}


def test_crlf_lines():
    table = VirtUserTable.parse("# c\r\nalice@dom alice\r\n\r\n@dom2 all\r\n")
    assert table.lookup("alice@dom") == "alice"
    assert table.is_local("x@dom2")


@pytest.mark.parametrize(("text", "line", "what"), [
    ("ok@dom x\nalice@dom\n", 2, "has no value"),
    ("ok@dom x\nalice@dom   \r\n", 2, "has no value"),
    ("alice x\n", 1, "not an address or @domain"),
    ("a@b@dom x\n", 1, "not an address or @domain"),
    ("alice@ x\n", 1, "not an address or @domain"),
    ("\n\n ok@dom x\n", 3, "leading whitespace"),
    ("\ufeffok@dom x\n", 1, "not an address or @domain"),
    ("ok\x00@dom x\n", 1, "not an address or @domain"),
])
def test_broken_lines_name_file_and_line(text, line, what):
    with pytest.raises(MapError) as e:
        VirtUserTable.parse(text, source="/etc/mail/virtusertable")
    assert str(e.value).startswith(f"/etc/mail/virtusertable:{line}: ")
    assert what in str(e.value)


# --- files -------------------------------------------------------------------------

def test_load(tmp_path):
    path = tmp_path / "virtusertable"
    path.write_bytes(b"alice@example.org alice\r\n@example.net all\r\n")
    table = VirtUserTable.load(path)
    assert table.source == str(path)
    assert table.mtime == os.stat(path).st_mtime
    assert len(table) == 2 and table.is_local("alice@example.org")
    assert VirtUserTable.parse("").mtime is None


def test_load_utf8(tmp_path):
    path = tmp_path / "vt"
    path.write_bytes("jürgen@exämple.org j\n".encode())
    table = VirtUserTable.load(path)
    assert table.is_local("JüRGEN@EXäMPLE.ORG")
    assert not table.is_local("JÜRGEN@EXÄMPLE.ORG")  # like makemap: A-Z folded, nothing else


def test_load_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "vt"
    path.write_bytes(b"a@dom a\nb@dom b\nc@d\xe9m c\n")
    with pytest.raises(MapError, match=rf"^{path}:3: not UTF-8"):
        VirtUserTable.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(MapError, match="cannot read"):
        VirtUserTable.load(tmp_path / "nope")


def test_broken_reload_raises_so_the_caller_keeps_its_table(tmp_path):
    path = tmp_path / "vt"
    path.write_text("alice@dom alice\n")
    table = VirtUserTable.load(path)
    path.write_text("alice@dom alice\nbob@dom\n")
    with pytest.raises(MapError, match=":2: "):
        table = VirtUserTable.load(path)
    assert table.is_local("alice@dom")


# --- fuzz: parse or MapError; lookups never raise ------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.text())
def test_parse_raises_only_map_error(text):
    try:
        VirtUserTable.parse(text)
    except MapError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from('ab+*@%!"<> .\t\\:\x00é'), max_size=30))
def test_lookup_never_raises(address):
    table = VirtUserTable.parse(EVERY_STEP + "a@b x\n@b y\n")
    table.is_local(address)
    if "@" not in address:
        assert table.lookup(address) is None


def test_keys_and_addresses_fold_ascii_only():
    # U+212A KELVIN SIGN lowercases to "k" under Unicode rules; the MTA keeps it apart.
    table = VirtUserTable.parse("kim@lab.example kim\n")
    assert table.is_local("KIM@LAB.EXAMPLE")
    assert not table.is_local("\u212aim@lab.example")
