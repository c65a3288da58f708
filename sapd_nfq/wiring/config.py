"""The configuration file: TOML, top-level keys only, checked strictly.

An unknown key or a value of the wrong kind is an error that names the file,
the key and what was expected; nothing is guessed. Relative paths resolve
against the directory of the config file.

Each key is defined once, as a field of `Config`: its type, its default, the
check that reads it from TOML, and the words that document it. The key table
in docs/configuration.md and the commented packaging/sapd-nfq.toml are made
from these fields (`python -m sapd_nfq.docgen`), and a test keeps them current.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import shutil
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

from ..engine.addresses import IPNetwork, parse_network
from ..engine.errors import ConfigError
from ..engine.loglines import JOURNAL
from ..kernel.interfaces import check_name
from ..logins import store_kind
from .postfix_maps import split_spec

DEFAULT_CONFIG_PATH = "/etc/sapd-nfq/sapd-nfq.toml"


class _Bad(Exception):
    """A value that does not fit: `expected` says what would, `why` (if given)
    says what is wrong with `got` better than its repr would."""

    def __init__(self, expected: str, got: object, why: str | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.got = got
        self.why = why


Check = Callable[[Any, Path], Any]


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(low: int, high: int | None = None) -> Check:
    expected = f"an integer {low}..{high}" if high is not None else f"an integer >= {low}"

    def check(value: Any, base: Path) -> int:
        if not _is_int(value) or value < low or (high is not None and value > high):
            raise _Bad(expected, value)
        return value
    return check


def _choice(*options: str) -> Check:
    expected = " or ".join(f'"{o}"' for o in options)

    def check(value: Any, base: Path) -> str:
        if not isinstance(value, str) or value not in options:
            raise _Bad(expected, value)
        return value
    return check


def _bool(value: Any, base: Path) -> bool:
    if not isinstance(value, bool):
        raise _Bad("true or false", value)
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Bad(f"a list of {what}", value)
    return value


def _unique(items: list[Any], what: str) -> tuple[Any, ...]:
    seen = set()
    for item in items:
        if item in seen:
            raise _Bad(f"a list of {what} without repeats", item)
        seen.add(item)
    return tuple(items)


def _ports(at_least: int) -> Check:
    what = "ports 1..65535"

    def check(value: Any, base: Path) -> tuple[int, ...]:
        items = _list(value, what)
        if len(items) < at_least:
            raise _Bad(f"a list of at least {at_least} of {what}", value)
        for port in items:
            if not _is_int(port) or not 1 <= port <= 65535:
                raise _Bad(f"a list of {what}", port)
        return _unique(items, what)
    return check


def _networks(value: Any, base: Path) -> tuple[IPNetwork, ...]:
    what = 'CIDR networks ("198.18.0.0/15", "2001:db8::/32")'
    nets = []
    for item in _list(value, what):
        try:
            nets.append(parse_network(item))
        except (TypeError, ValueError) as e:
            raise _Bad(f"a list of {what}", item, why=str(e)) from None
    return _unique(nets, what)


def _interfaces(value: Any, base: Path) -> tuple[str, ...]:
    what = "interface names"
    items = _list(value, f"a list of {what}")
    for name in items:
        try:
            check_name(name)
        except ConfigError as e:
            raise _Bad(f"a list of {what}", name, why=str(e).removeprefix("interfaces: ")) from None
    return _unique(items, what)


def _path(value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value or "\0" in value:
        raise _Bad("a file path", value)
    return base / value


def _login_sources(value: Any, base: Path) -> tuple[Path | str, ...]:
    what = "log file paths or \"journal\""
    sources: list[Path | str] = []
    for item in _list(value, what):
        if not isinstance(item, str) or not item or "\0" in item:
            raise _Bad(f"a list of {what}", item)
        if item == JOURNAL or item.startswith(JOURNAL + ":"):
            if shutil.which("journalctl") is None:
                raise _Bad(f"{what}, with journalctl installed", item,
                           "the journal is read with journalctl, which is not installed")
            directory = item.partition(":")[2]
            sources.append(f"{JOURNAL}:{base / directory}" if directory else JOURNAL)
        else:
            sources.append(base / item)
    return _unique(sources, what)


def _group(value: Any, base: Path) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", value):
        raise _Bad("a group name", value)
    return value


def _optional_path(value: Any, base: Path) -> Path | None:
    return None if value == "" else _path(value, base)


def _postfix_maps(value: Any, base: Path) -> tuple[str, ...]:
    what = 'a list of Postfix maps ("hash:/etc/postfix/virtual")'
    specs = []
    for item in _list(value, what):
        try:
            kind, name = split_spec(item) if isinstance(item, str) else ("", "")
        except ValueError as e:
            raise _Bad(what, item, why=f"{e}: {item!r}") from None
        if not name:
            raise _Bad(what, item)
        specs.append(f"{kind}:{base / name}")
    return _unique(specs, "Postfix maps")


def parse_listen(text: str) -> tuple[str, int]:
    """("127.0.0.1", 9925) of "127.0.0.1:9925", ("::1", 9925) of "[::1]:9925"."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("expected ADDRESS:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("expected ADDRESS:PORT, an IPv6 address in brackets ([::1]:9925)")
    ipaddress.ip_address(host)  # an address, never a name to resolve
    return host, int(port)


def _listen(value: Any, base: Path) -> str:
    what = 'ADDRESS:PORT ("127.0.0.1:9925", "[::1]:9925") or "" for none'
    if value == "":
        return ""
    try:
        parse_listen(value if isinstance(value, str) else "")
    except ValueError as e:
        raise _Bad(what, value, why=f"{e}: {value!r}") from None
    return str(value)


def _state(value: Any, base: Path) -> str:
    if not isinstance(value, str):
        raise _Bad('"memory" or a file path', value)
    try:
        kind = store_kind(value)
    except ValueError as e:
        raise _Bad('"memory" or a file path', value, why=f"{e}: {value!r}") from None
    return str(base / value) if kind == "sqlite" else value

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class KeyDoc:
    """How a key is checked and documented: `values` says what it takes, `doc`
    what it means (one sentence or a few; the generated pages wrap it)."""

    check: Check
    values: str
    doc: str


def _key(default: T, check: Check, values: str, doc: str) -> T:
    """A Config field: its default, and the key's check and documentation."""
    return field(default=default, metadata={"key": KeyDoc(check, values, doc)})


@dataclass(frozen=True, slots=True)
class Config:
    """A checked configuration. Field names are the config keys."""

    mode: str = _key(
        "input", _choice("input", "forward"), '`"input"` or `"forward"`',
        '`"input"`: the MTA and the POP3/IMAP server run on this host (INPUT chain); '
        '`"forward"`: this host is the gateway in front of them (FORWARD chain; needs `interfaces`)')
    smtp_ports: tuple[int, ...] = _key(
        (25,), _ports(at_least=1), "list of ports 1..65535, at least one",
        "server ports whose flows are SMTP")
    pop3_ports: tuple[int, ...] = _key(
        (110,), _ports(at_least=0), "list of ports 1..65535",
        "server ports whose flows are POP3; none may be in `smtp_ports`")
    imap_ports: tuple[int, ...] = _key(
        (143,), _ports(at_least=0), "list of ports 1..65535",
        "server ports whose flows are IMAP; none may be in `smtp_ports` or `pop3_ports`")
    virtusertable: Path | None = _key(
        Path("/etc/mail/virtusertable"), _optional_path, 'path, or `""` for none',
        "sendmail virtusertable, text form, that says which addresses are local (sapd-nfq reads "
        'the text file, not the `.db`, and notices changes by itself); `""` on a Postfix site '
        "that names its maps in `postfix_maps` instead")
    postfix_maps: tuple[str, ...] = _key(
        (), _postfix_maps, "list of `type:name` (hash, btree, lmdb, cdb, texthash)",
        "Postfix maps whose keys are local recipients too (`virtual_mailbox_maps`, "
        "`virtual_alias_maps`), listed with `postmap -s`, looked up in virtual(5)'s order, "
        "re-read when postmap rebuilds them")
    postfix_config_directory: Path = _key(
        Path("/etc/postfix"), _path, "path",
        "the Postfix configuration `postmap -c` and `postconf -c` read (its `recipient_delimiter`)")
    auth_ttl: int = _key(
        1800, _int(1), "seconds, integer > 0",
        "how long a login (any source) lets its address relay")
    state: str = _key(
        "/var/lib/sapd-nfq/logins.sqlite", _state,
        'path, `"memory"`, or a `redis://`, `rediss://`, `unix://` URL',
        "the login store: an SQLite file survives restarts and is shared with `sapd-nfq auth`; "
        "Redis shares one table between gateways. A URL with a password makes the config file "
        "a secret: keep it mode 0600 (sapd-nfq warns otherwise)")
    trusted_networks: tuple[IPNetwork, ...] = _key(
        (), _networks, "list of CIDRs", "clients that always relay")
    never_relay_networks: tuple[IPNetwork, ...] = _key(
        (), _networks, "list of CIDRs",
        "shared addresses (NAT, cloud mail fetchers): never trusted, their logins never count; "
        "SMTP AUTH on the connection still does")
    ipv4_login_prefix: int = _key(
        32, _int(16, 32), "integer 16..32",
        "the IPv4 network one login opens: 32 is the address alone (a wider one opens the "
        "neighbours behind the same provider or NAT; see docs/first-day.md)")
    ipv6_login_prefix: int = _key(
        64, _int(48, 128), "integer 48..128",
        "the IPv6 network one login opens: 64 is a client's link, where its privacy addresses "
        "change (RFC 8981); 128 is the address alone. One login opens the whole network: list "
        "shared ones in `never_relay_networks`")
    smtp_starttls: str = _key(
        "strip", _choice("strip", "relay-clients"), '`"strip"` or `"relay-clients"`',
        "hide STARTTLS from clients so every envelope can be read, or offer it only to clients "
        "that may relay anyway (trusted, or logged in by address); envelopes inside TLS go unchecked")
    pop3_stls: str = _key(
        "allow", _choice("allow", "strip"), '`"allow"` or `"strip"`',
        "let POP3 clients use STLS (their logins are then not learned on the wire) or hide it "
        "(logins can be learned; passwords travel in clear)")
    imap_starttls: str = _key(
        "allow", _choice("allow", "strip"), '`"allow"` or `"strip"`',
        "the same choice for IMAP's STARTTLS")
    smtp_auth_relays: bool = _key(
        True, _bool, "`true` or `false`", "a `235` reply to SMTP AUTH counts as logged in")
    refusal: str = _key(
        "recipient", _choice("recipient", "session"), '`"recipient"` or `"session"`',
        "refuse only the recipient the table fails (the MTA gets a rewritten command it "
        "answers without counting an error, its answer becomes a 550 telling the user to log "
        "in, the message still goes to the other recipients), or end the whole session")
    mta: str = _key(
        "auto", _choice("auto", "postfix", "sendmail", "exim", "other"),
        '`"auto"`, `"postfix"`, `"sendmail"`, `"exim"` or `"other"`',
        "the MTA behind the gate, which picks the command a refused recipient becomes so that "
        "it spends none of the MTA's error budget (docs/mta-error-budgets.md): `\"auto\"` "
        "tells it from its greeting and EHLO reply; `\"other\"` sends an unknown verb, which "
        "every MTA counts as an error")
    enforce: bool = _key(
        True, _bool, "`true` or `false`",
        "`false` is monitor mode, the way to start (docs/first-day.md): every decision is made "
        "and logged (`WOULD-FAIL` for a refusal), every packet passes unchanged, and with no "
        "daemon the rules let SMTP by; a reload switches, no restart needed")
    max_flows: int = _key(
        65536, _int(16), "integer >= 16", "flows tracked at once")
    queue: int = _key(
        0, _int(0, 65535), "integer 0..65535", "the first NFQUEUE number")
    interfaces: tuple[str, ...] = _key(
        (), _interfaces, "list of interface names",
        'where clients reach the mail servers: mode `"input"` hooks only these (`[]`: every '
        'interface but lo); mode `"forward"` needs them, since on a gateway only the interface '
        "tells a client's session from the servers' own outgoing mail; on a bridging gateway, "
        "the bridge ports clients come in on (docs/bridged-gateways.md)")
    workers: int = _key(
        1, _int(1, 16), "integer 1..16",
        "daemon processes; the rules balance flows over queues `queue`..`queue+workers-1`")
    queue_maxlen: int = _key(
        4096, _int(16), "integer >= 16",
        "packets the kernel holds for a worker; past that it drops them (fail closed: TCP retransmits)")
    pop3_fail_open: bool = _key(
        True, _bool, "`true` or `false`",
        "with no daemon bound, POP3 and IMAP packets pass (learning stops, mail still flows); "
        "SMTP fails closed (open in monitor mode, `enforce = false`)")
    login_logs: tuple[Path | str, ...] = _key(  # str: a journal source, "journal[:DIR]"
        (), _login_sources, 'list of paths, `"journal"` or `"journal:DIR"`',
        "mail server log files whose success lines are logins (Dovecot 2.3/2.4, Courier), or "
        "the systemd journal's Dovecot entries (of DIR's journal files): POP3S, IMAPS and STARTTLS "
        "logins cannot be read on the wire. Follow the server's own file (Dovecot's `log_path`), "
        "never a syslog file any local user can write to with logger(1)")
    login_hook: Path | None = _key(
        None, _optional_path, 'path, or `""` for none',
        "a unix socket for Dovecot's post-login script (`packaging/sapd-nfq-postlogin`, "
        '`packaging/README.md`), e.g. `"/run/sapd-nfq-hook/login-hook.sock"` (not in `run_dir`, '
        "which is root's alone)")
    login_hook_group: str = _key(
        "sapd-hook", _group, "group name", "the only group (besides root) that may use `login_hook`")
    run_dir: Path = _key(
        Path("/run/sapd-nfq"), _path, "path",
        "where the daemon's control sockets live, and the log learner's positions")
    log_level: str = _key(
        "info", _choice("debug", "info", "warning", "error"),
        '`"debug"`, `"info"`, `"warning"`, `"error"`', "log verbosity")
    metrics_listen: str = _key(
        "", _listen, '`""` or `ADDRESS:PORT` (`"[::1]:9925"` for IPv6)',
        "the Prometheus endpoint (`/metrics`), off by default; meant for loopback or a "
        "management network")

    @classmethod
    def default(cls) -> Config:
        return cls()


def key_docs() -> dict[str, KeyDoc]:
    """Every key's check and documentation, in the order of Config's fields."""
    return {f.name: f.metadata["key"] for f in fields(Config)}


def toml_value(value: object) -> str:
    """A default as the config file spells it."""
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return json.dumps(str(value))


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check a config file; raises ConfigError."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"{name}: cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{name}:{lineno}: not UTF-8 (byte 0x{raw[e.start]:02x})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{name}: not valid TOML: {e}") from None

    base = Path(os.path.abspath(name)).parent
    keys = key_docs()
    values = {}
    for key, value in data.items():
        known = keys.get(key)
        if known is None:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{name}: unknown key {key!r}{hint}")
        try:
            values[key] = known.check(value, base)
        except _Bad as bad:
            problem = bad.why or f"got {_shown(bad.got)}"
            raise ConfigError(f"{name}: {key}: expected {bad.expected}; {problem}") from None

    config = Config(**values)
    if config.queue + config.workers - 1 > 65535:
        raise ConfigError(f"{name}: workers: expected queues {config.queue}.. to end by 65535; "
                          f"got {config.workers} workers")
    if config.virtusertable is None and not config.postfix_maps:
        raise ConfigError(f'{name}: virtusertable: expected a file path ("" needs postfix_maps); '
                          "got no map that says which addresses are local")
    claimed = {"smtp_ports": config.smtp_ports}
    for key in ("pop3_ports", "imap_ports"):
        ports = getattr(config, key)
        for other, taken in claimed.items():
            overlap = sorted(set(ports) & set(taken))
            if overlap:
                raise ConfigError(f"{name}: {key}: expected ports not in {other}; "
                                  f"got {overlap[0]} in both")
        claimed[key] = ports
    return config
