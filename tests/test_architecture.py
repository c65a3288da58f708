"""The tree's rules, checked: the engine is pure, the login backends depend
on the engine's interface and never on each other, each adapter group
imports only the groups it serves, and the whole package passes mypy --strict
and the whole tree passes ruff.

The import rules read each module's source (every `import`, at any depth,
relative ones resolved), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sapd_nfq"

#: what no engine module may import: I/O, the kernel, the network, processes,
#: stores, log handlers, concurrency
FORBIDDEN_IN_ENGINE = {
    "socket", "ssl", "select", "selectors", "asyncio", "threading", "multiprocessing",
    "subprocess", "signal", "netfilterqueue", "fnfqueue", "pyroute2", "redis", "sqlite3",
    "logging", "urllib", "http", "fcntl", "ctypes", "scapy.sendrecv", "scapy.arch",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, as absolute dotted names (for
    `from pkg import name`, both pkg and pkg.name: name may be a module)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()  # a module's relative imports start from its package
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: list[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def modules(sub: str) -> list[Path]:
    found = sorted((PACKAGE / sub).rglob("*.py"))
    assert found, sub
    return found


@pytest.mark.parametrize("path", modules("engine"), ids=lambda p: p.name)
def test_engine_imports_nothing_impure(path):
    bad = sorted(name for name in imports(path)
                 if any(within(name, f) for f in FORBIDDEN_IN_ENGINE)
                 or within(name, "sapd_nfq") and not within(name, "sapd_nfq.engine"))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", modules("logins"), ids=lambda p: p.name)
def test_login_backends_depend_on_the_interface_only(path):
    """A backend imports the engine's interface and its own driver; only the
    package's opener names the backends, and it imports them lazily."""
    tree = ast.parse(path.read_text())
    first_party = {n for n in imports(path) if within(n, "sapd_nfq")}
    outside = sorted(n for n in first_party
                     if not (within(n, "sapd_nfq.engine") or within(n, "sapd_nfq.logins")))
    assert not outside, f"{path.name} imports adapters {outside}"
    siblings = {n for n in first_party if within(n, "sapd_nfq.logins") and n != "sapd_nfq.logins"}
    if path.name == "__init__.py":
        top_level = {module_name(path) + "." + a.name for node in tree.body
                     if isinstance(node, ast.ImportFrom) and node.level == 1 for a in node.names}
        assert not top_level, "the opener must import backends only when a spec names them"
    else:
        assert not siblings, f"{path.name} imports another backend: {sorted(siblings)}"


def test_the_checker_sees_a_forbidden_import():
    """The rule can fail: a module that imports socket lazily is caught."""
    found = imports_in("def f():\n    import socket\n    from ..kernel.worker import Worker\n",
                       ["sapd_nfq", "engine"])
    assert "socket" in found and "sapd_nfq.kernel.worker" in found


#: group -> the first-party packages its modules may not import, and why
GROUP_RULES = {
    # the operator's side reaches workers only through the control socket
    "admin": ("sapd_nfq.kernel.worker", "sapd_nfq.kernel.supervise", "sapd_nfq.learners",
              "sapd_nfq.lab", "sapd_nfq.cli"),
    # a learner's only output is a login in the store
    "learners": ("sapd_nfq.kernel", "sapd_nfq.admin", "sapd_nfq.lab", "sapd_nfq.cli"),
    # the wiring builds parts; it never runs them
    "wiring": ("sapd_nfq.kernel.worker", "sapd_nfq.kernel.supervise", "sapd_nfq.admin",
               "sapd_nfq.learners", "sapd_nfq.lab", "sapd_nfq.cli"),
    "kernel": ("sapd_nfq.lab", "sapd_nfq.cli"),
}


def group_violations(group: str, module: str, found: set[str]) -> list[str]:
    """What `module` of `group` imports against the group's rule; outside lab/,
    only the CLI may import the lab."""
    banned = GROUP_RULES.get(group, ())
    bad = [n for n in found if any(within(n, b) for b in banned)]
    if group != "lab" and module != "sapd_nfq.cli":
        bad += [n for n in found if within(n, "sapd_nfq.lab")]
    return sorted(set(bad))


def group_modules() -> list[tuple[str, Path]]:
    return [(path.relative_to(PACKAGE).parts[0] if len(path.relative_to(PACKAGE).parts) > 1 else "",
             path) for path in sorted(PACKAGE.rglob("*.py"))
            if path.relative_to(PACKAGE).parts[0] not in ("engine", "logins")]


@pytest.mark.parametrize(("group", "path"), group_modules(),
                         ids=lambda v: str(v.relative_to(PACKAGE)) if isinstance(v, Path) else v)
def test_each_group_imports_only_what_it_serves(group, path):
    bad = group_violations(group, module_name(path), imports(path))
    assert not bad, f"{path.relative_to(ROOT)} ({group or 'top level'}) imports {bad}"


@pytest.mark.parametrize(("group", "scratch"), [
    ("admin", "from ..kernel.worker import Worker"),
    ("learners", "from ..kernel import rules"),
    ("wiring", "from ..admin.status import gather_status"),
    ("kernel", "from .. import cli"),
    ("admin", "from ..lab import Lab"),
])
def test_each_group_rule_can_fail(group, scratch):
    found = imports_in(f"def f():\n    {scratch}\n", ["sapd_nfq", group])
    assert group_violations(group, f"sapd_nfq.{group}.scratch", found)


def tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not installed: pip install -e '.[dev]' (setup.sh does)")
    return found


def test_the_daemon_runs_without_scapy():
    # the packets it injects are packed with struct: scapy (30 MB) is for tests only
    code = ("import sys, sapd_nfq.kernel.worker, sapd_nfq.cli; "
            "loaded = [m for m in sys.modules if m.split('.')[0] == 'scapy']; "
            "sys.exit(f'scapy loaded: {loaded}' if loaded else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_cli_imports_without_the_libraries_of_the_kernel_side():
    """Another user runs `sapd-nfq` with the system's python3 (tests/lab/test_local_users_lab.py),
    which has none of them: only a command that binds, installs or builds a lab may load them."""
    code = ("import sys; sys.modules.update(dict.fromkeys(('pyroute2', 'netfilterqueue', 'scapy'))); "
            "import sapd_nfq.cli")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_mypy_strict_on_the_package():
    # the files and the strictness come from [tool.mypy] in pyproject.toml
    result = subprocess.run([tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_on_the_whole_tree():
    # the rule set is [tool.ruff.lint] in pyproject.toml
    result = subprocess.run([tool("ruff"), "check", "sapd_nfq", "tests", "bench"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
