"""The pages made from the code, so that they cannot drift from it.

- the key table of docs/configuration.md, from the fields of `Config`
  (wiring/config.py: each key's type, default, check and documentation);
- packaging/sapd-nfq.toml, every key with its default and a comment, from
  the same fields;
- the command table of README.md, from the argument parser (cli.py).

`python -m sapd_nfq.docgen` writes them; `--check` writes nothing and exits
1 naming the stale ones (tests/test_docs.py runs it). The rows themselves
(`key_rows`, `command_rows`) are for any other page made from the same
sources, such as man pages.
"""

from __future__ import annotations

import argparse
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


def command_rows(parser: argparse.ArgumentParser | None = None, prefix: str = "sapd-nfq") -> list[CommandRow]:
    """One row a command that runs something (`auth add`, not `auth`), in the parser's order."""
    rows = []
    for name, short, sub in _subcommands(parser or build_parser()):
        nested = command_rows(sub, f"{prefix} {name}")
        if nested:
            rows += nested
        else:
            rows.append(CommandRow(f"{prefix} {name} {_synopsis(sub)}".rstrip(), sub.description or short))
    return rows


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
           "# Made by `python -m sapd_nfq.docgen` from sapd_nfq/wiring/config.py."]
    for row in key_rows():
        plain = f"{row.doc[0].upper()}{row.doc[1:]}. Values: {row.values}.".replace("`", "")
        out += ["", *textwrap.wrap(plain, 78, initial_indent="# ", subsequent_indent="# ",
                                   break_on_hyphens=False),
                f"{row.name} = {row.default}"]
    return "\n".join(out) + "\n"


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
