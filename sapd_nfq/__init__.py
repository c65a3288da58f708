"""sapd-nfq: a POP-before-SMTP relay gate in the kernel's packet path.

`ls sapd_nfq` draws the architecture:

- `engine/`   the pure core: packet bytes in, decisions out; no I/O at all
- `logins/`   the login stores (memory replica, SQLite, Redis) behind the engine's interface
- `kernel/`   the packet path's adapters: the queue worker, its supervision, the rules and
              the marks they share with the daemon, injection, interfaces
- `learners/` the login sources the wire cannot show: mail server logs, the post-login hook
- `admin/`    the operator's side: control socket, status, stats, recent decisions,
              metrics, captures for replay
- `wiring/`   what turns a site's files into running parts: config, access checks,
              building the engine's pieces, Postfix maps, logging set-up, file watching
- `lab/`      the namespace lab, its commands and the demo
- `cli.py`    the `sapd-nfq` command
- `docgen.py` the pages made from the code: the key table, the example config, the
              command table (`python -m sapd_nfq.docgen`)
- `compiled.py` the choice, made here before any engine module loads, between the
              engine compiled with mypyc and its sources (`ENGINE`); `build_engine.py`
              makes the compiled one (`python -m sapd_nfq.build_engine`)

The import rules between them are tests (tests/test_architecture.py).

The version has one source, pyproject.toml: an installed package reads it
from its metadata, a source checkout from the file itself.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from .compiled import Choice, select

#: the engine this process runs, compiled or Python; chosen before any engine module loads
ENGINE: Choice = select()

_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def version() -> str:
    """The package's version: installed metadata, else the checkout's
    pyproject.toml, else "unknown" (never an exception)."""
    from importlib import metadata  # on demand: it is large, and a daemon keeps it

    try:
        return metadata.version("sapd-nfq")
    except metadata.PackageNotFoundError:
        pass
    try:
        with _PYPROJECT.open("rb") as file:
            found = tomllib.load(file)["project"]["version"]
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError):
        return "unknown"
    return found if isinstance(found, str) else "unknown"
