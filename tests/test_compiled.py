"""The engine's two builds: the engine's tests pass on each, and the compiled
one runs only while it is current.

This suite runs in-process on the engine `select` chose (compiled, once
setup.sh has built it); `test_the_engines_tests_pass_on_the_other_build` runs
the engine's tests again with the other one forced. The selection itself is
tried in fresh interpreters, on builds made absent, stale or broken here.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import sapd_nfq
import sapd_nfq.engine
from sapd_nfq import compiled
from sapd_nfq.compiled import ENV_BUILD, ENV_ENGINE, MANIFEST

ROOT = Path(__file__).resolve().parent.parent
ENGINE_TESTS = ("tests/engine", "tests/test_replay.py")
WHICH = "import sapd_nfq, sapd_nfq.engine.core as core; print(sapd_nfq.ENGINE.engine, core.__file__)"


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """A fresh interpreter in the repository, with `env` added to this one's
    and no engine choice inherited."""
    base = {k: v for k, v in os.environ.items() if k not in (ENV_ENGINE, ENV_BUILD)}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**base, **env})


def engine_tests(engine: str, tests: tuple[str, ...] = ENGINE_TESTS, **env: str
                 ) -> subprocess.CompletedProcess[str]:
    return run(["-m", "pytest", "-p", "no:cacheprovider", "-m", "not lab", *tests],
               **{ENV_ENGINE: engine, **env})


def fake_build(where: Path, **manifest: object) -> Path:
    """A build directory for the current sources with every file in place,
    none of them loadable; `manifest` overrides the manifest's entries."""
    package = where / "sapd_nfq" / "engine"
    package.mkdir(parents=True)
    for module in [*compiled.compiled_modules(), compiled.SHARED.rpartition(".")[2]]:
        (package / (module + EXTENSION_SUFFIXES[0])).write_bytes(b"not a shared library")
    entries = {"sources": compiled.sources_hash(), "suffix": EXTENSION_SUFFIXES[0], **manifest}
    (where / MANIFEST).write_text(json.dumps(entries))
    return where


# --- both builds pass the engine's tests ---------------------------------------------

def test_the_engines_tests_pass_on_the_other_build():
    other = "python" if sapd_nfq.ENGINE.engine == "compiled" else "compiled"
    done = engine_tests(other)
    assert done.returncode == 0, (f"the engine's tests on the {other} engine "
                                  f"(this run: {sapd_nfq.ENGINE}):\n{done.stdout[-6000:]}{done.stderr[-3000:]}")
    assert f"engine: {other} engine" in done.stdout


@pytest.mark.parametrize("broken", ["stale", "broken"])
def test_the_other_build_fails_the_check_when_it_cannot_run(tmp_path, broken):
    """The check can fail: forced onto a build that is stale or does not load,
    the engine's tests do not pass, and the output says why."""
    build = fake_build(tmp_path, **({"sources": "0" * 64} if broken == "stale" else {}))
    done = engine_tests("compiled", ("tests/engine/test_packet.py",), **{ENV_BUILD: str(build)})
    assert done.returncode != 0
    assert f"compiled engine cannot run: {broken}" in done.stdout + done.stderr


def test_the_chosen_engine_is_the_one_that_runs():
    from sapd_nfq.engine import core, errors, logins

    compiled_file = core.__file__.endswith(EXTENSION_SUFFIXES[0])
    assert compiled_file == (sapd_nfq.ENGINE.engine == "compiled"), (sapd_nfq.ENGINE, core.__file__)
    # subclassed outside the engine: always the sources
    assert errors.__file__.endswith(".py") and logins.__file__.endswith(".py")


# --- the choice ----------------------------------------------------------------------

def test_no_build_runs_the_python_engine_quietly(tmp_path):
    done = run(["-c", WHICH], **{ENV_BUILD: str(tmp_path / "none")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("python ") and done.stdout.strip().endswith("core.py")
    assert done.stderr == ""


@pytest.mark.parametrize(("manifest", "why"), [
    ({"sources": "0" * 64}, "stale: the engine's sources changed after the build"),
    ({"suffix": ".cpython-39-x86_64-linux-gnu.so"}, "built for another Python"),
    ({}, "broken: its shared library does not load"),
])
def test_a_build_that_cannot_run_falls_back_loudly(tmp_path, manifest, why):
    build = fake_build(tmp_path, **manifest)
    done = run(["-c", WHICH], **{ENV_BUILD: str(build)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("python ") and done.stdout.strip().endswith("core.py")
    assert "running the Python engine" in done.stderr and why in done.stderr


def test_a_missing_module_is_a_broken_build(tmp_path):
    build = fake_build(tmp_path)
    (build / "sapd_nfq" / "engine" / ("core" + EXTENSION_SUFFIXES[0])).unlink()
    assert compiled.problem(build) == f"broken: core missing in {build}"


@pytest.mark.parametrize("manifest", [{"sources": "0" * 64}, {}])
def test_compiled_forced_fails_the_import_when_it_cannot_run(tmp_path, manifest):
    done = run(["-c", WHICH], **{ENV_ENGINE: "compiled", ENV_BUILD: str(fake_build(tmp_path, **manifest))})
    assert done.returncode != 0
    assert "ImportError: SAPD_NFQ_ENGINE=compiled, but the compiled engine cannot run" in done.stderr


def test_python_forced_runs_the_sources_whatever_was_built(tmp_path):
    done = run(["-c", WHICH], **{ENV_ENGINE: "python", ENV_BUILD: str(fake_build(tmp_path))})
    assert done.returncode == 0 and done.stdout.strip().endswith("core.py") and done.stderr == ""


def test_an_unknown_engine_is_an_error():
    done = run(["-c", WHICH], **{ENV_ENGINE: "pypy"})
    assert done.returncode != 0 and "SAPD_NFQ_ENGINE='pypy': use python or compiled" in done.stderr


def test_any_edit_to_the_engines_sources_makes_a_build_stale(tmp_path):
    sources = tmp_path / "engine"
    sources.mkdir()
    (sources / "core.py").write_text("x = 1\n")
    hashes = [compiled.sources_hash(sources)]
    (sources / "core.py").write_text("x = 2\n")
    hashes.append(compiled.sources_hash(sources))
    (sources / "new.py").write_text("")
    hashes.append(compiled.sources_hash(sources))
    (sources / "core.py").rename(sources / "old.py")
    hashes.append(compiled.sources_hash(sources))
    assert len(set(hashes)) == 4
    # and the sources hashed are the ones Python imports
    assert compiled.SOURCES == Path(sapd_nfq.engine.__file__).parent


# --- what mypyc cannot compile ----------------------------------------------------------

def classes(path: Path) -> list[ast.ClassDef]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)]


def base_names(node: ast.ClassDef) -> set[str]:
    return {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
            if isinstance(b, ast.Name | ast.Attribute)}


def test_no_class_outside_the_compiled_modules_subclasses_one_of_theirs():
    """An interpreted class cannot subclass a compiled one: what is subclassed
    elsewhere lives in a module of compiled.INTERPRETED."""
    engine = compiled.SOURCES
    inside = {name: [node.name for node in classes(engine / f"{name}.py")]
              for name in compiled.compiled_modules()}
    owner = {cls: module for module, names in inside.items() for cls in names}
    outside = [p for p in sorted([*ROOT.glob("sapd_nfq/**/*.py"), *ROOT.glob("tests/**/*.py"),
                                  *ROOT.glob("bench/**/*.py")])
               if p.parent != engine or p.name in compiled.INTERPRETED]
    bad = [f"{path.relative_to(ROOT)}: {node.name}({base}) ({owner[base]}.py)"
           for path in outside for node in classes(path) for base in base_names(node) & owner.keys()]
    assert not bad, bad


def test_the_subclass_check_sees_a_subclass():
    node = ast.parse("class Spy(core.Engine, Flow):\n    pass\n").body[0]
    assert isinstance(node, ast.ClassDef) and base_names(node) == {"Engine", "Flow"}
