"""Listing a lab's processes while they exit: a process gone is not listed, never an error."""
import errno
import os
from pathlib import Path

from sapd_nfq.lab import topology


def test_a_process_that_exits_while_proc_is_read_is_left_out(tmp_path, monkeypatch):
    run = tmp_path / "netns"
    run.mkdir()
    (run / "lab-gw").write_text("")
    monkeypatch.setattr(topology.netns, "NETNS_RUN_DIR", str(run))
    inside = os.stat(run / "lab-gw")
    gone, ours, elsewhere = "4001", "4002", "4003"
    real_stat = os.stat

    def stat(path, *args, **kw):
        path = str(path)
        if path == f"/proc/{gone}/ns/net":  # the kernel's answer for a task that has exited
            raise ProcessLookupError(errno.ESRCH, os.strerror(errno.ESRCH))
        if path == f"/proc/{ours}/ns/net":
            return inside
        if path == f"/proc/{elsewhere}/ns/net":
            return real_stat(tmp_path)
        return real_stat(path, *args, **kw)

    monkeypatch.setattr(topology.os, "listdir",
                        lambda path: [gone, ours, elsewhere, "self"] if path == "/proc" else [])
    monkeypatch.setattr(topology.os, "stat", stat)
    assert topology._pids_in({"lab-gw", "lab-absent"}) == [int(ours)]


def test_the_processes_of_a_namespace_are_found_by_its_file(tmp_path, monkeypatch):
    monkeypatch.setattr(topology.netns, "NETNS_RUN_DIR", str(tmp_path))
    (tmp_path / "mine").symlink_to(Path(f"/proc/{os.getpid()}/ns/net"))
    assert os.getpid() in topology._pids_in({"mine"})


def test_down_signals_again_what_forked_while_the_lab_came_down(monkeypatch):
    lab = topology.Lab("sapdx")
    monkeypatch.setattr(topology.netns, "listnetns", lambda: ["sapdx-gw"])
    monkeypatch.setattr(topology.netns, "remove", lambda name: None)
    listings = iter([[101, 102], [103], []])  # 103: forked by 101 before it got SIGTERM
    monkeypatch.setattr(topology, "_pids_in", lambda names: next(listings))
    signalled: list[list[int]] = []
    monkeypatch.setattr(topology, "_terminate", signalled.append)
    lab.down()
    assert signalled == [[101, 102], [103]]
