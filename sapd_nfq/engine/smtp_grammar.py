"""SMTP syntax as the MTA reads it: command lines, envelope paths, replies.

Pure functions from bytes to values; each raises ProtocolError for input it
cannot read unambiguously. Where Postfix is lenient (RFC 822 comments, junk
around the address, several addresses in one argument) we are strict: an
envelope address we might read differently from the MTA is refused, never
guessed. Two spellings Postfix delivers to the plain address are read as that
address, so that mail to a local user is not turned away: a quoted local part
that needs no quotes (`"alice"@dom`, `"al\\ice"@dom` are `alice@dom`), and
one trailing dot after the domain (`alice@dom.`). Hints name the problem and
never echo peer bytes.
"""

from __future__ import annotations

import re

from .errors import ProtocolError

# Postfix splits commands on isspace(): a vertical tab separates `RCPT` from
# `TO:` as well as a space does, and the CRs Postfix strips before the LF
# are whitespace too. The line has already lost its LF. (bytes.split() with
# no argument splits on this same set.)
WHITESPACE = b" \t\r\x0b\x0c"
_WS = rb"[ \t\r\x0b\x0c]"

# RFC 5321 Mailbox, strictly. '!' and '%' are allowed here so that the
# routing check below can refuse them with a clear hint.
_ATEXT = rb"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\x80-\xff]"
_DOT_STRING = _ATEXT + rb"+(?:\." + _ATEXT + rb"+)*"
_QUOTED = rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\x20-\x7e])*"'
_LABEL = rb"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rb"(?:" + _LABEL + rb"(?:\." + _LABEL + rb")*\.?|\[[\x21-\x5a\x5e-\x7e]+\])"
_MAILBOX = rb"(?P<local>" + _DOT_STRING + rb"|" + _QUOTED + rb")(?:@(?P<domain>" + _DOMAIN + rb"))?"
_ROUTE = rb"@" + _DOMAIN + rb"(?:,@" + _DOMAIN + rb")*:"

_PLAIN_LOCAL = re.compile(_DOT_STRING)
_BRACKETED = re.compile(rb"<(?:(?:" + _ROUTE + rb")?" + _MAILBOX + rb")?>")
_BARE = re.compile(_MAILBOX)
_PARAM = re.compile(rb"[A-Za-z0-9][A-Za-z0-9-]*(?:=[\x21-\x3c\x3e-\x7e\x80-\xff]+)?")
_FROM = re.compile(rb"FROM:" + _WS + rb"*", re.IGNORECASE)
_TO = re.compile(rb"TO:" + _WS + rb"*", re.IGNORECASE)

# Local-part characters an MTA may route on (user%host@us, host!user@us,
# "user@host"@us once dequoted): an address that contains them is not the
# address the mail goes to.
_ROUTING = re.compile(rb"[@%!]")
_UNQUOTE = re.compile(rb"\\(.)")

_REPLY = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?", re.DOTALL)
_EHLO_KEYWORD = re.compile(rb"[ \t]*([A-Za-z0-9][A-Za-z0-9-]*)(?:[ \t=]|$)")
_SASL_MECHANISM = re.compile(rb"[A-Za-z0-9_-]{1,20}")
_DIGITS = re.compile(rb"[0-9]{1,18}")


def split_command(line: bytes) -> tuple[bytes, bytes]:
    """(verb in upper case, the rest with leading whitespace removed)."""
    parts = line.split(None, 1)
    if not parts:
        return b"", b""
    return parts[0].upper(), parts[1] if len(parts) > 1 else b""


def mail_from(args: bytes) -> tuple[str, str]:
    """MAIL arguments -> (sender, params); the null sender <> is ""."""
    return _path(args, _FROM, "MAIL FROM", allow_null=True)


def rcpt_to(args: bytes) -> tuple[str, str]:
    """RCPT arguments -> (recipient, params)."""
    return _path(args, _TO, "RCPT TO", allow_null=False)


def _path(args: bytes, keyword: re.Pattern[bytes], what: str, allow_null: bool) -> tuple[str, str]:
    head = keyword.match(args)
    if head is None:
        raise ProtocolError(f"{what}: missing '{what.split()[1]}:'")
    pattern = _BRACKETED if args[head.end():head.end() + 1] == b"<" else _BARE
    found = pattern.match(args, head.end())
    if found is None:
        raise ProtocolError(f"{what}: unreadable address")
    rest = args[found.end():]
    if rest and rest[0] not in WHITESPACE:
        raise ProtocolError(f"{what}: junk after the address")
    params = rest.split()
    if not all(_PARAM.fullmatch(p) for p in params):
        raise ProtocolError(f"{what}: malformed parameter")
    local = found["local"]
    if local is None:
        if not allow_null:
            raise ProtocolError(f"{what}: null address")
        address = ""
    else:
        plain = _UNQUOTE.sub(rb"\1", local[1:-1]) if local[:1] == b'"' else local
        if _ROUTING.search(plain):
            raise ProtocolError(f"{what}: routing characters in the local part")
        if _PLAIN_LOCAL.fullmatch(plain):
            local = plain
        try:
            address = local.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{what}: local part is not UTF-8") from None
        if found["domain"] is not None:
            address += "@" + found["domain"].decode("ascii").removesuffix(".")
    return address, b" ".join(params).decode("utf-8", "replace")


# The queue id in an MTA's reply to a message, so that a log line can name it
# as the MTA's own log does. Only letters and digits (and Exim's hyphens),
# 4 to 32 of them: what the reply says goes to a log line, never more.
_QUEUE_IDS = (
    re.compile(rb"queued as ([0-9A-Za-z]{4,32})\b"),                        # Postfix
    re.compile(rb"^(?:[245]\.\d{1,3}\.\d{1,3} )?([0-9A-Za-z]{4,32}) Message accepted"),  # Sendmail
    re.compile(rb"\bid=([0-9A-Za-z]{4,16}(?:-[0-9A-Za-z]{2,16}){2})\b"),    # Exim
)


def queue_id(text: bytes) -> str | None:
    """The queue id in the text of a reply that took a message:
    Postfix `250 2.0.0 Ok: queued as 4XkQ2B1c2Dz9`, Sendmail
    `250 2.0.0 5B6Gq1Zk012345 Message accepted for delivery`, Exim
    `250 OK id=1tRbXg-000Ab1-2c`; None for any other."""
    for pattern in _QUEUE_IDS:
        found = pattern.search(text)
        if found is not None:
            return found[1].decode("ascii")
    return None


def bdat(args: bytes) -> tuple[int, bool]:
    """BDAT arguments -> (chunk size, LAST?)."""
    parts = args.split()
    if not 1 <= len(parts) <= 2 or not _DIGITS.fullmatch(parts[0]):
        raise ProtocolError("BDAT: bad chunk size")
    if len(parts) == 2 and parts[1].upper() != b"LAST":
        raise ProtocolError("BDAT: bad argument after the chunk size")
    return int(parts[0]), len(parts) == 2


def auth(args: bytes) -> tuple[str, bytes | None] | None:
    """AUTH arguments -> (mechanism, initial response or None), or None
    when they are not `mechanism [initial-response]` (the MTA refuses those)."""
    parts = args.split()
    if not 1 <= len(parts) <= 2 or not _SASL_MECHANISM.fullmatch(parts[0]):
        return None
    return parts[0].decode("ascii"), parts[1] if len(parts) == 2 else None


def reply(line: bytes) -> tuple[bytes, bool, bytes, int]:
    """A server reply line -> (code, is the final line, text, index of the text)."""
    found = _REPLY.fullmatch(line.rstrip(b"\r"))
    if found is None:
        raise ProtocolError("malformed server reply line")
    return found[1], found[2] != b"-", found[3] or b"", found.start(3) if found[3] is not None else 3


def ehlo_keyword(text: bytes) -> tuple[bytes, int] | None:
    """(keyword in upper case, its index in text) of an EHLO reply line."""
    found = _EHLO_KEYWORD.match(text)
    if found is None:
        return None
    return found[1].upper(), found.start(1)
