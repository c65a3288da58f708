"""The engine compiled with mypyc: built at install, chosen at import, never stale.

mypyc turns the engine's modules into C extensions, about twice as fast
(docs/benchmarks.md). Python imports an extension before a source of the same
name beside it, so a build left in the source tree would run whatever the
sources said when it was made. The build therefore never sits beside the
sources: it lives in the interpreter's prefix (`BUILD`, e.g.
.venv/lib/sapd-nfq-engine/), with a manifest holding the hash of the engine's
sources it was made from. `select`, run once by `sapd_nfq/__init__.py` before
any engine module is imported, puts the build in front of the engine
package's path only if that hash is the sources' hash now and its shared
library loads. So an engine source edited after the build never runs
compiled: the Python engine runs, and a warning says why.

SAPD_NFQ_ENGINE=python runs the Python engine whatever was built;
SAPD_NFQ_ENGINE=compiled fails the import (ImportError) when the build is
absent, stale or broken. SAPD_NFQ_ENGINE_BUILD names another build directory.

`python -m sapd_nfq.build_engine` makes the build (setup.sh runs it). The
modules in `INTERPRETED` stay Python: an interpreted class cannot subclass a
compiled one, and code outside the engine subclasses theirs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

SOURCES = Path(__file__).resolve().parent / "engine"
PACKAGE = "sapd_nfq.engine"
#: the one shared library every compiled module's stub loads (mypyc's group)
LIBRARY = f"{PACKAGE}.native"
SHARED = LIBRARY + "__mypyc"  # the name mypyc gives its module
#: __init__: the package, found before the build is put on its path; errors.py
#: (SapdError) and logins.py (LoginStore, MemoryLoginStore): subclassed outside
#: the engine, by the adapters' errors and the login backends
INTERPRETED = ("__init__.py", "errors.py", "logins.py")
ENV_ENGINE = "SAPD_NFQ_ENGINE"
ENV_BUILD = "SAPD_NFQ_ENGINE_BUILD"
MANIFEST = "manifest.json"

log = logging.getLogger("sapd_nfq.compiled")


@dataclass(frozen=True, slots=True)
class Choice:
    """Which engine runs, and why; `warn`: a build exists but cannot run."""

    engine: str  # "compiled" or "python"
    why: str
    warn: bool = False

    def __str__(self) -> str:
        return f"{self.engine} engine ({self.why})"


def default_build(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get(ENV_BUILD) or Path(sys.prefix, "lib", "sapd-nfq-engine"))


def sources_hash(sources: Path = SOURCES) -> str:
    """The hash of every engine source, names included: an edit, a new module
    or a removed one changes it."""
    digest = hashlib.sha256()
    for path in sorted(sources.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def compiled_modules(sources: Path = SOURCES) -> list[str]:
    return sorted(p.stem for p in sources.glob("*.py") if p.name not in INTERPRETED)


def problem(build: Path, sources: Path = SOURCES) -> str | None:
    """Why the build in `build` cannot stand for these sources, or None. The
    shared library's loading is left to `select`."""
    try:
        manifest = json.loads((build / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no compiled engine in {build}"
    except (OSError, ValueError) as e:
        return f"unreadable manifest in {build}: {e}"
    if not isinstance(manifest, dict):
        return f"unreadable manifest in {build}"
    if manifest.get("sources") != sources_hash(sources):
        return f"stale: the engine's sources changed after the build in {build}"
    if manifest.get("suffix") != EXTENSION_SUFFIXES[0]:
        return f"built for another Python ({manifest.get('suffix')}) in {build}"
    where = build / PACKAGE.replace(".", "/")
    missing = [m for m in [*compiled_modules(sources), SHARED.rpartition(".")[2]]
               if not (where / (m + EXTENSION_SUFFIXES[0])).is_file()]
    if missing:
        return f"broken: {', '.join(missing)} missing in {build}"
    return None


def select(environ: Mapping[str, str] = os.environ, build: Path | None = None) -> Choice:
    """Put a current build in front of the engine's path, or leave the sources
    there; before any engine module is imported. Raises ImportError when
    SAPD_NFQ_ENGINE asks for what cannot be had."""
    wanted = environ.get(ENV_ENGINE, "")
    if wanted not in ("", "python", "compiled"):
        raise ImportError(f"{ENV_ENGINE}={wanted!r}: use python or compiled")
    if wanted == "python":
        return Choice("python", f"{ENV_ENGINE}=python")
    build = build if build is not None else default_build(environ)
    why = problem(build)
    if why is None:
        import sapd_nfq.engine as engine

        where = str(build / PACKAGE.replace(".", "/"))
        engine.__path__.insert(0, where)
        try:
            importlib.import_module(SHARED)
        except ImportError as e:
            engine.__path__.remove(where)
            why = f"broken: its shared library does not load: {e}"
        else:
            return Choice("compiled", f"mypyc, {build}")
    if wanted == "compiled":
        raise ImportError(f"{ENV_ENGINE}=compiled, but the compiled engine cannot run: {why}; "
                          f"python -m sapd_nfq.build_engine builds it")
    absent = not (build / MANIFEST).exists()
    choice = Choice("python", why, warn=not absent)
    if choice.warn:
        log.warning("running the Python engine, the compiled one is %s; "
                    "python -m sapd_nfq.build_engine rebuilds it", why)
    return choice
