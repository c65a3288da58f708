import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sapd_nfq.engine import policy
from sapd_nfq.engine.logins import Login, MemoryLoginStore, StoreError
from sapd_nfq.engine.policy import (
    ROW_LOGGED_IN,
    ROW_NOT_LOCAL,
    ROW_NOT_LOGGED_IN,
    ROW_RECIPIENT_LOCAL,
    ROW_TRUSTED,
    Fail,
    Pass,
    RelayPolicy,
)
from sapd_nfq.engine.virtusertable import VirtUserTable

NOW = 1_700_000_000.0
TABLE = VirtUserTable.parse("""\
alice@example.org   alice
bob@example.org     bob
gone@example.org    error:nouser User unknown
@example.net        catchall
""")
LOCAL, OTHER_LOCAL, FOREIGN, FOREIGN2 = (
    "alice@example.org", "bob@example.org", "carol@remote.test", "dave@elsewhere.test")


class SpyStore(MemoryLoginStore):
    """Records every question the policy asks."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def get(self, address: str, now: float) -> Login | None:
        self.asked.append(address)
        return super().get(address, now)


class BrokenStore(SpyStore):
    def get(self, address: str, now: float) -> Login | None:
        raise StoreError("l.sqlite: cannot read logins: database is locked")


@pytest.fixture
def store():
    return SpyStore()


def decide(store, client="198.18.0.5", sender=LOCAL, recipient=FOREIGN, authenticated=False,
           **networks):
    return RelayPolicy(TABLE, store, **networks).decide(
        client, sender, recipient, NOW, authenticated=authenticated)


# --- the four rows of the table ---------------------------------------------------------

@pytest.mark.parametrize("sender", [LOCAL, FOREIGN, "", "x@example.net"])
def test_row1_recipient_local_passes_whoever_sends(store, sender):
    for recipient in (OTHER_LOCAL, "anyone@example.net", "<BOB@Example.ORG>"):
        verdict = decide(store, sender=sender, recipient=recipient)
        assert isinstance(verdict, Pass) and verdict.row == ROW_RECIPIENT_LOCAL
    assert store.asked == []


def test_row2_sender_local_recipient_foreign_logged_in_passes(store):
    store.add("198.18.0.5", "alice", NOW - 60, 1800)
    verdict = decide(store)
    assert verdict == Pass(ROW_LOGGED_IN, "alice at 198.18.0.5 via pop3, 1740 s left", "alice")
    assert str(verdict) == ("PASS  row 2: sender local, recipient not local, client logged in "
                            "(alice at 198.18.0.5 via pop3, 1740 s left)")
    assert store.asked == ["198.18.0.5"]


def test_row3_sender_local_recipient_foreign_not_logged_in_fails(store):
    store.add("198.18.0.6", "alice", NOW, 1800)        # another client
    store.add("198.18.0.5", "alice", NOW - 1800, 1800)  # window just closed
    verdict = decide(store)
    assert verdict == Fail(ROW_NOT_LOGGED_IN, "no login from 198.18.0.5 in the window")
    assert str(verdict).startswith("FAIL  row 3: ")


@pytest.mark.parametrize("sender", [FOREIGN, "", "<>", "alice", "gone@example.org",
                                    "alice%remote.test@example.org"])
def test_row4_nothing_local_fails_even_when_logged_in(store, sender):
    store.add("198.18.0.5", "alice", NOW, 1800)
    for authenticated in (False, True):
        verdict = decide(store, sender=sender, recipient=FOREIGN2, authenticated=authenticated)
        assert isinstance(verdict, Fail) and verdict.row == ROW_NOT_LOCAL
    assert store.asked == []


@pytest.mark.parametrize("recipient", [
    "gone@example.org",                  # error: entry
    "carol%remote.test@example.org",     # percent hack through a local domain
    "remote.test!carol@example.net",     # bang path through the catch-all
    "@example.org:carol@remote.test",    # source route
    "postmaster",                        # no domain
])
def test_recipients_that_are_not_local(store, recipient):
    verdict = decide(store, recipient=recipient)
    assert verdict.row == ROW_NOT_LOGGED_IN


# --- trusted and never-relay networks -----------------------------------------------------

def test_trusted_network_always_relays(store):
    verdict = decide(store, client="198.19.1.2", sender=FOREIGN, recipient=FOREIGN2,
                     trusted_networks=["198.19.0.0/16"])
    assert verdict == Pass(ROW_TRUSTED, "198.19.1.2 is in 198.19.0.0/16")
    assert store.asked == []


def test_trusted_ipv4_matches_a_mapped_client(store):
    verdict = decide(store, client="::ffff:198.19.1.2", sender=FOREIGN,
                     trusted_networks=["198.19.0.0/16"])
    assert verdict.row == ROW_TRUSTED


def test_never_relay_login_does_not_count(store):
    store.add("198.18.7.7", "fetcher", NOW, 1800)
    verdict = decide(store, client="198.18.7.7", never_relay_networks=["198.18.7.0/24"])
    assert verdict == Fail(ROW_NOT_LOGGED_IN,
                           "client 198.18.7.7 is in never-relay network 198.18.7.0/24: "
                           "its logins do not count")
    assert store.asked == []


def test_never_relay_carves_out_of_trusted(store):
    nets = {"trusted_networks": ["198.18.0.0/15"], "never_relay_networks": ["198.18.7.0/24"]}
    assert decide(store, client="198.18.7.7", sender=FOREIGN, **nets).row == ROW_NOT_LOCAL
    assert decide(store, client="198.18.8.8", sender=FOREIGN, **nets).row == ROW_TRUSTED


def test_never_relay_still_gets_local_mail_and_smtp_auth(store):
    nets = {"never_relay_networks": ["198.18.7.0/24"]}
    assert decide(store, client="198.18.7.7", recipient=OTHER_LOCAL, **nets).row == \
        ROW_RECIPIENT_LOCAL
    assert decide(store, client="198.18.7.7", authenticated=True, **nets).row == ROW_LOGGED_IN


# --- SMTP AUTH --------------------------------------------------------------------------

def test_authenticated_counts_as_logged_in_without_asking_the_store(store):
    verdict = decide(store, authenticated=True)
    assert verdict == Pass(ROW_LOGGED_IN, "SMTP AUTH accepted on this connection from 198.18.0.5")
    assert store.asked == []


# --- IPv6 -------------------------------------------------------------------------------

def test_ipv6_client_logged_in(store):
    store.add("2001:db8:0:0::5", None, NOW, 1800, source="manual")
    verdict = decide(store, client="2001:DB8::5")
    assert verdict == Pass(ROW_LOGGED_IN, "someone at 2001:db8::5 via manual, 1800 s left")
    assert store.asked == ["2001:db8::5"]


def test_ipv6_networks(store):
    nets = {"trusted_networks": ["2001:db8:1::/48"], "never_relay_networks": ["2001:db8:2::/48"]}
    assert decide(store, client="2001:db8:1::9", sender=FOREIGN, **nets).row == ROW_TRUSTED
    store.add("2001:db8:2::9", None, NOW, 1800)
    assert decide(store, client="2001:db8:2::9", **nets).row == ROW_NOT_LOGGED_IN
    # an IPv4 network never matches an IPv6 client, and the other way round
    assert decide(store, client="2001:db8:1::9", sender=FOREIGN,
                  trusted_networks=["0.0.0.0/0"]).row == ROW_NOT_LOCAL


# --- failure is never a pass ---------------------------------------------------------------

def test_a_failing_store_gives_fail():
    verdict = decide(BrokenStore())
    assert isinstance(verdict, Fail) and verdict.row == ROW_NOT_LOGGED_IN
    assert "database is locked" in verdict.reason


def test_bad_client_address_raises(store):
    with pytest.raises(ValueError, match="not an IP address"):
        decide(store, client="example.org")


def test_bad_network_raises(store):
    with pytest.raises(ValueError, match="host bits"):
        RelayPolicy(TABLE, store, trusted_networks=["198.18.0.1/15"])


def test_reasons_show_peer_text_safely(store):
    verdict = decide(store, sender="x\x1b[31m@remote.test", recipient="y\r@remote.test")
    assert verdict.reason == r"neither <x\x1b[31m@remote.test> nor <y\x0d@remote.test> is local"
    long = decide(store, sender="a" * 1000 + "@remote.test")
    assert len(long.reason) < 400


def test_table_can_be_swapped_for_a_reloaded_one(store):
    p = RelayPolicy(TABLE, store)
    assert p.decide("198.18.0.5", FOREIGN, "new@example.com", NOW).row == ROW_NOT_LOCAL
    p.table = VirtUserTable.parse("@example.com x\n")
    assert p.decide("198.18.0.5", FOREIGN, "new@example.com", NOW).row == ROW_RECIPIENT_LOCAL


def test_verdicts_are_values():
    assert Pass("r", "x") == Pass("r", "x") != Fail("r", "x")
    with pytest.raises(AttributeError):
        Pass("r", "x").row = "other"  # type: ignore[misc]
    rows = [getattr(policy, n) for n in dir(policy) if n.startswith("ROW_")]
    assert len(set(rows)) == len(rows) == 5


# --- may_relay: the question without an envelope ------------------------------------------

def test_may_relay(store):
    nets = {"trusted_networks": ["198.18.0.0/15"], "never_relay_networks": ["198.18.7.0/24"]}
    p = RelayPolicy(TABLE, store, **nets)
    assert p.may_relay("198.19.0.1", NOW) and store.asked == []
    store.add("198.18.7.7", "fetcher", NOW, 1800)
    assert not p.may_relay("198.18.7.7", NOW) and store.asked == []
    store.add("2001:db8::5", "alice", NOW, 1800)
    assert p.may_relay("2001:db8::5", NOW)
    assert not p.may_relay("2001:db8::6", NOW)
    assert not p.may_relay("2001:db8::5", NOW + 1800)
    assert not RelayPolicy(TABLE, BrokenStore()).may_relay("198.18.0.5", NOW)


# --- fuzz: whatever the envelope, a stranger only ever reaches local recipients ---------

ENVELOPE = st.text(alphabet=st.sampled_from('aAlice+*@%!"<> .:\r\x00example.orgnt'), max_size=30)


@settings(max_examples=300, deadline=None)
@given(sender=ENVELOPE, recipient=ENVELOPE)
def test_no_relay_for_a_client_that_is_not_logged_in(sender, recipient):
    store = SpyStore()
    verdict = RelayPolicy(TABLE, store).decide("198.18.0.5", sender, recipient, NOW)
    if isinstance(verdict, Pass):
        assert verdict.row == ROW_RECIPIENT_LOCAL and TABLE.is_local(recipient)
