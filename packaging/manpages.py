"""The manual pages sapd-nfq(8) and sapd-nfq.toml(5), generated from the command parser
(sapd_nfq.cli.build_parser) and the configuration's key table (sapd_nfq.wiring.config), so
that they say what the code does. The pages in packaging/man/ are the generated ones;
tests/test_manpages.py checks that they are current.

    python3 packaging/manpages.py      rewrite packaging/man/ from the code
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sapd_nfq.cli import build_parser  # noqa: E402
from sapd_nfq.wiring import config  # noqa: E402

MAN_DIR = ROOT / "packaging" / "man"
DATE = "2026-12-06"  # the pages' date: change it with what they say
SOURCE = "sapd-nfq"
FILES = """.TP
.I /etc/sapd-nfq/sapd-nfq.toml
the configuration (a conffile, mode 0600), see
.BR sapd-nfq.toml (5)
.TP
.I /var/lib/sapd-nfq/logins.sqlite
the logins, kept across restarts and upgrades
.TP
.I /run/sapd-nfq/
the daemon's control sockets
.TP
.I /usr/share/sapd-nfq/rules/
the templates of the iptables rules
.TP
.I /usr/libexec/sapd-nfq/sapd-nfq-postlogin
Dovecot's post-login script, for
.B login_hook
"""


def roff(text: str) -> str:
    """Plain text as roff: backslashes escaped, `code` in bold, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = re.sub(r"`([^`]+)`", r"\\fB\1\\fR", text)
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def header(name: str, section: int, title: str) -> list[str]:
    return [f'.TH {name.upper()} {section} {DATE} "{SOURCE}" "{title}"',
            ".SH NAME", f"{roff(name)} \\- {roff(title)}"]


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=10_000)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def _options(parser: argparse.ArgumentParser) -> list[str]:
    formatter = argparse.HelpFormatter(parser.prog)
    lines = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        lines += [".TP", f"\\fB{roff(formatter._format_action_invocation(action))}\\fR",
                  roff(formatter._expand_help(action) if action.help else "")]
    return lines


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    """Each (sub)command: its usage, what it does, its options; nested ones after it."""
    sub = _subcommands(parser)
    if sub is None:
        return []
    lines = []
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    for name, command in sub.choices.items():
        lines += [".TP", f"\\fB{roff(_usage(command))}\\fR", roff(helps.get(name) or "")]
        if command._actions[1:] and not _subcommands(command):
            lines += [".RS", *_options(command), ".RE"]
        lines += _commands(command)
    return lines


def command_page() -> str:
    parser = build_parser()
    lines = header("sapd-nfq", 8, "POP-before-SMTP relay gate in the kernel's packet path")
    lines += [".SH SYNOPSIS", f"\\fB{roff(_usage(parser))}\\fR",
              ".SH DESCRIPTION",
              roff("sapd-nfq lets a mail server relay for the clients that have just logged in by "
                   "POP3 or IMAP. iptables hands the SMTP, POP3 and IMAP flows to the daemon through "
                   "NFQUEUE (`sapd-nfq up`); the daemon (`sapd-nfq run`) reassembles TCP, learns the "
                   "logins, reads each SMTP envelope and refuses a relay in place. The rules stay "
                   "when the daemon stops, so SMTP fails closed until it is back; `sapd-nfq down` "
                   "removes them."),
              ".PP", roff("The systemd unit sapd-nfq.service runs `up` and `run` with the configuration "
                          "/etc/sapd-nfq/sapd-nfq.toml."),
              *([".SH OPTIONS", *options] if (options := _options(parser)) else []),
              ".SH COMMANDS", *_commands(parser),
              ".SH FILES", FILES.strip(),
              ".SH SEE ALSO", ".BR sapd-nfq.toml (5),", ".BR iptables (8),", ".BR systemctl (1)"]
    return "\n".join(lines) + "\n"


def config_keys() -> list[dict[str, str]]:
    """The key table, from config.py's docstring (a row a key: key, value, default, meaning)."""
    rows = []
    for line in (config.__doc__ or "").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        if line.startswith("| `") and len(cells) == 4:
            rows.append(dict(zip(("key", "value", "default", "meaning"), cells, strict=True)))
    return rows


def config_page() -> str:
    intro = (config.__doc__ or "").split("\n\n")[1]
    lines = header("sapd-nfq.toml", 5, "configuration of the sapd-nfq relay gate")
    lines += [".SH DESCRIPTION",
              roff("/etc/sapd-nfq/sapd-nfq.toml configures sapd-nfq(8): TOML, top-level keys only. "
                   + " ".join(intro.split())),
              ".PP", roff("A key left out has its default. The file may hold a Redis password "
                          "(`state`): it is root's alone, mode 0600."),
              ".SH KEYS"]
    for row in config_keys():
        lines += [".TP", f"{roff(row['key'])} = {roff(row['default'])}",
                  roff(f"{row['value']}: {row['meaning']}.")]
    lines += [".SH EXAMPLE", ".EX", 'mode = "forward"', 'interfaces = ["eth1"]',
              'virtusertable = ""', 'postfix_maps = ["hash:/etc/postfix/virtual"]',
              'login_logs = ["/var/log/dovecot.log"]', ".EE",
              ".SH SEE ALSO", ".BR sapd-nfq (8)"]
    return "\n".join(lines) + "\n"


PAGES = {"sapd-nfq.8": command_page, "sapd-nfq.toml.5": config_page}


def main() -> int:
    MAN_DIR.mkdir(exist_ok=True)
    for name, render in PAGES.items():
        (MAN_DIR / name).write_text(render())
        print(MAN_DIR / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
