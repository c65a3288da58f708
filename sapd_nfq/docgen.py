"""The pages made from the code, so that they cannot drift from it.

- the key table of docs/configuration.md, from the fields of `Config`
  (wiring/config.py: each key's type, default, check and documentation);
- packaging/sapd-nfq.toml, every key with its default and a comment, from
  the same fields;
- the command table of README.md, from the argument parser (cli.py);
- the manual pages sapd-nfq(8) and sapd-nfq.toml(5) in packaging/man/, which
  the Debian package installs, from both.

`python -m sapd_nfq.docgen` writes them; `--check` writes nothing and exits
1 naming the stale ones (tests/test_docs.py runs it). The rows themselves
(`key_rows`, `command_rows`) are for any other page made from the same
sources, such as man pages.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .cli import build_parser
from .wiring.config import DEFAULT_CONFIG_PATH, Config, key_docs, toml_value

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class KeyRow:
    name: str
    values: str
    default: str  # as the config file spells it
    doc: str


@dataclass(frozen=True, slots=True)
class CommandRow:
    synopsis: str  # "sapd-nfq auth add IP [--user NAME] [--ttl S]"
    doc: str


def key_rows() -> list[KeyRow]:
    defaults = Config.default()
    return [KeyRow(name, key.values, toml_value(getattr(defaults, name)), key.doc)
            for name, key in key_docs().items()]


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each command `parser` dispatches to."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps[name], sub


def _synopsis(parser: argparse.ArgumentParser) -> str:
    """The arguments of a command, `--config` and `--help` left out (every command has them)."""
    words = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or "--config" in action.option_strings:
            continue
        if not action.option_strings:
            words.append(str(action.metavar or action.dest))
            continue
        option = action.option_strings[0]
        word = option if action.nargs == 0 else f"{option} {action.metavar or action.dest.upper()}"
        words.append(word if action.required else f"[{word}]")
    return " ".join(words)


def _commands(parser: argparse.ArgumentParser, prefix: str
              ) -> Iterator[tuple[CommandRow, argparse.ArgumentParser]]:
    """Each command that runs something (`auth add`, not `auth`) with its parser, in order."""
    for name, short, sub in _subcommands(parser):
        nested = list(_commands(sub, f"{prefix} {name}"))
        if nested:
            yield from nested
        else:
            yield CommandRow(f"{prefix} {name} {_synopsis(sub)}".rstrip(), sub.description or short), sub


def command_rows(parser: argparse.ArgumentParser | None = None, prefix: str = "sapd-nfq") -> list[CommandRow]:
    """One row a command that runs something (`auth add`, not `auth`), in the parser's order."""
    return [row for row, _ in _commands(parser or build_parser(), prefix)]


def keys_markdown() -> str:
    lines = ["| key | value | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{row.name}` | {row.values} | `{row.default}` | {row.doc} |" for row in key_rows()]
    return "\n".join(lines) + "\n"


def commands_markdown() -> str:
    lines = ["| command | what it does |", "|---|---|"]
    lines += [f"| `{row.synopsis}` | {row.doc} |" for row in command_rows()]
    return "\n".join(lines) + "\n"


def example_toml() -> str:
    """The commented config file with every key at its default."""
    out = [f"# {DEFAULT_CONFIG_PATH}: every key, with its default.",
           "# An unknown key or a bad value stops sapd-nfq with an error naming it.",
           "# Relative paths resolve against this file's directory.",
           "# Made by `python -m sapd_nfq.docgen` from sapd_nfq/wiring/config.py.",
           "# The Debian package starts nothing: once this file fits the site,",
           "# `systemctl enable --now sapd-nfq` (man sapd-nfq.toml explains each key)."]
    for row in key_rows():
        plain = f"{row.doc[0].upper()}{row.doc[1:]}. Values: {row.values}.".replace("`", "")
        out += ["", *textwrap.wrap(plain, 78, initial_indent="# ", subsequent_indent="# ",
                                   break_on_hyphens=False),
                f"{row.name} = {row.default}"]
    return "\n".join(out) + "\n"


# --- the manual pages -------------------------------------------------------------

MAN_FILES = """.TP
.I /etc/sapd\\-nfq/sapd\\-nfq.toml
the configuration (see
.BR sapd\\-nfq.toml (5));
a conffile of the Debian package, mode 0600
.TP
.I /var/lib/sapd\\-nfq/logins.sqlite
the logins, kept across restarts and upgrades
.TP
.I /run/sapd\\-nfq/
the daemon's control sockets
.TP
.I /usr/share/sapd\\-nfq/rules/
the templates of the iptables rules
.TP
.I /usr/libexec/sapd\\-nfq/sapd\\-nfq\\-postlogin
Dovecot's post\\-login script, for
.B login_hook
"""


def roff(text: str) -> str:
    """Plain text as roff: backslashes and hyphens escaped, `code` in bold, no line
    read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"`([^`]+)`", r"\\fB\1\\fR", text)
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def _man_header(name: str, section: int, title: str) -> list[str]:
    return [f'.TH {roff(name.upper())} {section} "" "sapd\\-nfq" "{roff(title)}"',
            ".SH NAME", f"{roff(name)} \\- {roff(title)}"]


def _man_options(parser: argparse.ArgumentParser, *, common: bool) -> list[str]:
    """Each option of `parser` that says what it does: the common ones (--config, --help)
    only with `common`."""
    formatter = argparse.HelpFormatter(parser.prog)
    lines = []
    for action in parser._actions:
        shared = isinstance(action, argparse._HelpAction) or "--config" in action.option_strings
        if not action.help or isinstance(action, argparse._SubParsersAction) or shared != common:
            continue
        lines += [".TP", f"\\fB{roff(formatter._format_action_invocation(action))}\\fR",
                  roff(formatter._expand_help(action))]
    return lines


def man_command() -> str:
    """sapd-nfq(8)."""
    parser = build_parser()
    lines = _man_header("sapd-nfq", 8, "POP-before-SMTP relay gate in the kernel's packet path")
    lines += [".SH SYNOPSIS", "\\fBsapd\\-nfq\\fR \\fICOMMAND\\fR [\\fIARGUMENTS\\fR] "
              "[\\fB\\-\\-config\\fR \\fIFILE\\fR]",
              ".SH DESCRIPTION",
              roff("sapd-nfq lets a mail server relay for the clients that have just logged in by POP3 "
                   "or IMAP. iptables hands the SMTP, POP3 and IMAP flows to the daemon through NFQUEUE "
                   "(`sapd-nfq up`); the daemon (`sapd-nfq run`) reassembles TCP, learns the logins, "
                   "reads each SMTP envelope and refuses a relay in place. The rules stay when the daemon "
                   "stops, so SMTP fails closed until it is back; `sapd-nfq down` removes them."),
              ".PP", roff("The systemd unit sapd-nfq.service runs `up` and `run` with the configuration "
                          f"{DEFAULT_CONFIG_PATH}. The Debian package leaves it stopped and disabled until "
                          "the administrator has configured it: `systemctl enable --now sapd-nfq`."),
              ".SH COMMANDS"]
    for row, sub in _commands(parser, "sapd-nfq"):
        options = _man_options(sub, common=False)
        lines += [".TP", f"\\fB{roff(row.synopsis)}\\fR", roff(row.doc)]
        lines += [".RS", *options, ".RE"] if options else []
    check = next(sub for row, sub in _commands(parser, "sapd-nfq") if row.synopsis.startswith("sapd-nfq check"))
    lines += [".SH OPTIONS", roff("The commands that read the configuration take `--config`; every "
                                  "command takes `--help`."), *_man_options(check, common=True),
              ".SH FILES", MAN_FILES.strip(),
              ".SH SEE ALSO", ".BR sapd\\-nfq.toml (5),", ".BR iptables (8),", ".BR systemctl (1)"]
    return "\n".join(lines) + "\n"


def man_config() -> str:
    """sapd-nfq.toml(5)."""
    lines = _man_header("sapd-nfq.toml", 5, "configuration of the sapd-nfq relay gate")
    lines += [".SH DESCRIPTION",
              roff(f"{DEFAULT_CONFIG_PATH} configures sapd-nfq(8): TOML, top-level keys only. A key left "
                   "out has its default; an unknown key or a bad value stops sapd-nfq with an error naming "
                   "it. Relative paths resolve against the file's directory. The file may hold a Redis "
                   "password (`state`): it is root's alone, mode 0600."),
              ".SH KEYS"]
    for row in key_rows():
        lines += [".TP", f"\\fB{roff(row.name)}\\fR = {roff(row.default)}",
                  roff(f"{row.doc[0].upper()}{row.doc[1:]}. Values: {row.values}.")]
    lines += [".SH EXAMPLE", ".EX", 'mode = "forward"', 'interfaces = ["eth1"]', 'virtusertable = ""',
              'postfix_maps = ["hash:/etc/postfix/virtual"]', 'login_logs = ["/var/log/dovecot.log"]',
              ".EE", ".SH SEE ALSO", ".BR sapd\\-nfq (8)"]
    return "\n".join(lines) + "\n"


def _between(name: str, body: Callable[[], str]) -> Callable[[str], str]:
    """A page's text with the part between the markers of `name` replaced by `body()`."""
    begin = f"<!-- {name}: made by `python -m sapd_nfq.docgen`, do not edit -->\n"
    end = f"<!-- end of {name} -->\n"

    def rewrite(text: str) -> str:
        head, found, rest = text.partition(begin)
        _, found_end, tail = rest.partition(end)
        if not (found and found_end):
            raise ValueError(f"the markers of {name} are missing")
        return head + begin + body() + end + tail
    return rewrite


#: each generated page: its path under the repository, and how its text is made from what it holds
PAGES: dict[str, Callable[[str], str]] = {
    "docs/configuration.md": _between("the key table", keys_markdown),
    "packaging/sapd-nfq.toml": lambda _old: example_toml(),
    "README.md": _between("the command table", commands_markdown),
    "packaging/man/sapd-nfq.8": lambda _old: man_command(),
    "packaging/man/sapd-nfq.toml.5": lambda _old: man_config(),
}


def stale(root: Path = ROOT) -> list[str]:
    """The generated pages that differ from what the code would make."""
    return [name for name, make in PAGES.items()
            if (root / name).read_text() != make((root / name).read_text())]


def write(root: Path = ROOT) -> list[str]:
    """Write the stale pages; returns their names."""
    changed = stale(root)
    for name in changed:
        path = root / name
        path.write_text(PAGES[name](path.read_text()))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sapd_nfq.docgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page is stale")
    args = parser.parse_args(argv)
    if args.check:
        pages = stale()
        for name in pages:
            print(f"{name} is stale: run python -m sapd_nfq.docgen", file=sys.stderr)
        return 1 if pages else 0
    for name in write():
        print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
