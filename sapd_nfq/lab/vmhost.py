"""The VMs of vagrant/ on this machine: libvirt with QEMU, in a network namespace of its own.

`VMHost` builds the box (vagrant/build-box.sh) when the tree's box key has changed, builds the
Debian package the gw VM installs (packaging/build-deb.sh, into dist/), starts a libvirtd
inside the namespace `sapd-vms`, runs `vagrant up` there, and on `destroy` removes
the VMs, whatever vagrant-libvirt leaves in libvirt (the box's base volume, the storage pool it
made), stops every process in the namespace and deletes it. Inside the namespace, libvirt's
bridges, dnsmasq and firewall rules never touch the host's network; `leftovers()` compares
the host with how it was found.

Run by hand (as root):

    python -m sapd_nfq.lab.vmhost up       # box, libvirtd, vagrant up; the VMs stay up
    python -m sapd_nfq.lab.vmhost run CMD  # CMD inside the namespace, where the VMs are reached
    python -m sapd_nfq.lab.vmhost down     # vagrant destroy, and the rest
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pyroute2 import IPRoute, netns

from sapd_nfq.lab.topology import LabError, alive, stop_everything_in

NAMESPACE = "sapd-vms"
CACHE = Path(os.environ.get("SAPD_VM_CACHE", "/var/cache/sapd-nfq-vms"))
BOX_NAME = "sapd-nfq/bookworm"
BOX_FILE = "sapd-nfq-bookworm.box"
LIBVIRT = "qemu:///system"
LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")
REQUIRED = ("vagrant", "virsh", "libvirtd", "virtlogd", "qemu-system-x86_64", "debootstrap",
            "mke2fs", "qemu-img", "rsync", "ssh", "ip", "iptables-save")
START_WAIT = 30.0  # seconds for libvirtd to answer
UP_TIMEOUT = 3600  # seconds for `vagrant up`: three emulated VMs, first boot and provisioning
DEB_TIMEOUT = 900  # seconds for the Debian package's build (its build dependencies at the first)
DESTROY_TIMEOUT = 600
BOX_ADD_TIMEOUT = 600


def missing_tools() -> list[str]:
    return [tool for tool in REQUIRED if shutil.which(tool) is None]


class VMHost:
    """The VMs of `vagrant_dir`/Vagrantfile, run here. Step timings go to `timings`."""

    def __init__(self, vagrant_dir: str | os.PathLike[str], *, cache: Path = CACHE,
                 console_dir: Path | None = None, log: Path | None = None) -> None:
        self.vagrant_dir = Path(vagrant_dir).resolve()
        self.cache = cache
        self.console_dir = console_dir
        self.log = log or cache / "vagrant.log"
        self.timings: dict[str, float] = {}
        self._found: dict[str, set[str]] | None = None
        # libvirt's networks, pools and volumes before `up`, kept in the cache for a `destroy`
        # run by another process (`vmhost down`)
        self._libvirt_before = cache / "libvirt-before.json"
        self.env = dict(os.environ, VAGRANT_HOME=str(cache / "home"),
                        VAGRANT_CHECKPOINT_DISABLE="1", VAGRANT_NO_COLOR="1")
        if console_dir is not None:
            self.env["SAPD_VM_CONSOLE_DIR"] = str(console_dir)

    # --- running things in the namespace -------------------------------------------

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the namespace, where libvirt's networks and the VMs are."""
        return ["ip", "netns", "exec", NAMESPACE, *argv]

    def vagrant(self, *args: str, timeout: float, inside: bool = True) -> None:
        """`vagrant ARGS` in vagrant_dir, inside the namespace unless `inside` is false (the
        box store needs no network); its output goes to `log`."""
        argv = ["vagrant", *args]
        with open(self.log, "a") as out:
            out.write(f"\n$ {' '.join(argv)}\n")
            out.flush()
            done = subprocess.run(self.command(argv) if inside else argv, cwd=self.vagrant_dir,
                                  env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout)
        if done.returncode:
            raise LabError(f"vagrant {' '.join(args)} exited {done.returncode}; "
                           f"its output ends:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        text = re.sub(r"[^\n]*\r", "", text)  # progress bars redraw with carriage returns
        return "\n".join(text.splitlines()[-lines:])

    def _timed(self, step: str, started: float) -> None:
        self.timings[step] = round(time.monotonic() - started, 1)

    # --- up -----------------------------------------------------------------------

    def up(self) -> None:
        """Box, libvirtd, `vagrant up`: the three VMs booted and provisioned."""
        problem = missing_tools()
        if problem:
            raise LabError(f"missing {', '.join(problem)} (setup.sh installs them)")
        self.cache.mkdir(parents=True, exist_ok=True)
        # libvirt's QEMU user reads the box's kernel and initrd from the box store.
        self.cache.chmod(0o755)
        self.log.write_text("")
        self._found = self.host_state()
        self.box()
        self.package()
        self.start_libvirt()
        self._libvirt_before.write_text(json.dumps(sorted(self._libvirt_objects())))
        started = time.monotonic()
        self.vagrant("up", timeout=UP_TIMEOUT)
        self._timed("vagrant up", started)

    def box(self) -> None:
        """Build the box if the tree's key has changed since, and add it to vagrant."""
        build = self.vagrant_dir / "build-box.sh"
        key = subprocess.run([str(build), "--key"], capture_output=True, text=True,
                             check=True).stdout.strip()
        box_dir = self.cache / "box"
        if _read(box_dir / "box.key") != key:
            started = time.monotonic()
            with open(self.log, "a") as out:
                done = subprocess.run([str(build), str(box_dir)], stdout=out,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            if done.returncode:
                raise LabError(f"build-box.sh exited {done.returncode}:\n{self.log_tail()}")
            self._timed("box build", started)
        added = self.cache / "home" / "sapd-box.key"
        if _read(added) != key:
            started = time.monotonic()
            self.vagrant("box", "add", "--force", "--name", BOX_NAME, str(box_dir / BOX_FILE),
                         timeout=BOX_ADD_TIMEOUT, inside=False)
            added.write_text(key + "\n")
            self._timed("box add", started)

    def package(self) -> None:
        """Build the Debian package into dist/, where the Vagrantfile's gw installs it from."""
        repository = self.vagrant_dir.parent
        started = time.monotonic()
        with open(self.log, "a") as out:
            done = subprocess.run([str(repository / "packaging" / "build-deb.sh"),
                                   str(repository / "dist")], stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=DEB_TIMEOUT)
        if done.returncode:
            raise LabError(f"build-deb.sh exited {done.returncode}:\n{self.log_tail()}")
        self._timed("deb build", started)

    def start_libvirt(self) -> None:
        """The namespace, and a libvirtd in it (virtlogd beside it) unless ours runs already."""
        if self._libvirt_answers():
            if NAMESPACE not in netns.listnetns():
                raise LabError("a libvirtd is already running outside the namespace "
                               f"{NAMESPACE}: stop it, or run vagrant/ with it as "
                               "vagrant/README.md says")
            return  # ours, left running by `up`
        if NAMESPACE not in netns.listnetns():
            netns.create(NAMESPACE)
        with IPRoute(netns=NAMESPACE) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        # Both daemons fork away and live in the namespace, where `destroy` stops them.
        if not _pids("virtlogd"):
            subprocess.run(self.command(["virtlogd", "-d"]), check=True, stdin=subprocess.DEVNULL)
        # /dev/kvm opens here but its guests hang: libvirtd must not see it. Where it does,
        # it finds KVM usable, QEMU's probe finds it not, and every call that needs QEMU's
        # capabilities probes them again (half a minute each), since the cache never holds.
        subprocess.run(self.command([
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            "mount --bind /dev/null /dev/kvm 2>/dev/null; exec libvirtd -d"]),
            check=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_WAIT
        while not self._libvirt_answers():
            if time.monotonic() > deadline:
                raise LabError(f"libvirtd did not answer within {START_WAIT:.0f} s")
            time.sleep(0.2)

    def _libvirt_answers(self) -> bool:
        return LIBVIRT_SOCKET.exists() and subprocess.run(
            ["virsh", "-c", LIBVIRT, "uri"], capture_output=True, timeout=30).returncode == 0

    # --- destroy --------------------------------------------------------------------

    def destroy(self) -> None:
        """`vagrant destroy -f`, then what it leaves in libvirt, the daemons in the namespace
        and the namespace itself. Nothing to do where the namespace is gone."""
        if NAMESPACE not in netns.listnetns():
            return
        started = time.monotonic()
        try:
            if self._libvirt_answers():
                self.vagrant("destroy", "-f", timeout=DESTROY_TIMEOUT)
                self._remove_libvirt_leftovers()
                self._libvirt_before.unlink(missing_ok=True)
        finally:
            stop_everything_in({NAMESPACE})  # libvirtd and virtlogd, and any QEMU left
            netns.remove(NAMESPACE)
            self._timed("vagrant destroy", started)

    def _remove_libvirt_leftovers(self) -> None:
        """vagrant-libvirt keeps the box's base volume, and the pool it defined, for the next
        `vagrant up` (the box store in the cache does that job here); a `vagrant up` cut
        short can leave a network defined. What was there before `up` stays; without that
        record, everything does."""
        try:
            found = {tuple(entry) for entry in json.loads(self._libvirt_before.read_text())}
        except (OSError, ValueError):
            return
        for network in _virsh_names("net-list", "--all"):
            if ("network", network, "") not in found:
                _virsh("net-destroy", network, check=False)
                _virsh("net-undefine", network)
        for pool in _virsh_names("pool-list", "--all"):
            for volume in _virsh_names("vol-list", pool):
                if ("volume", pool, volume) not in found:
                    _virsh("vol-delete", "--pool", pool, volume)
            if ("pool", pool, "") not in found:
                _virsh("pool-destroy", pool, check=False)
                _virsh("pool-undefine", pool)

    def _libvirt_objects(self) -> set[tuple[str, str, str]]:
        """libvirt's networks, pools and volumes."""
        pools = _virsh_names("pool-list", "--all")
        return {("network", n, "") for n in _virsh_names("net-list", "--all")} | {
            ("pool", p, "") for p in pools} | {
            ("volume", p, v) for p in pools for v in _virsh_names("vol-list", p)}

    # --- what the host looked like -------------------------------------------------

    @staticmethod
    def host_state() -> dict[str, set[str]]:
        """What a run must leave as it found it: the host's firewall, links and namespaces,
        libvirt's definitions and disk images, the processes of QEMU, libvirt and dnsmasq."""
        return {
            "iptables": _lines(["iptables-save"]) | _lines(["ip6tables-save"]),
            "links": _links(),
            "namespaces": set(netns.listnetns()),
            "processes": {str(pid) for name in ("qemu-system-x86_64", "libvirtd", "virtlogd",
                                                "dnsmasq") for pid in _pids(name)},
            "libvirt": {str(p) for p in Path("/etc/libvirt").rglob("*.xml")}
                       | {str(p) for p in Path("/var/lib/libvirt/images").glob("*")},
        }

    def leftovers(self) -> dict[str, set[str]]:
        """What differs from the host as `up` found it: {kind: entries added or removed}."""
        if self._found is None:
            return {}
        now = self.host_state()
        return {kind: self._found[kind] ^ now[kind] for kind in now
                if self._found[kind] != now[kind]}


def _links() -> set[str]:
    with IPRoute() as ipr:
        return {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


def _lines(argv: list[str]) -> set[str]:
    """A command's output lines, iptables-save's comments and counters left out."""
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return {re.sub(r"\[\d+:\d+\]", "", line) for line in out.splitlines()
            if not line.startswith("#")}


def _pids(name: str) -> set[int]:
    """The running processes of a name (the kernel keeps 15 characters of it)."""
    done = subprocess.run(["pgrep", "-x", name[:15]], capture_output=True, text=True)
    return {int(pid) for pid in done.stdout.split() if alive(int(pid))}


def _virsh(*args: str, check: bool = True) -> str:
    return subprocess.run(["virsh", "-c", LIBVIRT, *args], capture_output=True, text=True,
                          check=check, timeout=60).stdout


def _virsh_names(*args: str) -> set[str]:
    """Names from a virsh listing (`list`, `net-list`, `pool-list`, `vol-list POOL`)."""
    argv = [*args, "--name"] if args[0] != "vol-list" else [*args]
    out = _virsh(*argv)
    if args[0] == "vol-list":  # " Name  Path" table: the first column
        return {line.split()[0] for line in out.splitlines()[2:] if line.strip()}
    return {line.strip() for line in out.splitlines() if line.strip()}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    vagrant_dir = Path(__file__).resolve().parents[2] / "vagrant"
    host = VMHost(vagrant_dir)
    if args == ["up"]:
        host.up()
        print(f"up: {host.timings}; reach the VMs with: python -m sapd_nfq.lab.vmhost run CMD")
    elif args == ["down"]:
        host.destroy()
    elif args[:1] == ["run"] and len(args) > 1:
        return subprocess.run(host.command(args[1:]), cwd=vagrant_dir, env=host.env).returncode
    else:
        print("usage: python -m sapd_nfq.lab.vmhost up | down | run CMD...", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
