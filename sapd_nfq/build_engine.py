"""`python -m sapd_nfq.build_engine`: the engine compiled with mypyc (compiled.py).

It uses the mypy the `dev` extra pins and the C compiler netfilterqueue's
install needs; setup.sh runs it. The build goes where `select` looks for it
(`SAPD_NFQ_ENGINE_BUILD`, or the interpreter's prefix), replacing what is
there only once it is whole, with a manifest of what it was made from. A
failure leaves the Python engine to run and exits 1.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

from .compiled import LIBRARY, MANIFEST, SOURCES, compiled_modules, default_build, sources_hash


def build(target: Path) -> dict[str, object]:
    """Compile the engine into `target`; returns its manifest."""
    from mypy.version import __version__ as mypy_version
    from mypyc.build import mypycify
    from setuptools import Distribution

    began = time.monotonic()
    before = sources_hash()
    staging = target.with_name(target.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    scratch = staging / "scratch"
    paths = [str(SOURCES / f"{m}.py") for m in compiled_modules()]
    extensions = mypycify([*paths, "--cache-dir", str(scratch / "mypy")], group_name=LIBRARY,
                          target_dir=str(scratch / "c"))
    dist = Distribution({"name": "sapd-nfq-engine", "ext_modules": extensions})
    command = dist.get_command_obj("build_ext")
    command.build_lib = str(staging)
    command.build_temp = str(scratch / "o")
    command.parallel = os.cpu_count() or 1
    dist.run_command("build_ext")
    shutil.rmtree(scratch)
    if sources_hash() != before:
        raise RuntimeError("the engine's sources changed during the build: build again")
    manifest: dict[str, object] = {
        "sources": before, "suffix": EXTENSION_SUFFIXES[0], "modules": compiled_modules(),
        "mypy": mypy_version, "built": time.time(), "seconds": round(time.monotonic() - began, 1),
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def main() -> int:
    target = default_build()
    try:
        manifest = build(target)
    except (Exception, SystemExit) as e:  # mypyc exits on an error; the Python engine runs
        print(f"the compiled engine did not build: {e}; the Python engine runs", file=sys.stderr)
        return 1
    print(f"compiled engine built in {manifest['seconds']} s (mypyc {manifest['mypy']}): {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
