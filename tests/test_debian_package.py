"""The Debian package: built by packaging/build-deb.sh (as root: it installs the build
dependencies from Debian), then read without installing it: what `dpkg -c` lists, that
`dpkg -I` depends on Debian's packages alone, that lintian finds nothing it does not
accept with a reason (debian/sapd-nfq.lintian-overrides), and that the command runs from
the unpacked files with the bundled netfilterqueue. Installing it is the VMs' part
(tests/lab/test_vms_lab.py).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 900  # seconds: a first build installs the build dependencies

# What the package must hold, beside sapd_nfq's modules.
EXPECTED = {
    "./usr/sbin/sapd-nfq": "-rwxr-xr-x",
    "./etc/sapd-nfq/sapd-nfq.toml": "-rw-------",
    "./lib/systemd/system/sapd-nfq.service": "-rw-r--r--",
    "./usr/lib/sysusers.d/sapd-nfq.conf": "-rw-r--r--",
    "./usr/lib/tmpfiles.d/sapd-nfq.conf": "-rw-r--r--",
    "./usr/libexec/sapd-nfq/sapd-nfq-postlogin": "-rwxr-xr-x",
    "./usr/lib/sapd-nfq/netfilterqueue/__init__.py": "-rw-r--r--",
    "./usr/share/sapd-nfq/rules/sapd-nfq.rules.in": "-rw-r--r--",
    "./usr/share/sapd-nfq/rules/queue-chain.rules.in": "-rw-r--r--",
    "./usr/share/doc/sapd-nfq/copyright": "-rw-r--r--",
    "./usr/lib/python3/dist-packages/sapd_nfq/cli.py": "-rw-r--r--",
    "./usr/lib/python3/dist-packages/sapd_nfq/kernel/worker.py": "-rw-r--r--",
}


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    if os.geteuid() != 0:
        pytest.skip("building the package needs root (build-deb.sh installs its build dependencies)")
    out = tmp_path_factory.mktemp("deb")
    done = subprocess.run([str(ROOT / "packaging" / "build-deb.sh"), str(out)], capture_output=True,
                          text=True, timeout=BUILD_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]
    return Path(done.stdout.strip().splitlines()[-1])


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_package_is_named_for_its_version(deb):
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert deb.name == f"sapd-nfq_{version}_amd64.deb"
    assert _field(deb, "Version") == version


def test_the_package_holds_the_command_unit_config_hook_and_netfilterqueue(deb):
    listing = subprocess.run(["dpkg", "-c", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    modes = {line.split()[-1]: line.split()[0] for line in listing.splitlines()}
    assert {path: modes.get(path) for path in EXPECTED} == EXPECTED
    assert any(re.fullmatch(r"\./usr/lib/sapd-nfq/netfilterqueue/_impl\.cpython-\d+-.*\.so", p)
               for p in modes)
    assert not [p for p in modes if "/tests/" in p or "scapy" in p]
    conffiles = subprocess.run(["dpkg-deb", "--info", str(deb), "conffiles"], capture_output=True,
                               text=True, check=True).stdout.split()
    assert conffiles == ["/etc/sapd-nfq/sapd-nfq.toml"]


def test_the_package_depends_on_debian_packages_alone(deb):
    names = {re.split(r"[ (:]", alternative.strip())[0]
             for dep in _field(deb, "Depends").split(",") for alternative in dep.split("|")}
    assert {"iptables", "python3-pyroute2", "python3-prometheus-client", "libnetfilter-queue1"} <= names
    assert not [name for name in names if "scapy" in name or "netfilterqueue" in name]
    # `apt install ./sapd-nfq_*.deb`, simulated: whatever it would add comes from Debian
    done = subprocess.run(["apt-get", "install", "--simulate", "--no-install-recommends", str(deb)],
                          capture_output=True, text=True, env=dict(os.environ, LC_ALL="C"))
    assert done.returncode == 0, done.stdout + done.stderr
    added = [line for line in done.stdout.splitlines() if line.startswith("Inst ")]
    assert [line for line in added if not line.startswith("Inst sapd-nfq ")
            and " Debian:" not in line] == [], done.stdout


def test_lintian_accepts_the_package(deb):
    # errors and warnings fail; debian/sapd-nfq.lintian-overrides says why each accepted one is
    done = subprocess.run(["lintian", "--fail-on", "error,warning", str(deb)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_unpacked_command_runs_with_the_bundled_netfilterqueue(deb, tmp_path):
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp_path)], check=True)
    private = tmp_path / "usr" / "lib" / "sapd-nfq"
    public = tmp_path / "usr" / "lib" / "python3" / "dist-packages"
    code = ("import sys; sys.path[:0] = sys.argv[1:3]; import netfilterqueue, sapd_nfq.kernel.worker; "
            "print(netfilterqueue.__file__); print(sapd_nfq.kernel.worker.__file__)")
    done = subprocess.run([sys.executable, "-I", "-c", code, str(private), str(public)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(private / "netfilterqueue" / "__init__.py"),
                                   str(public / "sapd_nfq" / "kernel" / "worker.py")]
