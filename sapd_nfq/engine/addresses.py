"""One spelling for each address the policy compares: client IPs and mailboxes.

Client IPs key the login store and are matched against network lists, so the
same host must always look the same: an IPv4-mapped IPv6 address (what a
dual-stack socket reports, ::ffff:198.18.0.5) is the IPv4 address, IPv6 is
compressed, and sendmail's `IPv6:` prefix, brackets and zone ids are dropped.

Mailboxes are split into (local part, domain), lower case, the way sendmail
folds virtusertable keys. An address that asks the MTA to route the mail on
(`user%other@dom`, `other!user@dom`, `"user@other"@dom`, `@relay:user@dom`)
is not a mailbox of `dom`: the MTA may forward it, so it must never be judged
local.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

_MAPPED = IPv6Network("::ffff:0:0/96")
_ROUTING = frozenset("@%!")


def parse_ip(value: str | IPAddress) -> IPAddress:
    """The address as an ipaddress object, IPv4-mapped IPv6 unwrapped.

    Raises ValueError for anything that is not an IP address.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        if text[:5].lower() == "ipv6:":
            text = text[5:]
        try:
            addr = ip_address(text.partition("%")[0])
        except ValueError:
            raise ValueError(f"not an IP address: {value!r}") from None
    elif isinstance(value, (IPv4Address, IPv6Address)):
        addr = value
    else:
        raise TypeError(f"expected an IP address, got {type(value).__name__}")
    if isinstance(addr, IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.scope_id is not None:
            return IPv6Address(int(addr))
    return addr


def normalize_ip(value: str | IPAddress) -> str:
    """The one spelling of an IP address: "198.18.0.5", "2001:db8::5"."""
    return str(parse_ip(value))


def parse_network(text: str) -> IPNetwork:
    """A CIDR network ("198.18.0.0/15", "2001:db8::/32"; a bare address is /32 or /128).

    Strict: host bits set is a mistake worth hearing about, and IPv4-mapped
    networks could never match because clients are compared as IPv4.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a CIDR string, got {type(text).__name__}")
    try:
        net = ip_network(text.strip())
    except ValueError:
        try:
            loose = ip_network(text.strip(), strict=False)
        except ValueError:
            raise ValueError(f"not a network: {text!r}") from None
        raise ValueError(f"{text!r} has host bits set (the network is {loose})") from None
    if isinstance(net, IPv6Network) and net.subnet_of(_MAPPED):
        raise ValueError(f"{text!r} is IPv4-mapped: write the IPv4 network")
    return net


def find_network(addr: IPAddress, networks: Iterable[IPNetwork]) -> IPNetwork | None:
    """The first network holding addr (a parse_ip result), or None."""
    for net in networks:
        if addr in net:  # False across IP versions, never an error
            return net
    return None


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def ascii_lower(text: str) -> str:
    """Fold A-Z only, as sendmail and Postfix do: Unicode folding would let
    e.g. the Kelvin sign match a "k" key that the MTA treats as different."""
    return text.translate(_ASCII_LOWER)


def split_mailbox(address: str) -> tuple[str, str] | None:
    """(local part, domain) of an envelope address, lower case.

    Accepts `<user@dom>` or `user@dom` with surrounding whitespace, a quoted
    local part, and a trailing dot on the domain. Returns None for the null
    sender, an address without a domain, an empty local part, and any address
    with sender-specified routing (see the module docstring).
    """
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if text.startswith("@"):  # a source route, or no local part
        return None
    local, at, domain = text.rpartition("@")
    if not at:
        return None
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = _unquote(local[1:-1])
    domain = domain.removesuffix(".")
    if not local or not domain or _ROUTING.intersection(local):
        return None
    if not domain.isprintable() or any(c.isspace() for c in domain):
        return None
    return ascii_lower(local), ascii_lower(domain)


def _unquote(quoted: str) -> str:
    out = []
    chars = iter(quoted)
    for c in chars:
        out.append(next(chars, "") if c == "\\" else c)
    return "".join(out)
