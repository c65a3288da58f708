"""The benchmark's own code, on loopback: it imports, parses its arguments, and its
responder, relay and clients talk to each other. No timing is asserted: benchmarks
are not tests (the figures come from `python -m bench`, in the lab)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench/ sits beside the package, not installed with it

from bench import load, relay, responder, run  # noqa: E402

VIRTUSERTABLE = REPO / "sapd_nfq/lab/provision/virtusertable"
LOOPBACK = "127.0.0.1"


def test_arguments() -> None:
    quick = run.make_plan(run.parse_args(["--quick"]))
    assert quick.reps == 1 and quick.paths == run.PATHS
    plan = run.make_plan(run.parse_args(["--reps", "2", "--paths", "relay,nofilter",
                                         "--no-alternatives"]))
    assert plan.reps == 2 and plan.paths == ("nofilter", "relay") and not plan.alternatives
    # per repetition and path: 3 POP3 and 3 upload runs with offloads off and on, 2 session
    # loads; the relay's two refusal loads; relay's memory
    assert run.total_steps(plan) == 2 * 2 * (2 * (3 + 3) + 2) + 2 * 2 + 3
    with pytest.raises(SystemExit):
        run.parse_args(["--paths", "nofilter,bogus"])
    args = load.parse_args(["sessions", "--server", LOOPBACK, "--port", "25",
                            "--sources", "198.18.3.10,198.18.3.11", "--concurrency", "64"])
    assert args.concurrency == 64 and args.sources.split(",") == ["198.18.3.10", "198.18.3.11"]


def test_message_text_and_replies() -> None:
    text = load.message_text(10_000)
    assert len(text) == 10_000 + 3 and text.endswith(b"\r\n.\r\n")
    assert not any(line.startswith(b".") for line in text.split(b"\r\n")[:-2])
    assert load._final_reply(b"250-a\r\n250 b\r\n")
    assert not load._final_reply(b"250-a\r\n250-b\r\n")
    assert not load._final_reply(b"250 partial")
    assert load.percentiles([0.001] * 99 + [0.1]) == {"n": 100, "p50_ms": 1.0, "p99_ms": 1.0}


@pytest.fixture
def relayed() -> Iterator[dict]:
    """The responder and, in front of it, the relay, on loopback ports of their own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[list, relay.Relay, list]:
        servers = await responder.serve(LOOPBACK, 0, 0, messages=3, size=20_000)
        smtp, pop3 = (s.sockets[0].getsockname()[1] for s in servers)
        gate = relay.make_relay(VIRTUSERTABLE, (LOOPBACK, smtp), (LOOPBACK, pop3))
        listeners = await gate.listen(LOOPBACK, 0, 0)
        return servers, gate, listeners

    servers, gate, listeners = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    ports = [s.sockets[0].getsockname()[1] for s in servers + listeners]
    yield {"smtp": ports[0], "pop3": ports[1], "relay_smtp": ports[2], "relay_pop3": ports[3],
           "relay": gate}

    async def stop() -> None:
        for server in servers + listeners:
            server.close()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_responder_direct(relayed: dict) -> None:
    got = load.pop3_retrieve(LOOPBACK, relayed["pop3"], "bob", "pw")
    assert got["messages"] == 3 and got["bytes"] > 3 * 20_000
    sent = load.smtp_upload(LOOPBACK, relayed["smtp"], 2, 50_000, "x@external.example",
                            "y@external.example", None, None, None)
    assert sent["messages"] == 2


def test_relay_carries_sessions_and_bulk(relayed: dict) -> None:
    result = load.run_sessions(LOOPBACK, relayed["relay_smtp"], [LOOPBACK], concurrency=4,
                               duration=0.3, warmup=0.05)
    assert result["sessions_total"] > 0 and not result["errors"]
    assert result["command"]["n"] > 0
    got = load.pop3_retrieve(LOOPBACK, relayed["relay_pop3"], "bob", "pw")
    assert got["messages"] == 3
    # The POP3 login above lets this address relay: row 2 of the table.
    sent = load.smtp_upload(LOOPBACK, relayed["relay_smtp"], 1, 100_000, "alice@lab.example",
                            "dave@external.example", None, None, None)
    assert sent["bytes"] == 100_000


def test_relay_attempts_count_once_refused(relayed: dict) -> None:
    refused = load.run_sessions(LOOPBACK, relayed["relay_smtp"], [LOOPBACK], concurrency=4,
                                duration=0.3, warmup=0.05, relay=True)
    assert refused["sessions_total"] > 0 and not refused["errors"]
    assert relayed["relay"].refused >= refused["sessions_total"]
    # straight to the responder, which relays for anyone: each attempt is an error
    open_relay = load.run_sessions(LOOPBACK, relayed["smtp"], [LOOPBACK], concurrency=2,
                                   duration=0.2, warmup=0.05, relay=True)
    assert open_relay["sessions_total"] == 0
    assert set(open_relay["errors"]) == {"5 expected, got 250"}


def test_relay_refuses_what_the_table_fails(relayed: dict) -> None:
    with pytest.raises(load.BenchError, match="550"):
        load.smtp_upload(LOOPBACK, relayed["relay_smtp"], 1, 1000, "mallory@external.example",
                         "dave@external.example", None, None, None)
    assert relayed["relay"].refused == 1


def test_hold_opens_sessions(relayed: dict) -> None:
    held: list = []
    opened = load.open_sessions(LOOPBACK, relayed["smtp"], [LOOPBACK], 20, held)
    assert opened == {"open": 20, "errors": {}}
    for sock in held:
        sock.close()


def test_results_summary_and_plot(tmp_path: Path) -> None:
    plan = run.Plan.quick()

    def bulk(mb: float) -> dict:
        return {"bytes": int(mb * 1e6), "seconds": 1.0, "path_cpu_ms_per_mb": 1.0}

    def sessions(rate: float, per_packet: float = 10.0) -> dict:
        return {"sessions_per_s": rate, "command": {"p50_ms": 1.0, "p99_ms": 2.0},
                "path_cpu_us_per_session": 100.0, "path_cpu_us_per_packet": per_packet,
                "path_user_us_per_packet": per_packet / 2, "errors": {}}

    raw = {"pop3": {p: [bulk(100)] for p in run.PATHS},
           "upload": {p: [bulk(50), {"error": "x"}] for p in run.PATHS},
           "pop3_offloads": {p: [bulk(100)] for p in run.PATHS},
           "upload_offloads": {p: [{**bulk(120 if p == "sapd" else 80), "queued_packets": 2400}]
                               for p in run.PATHS},
           "memory": {"sapd": [{"flows": f, "rss_mb": 20 + f / 1000} for f in plan.flows]},
           "scaling": {"sapd": {"1": [sessions(100)],
                                "2": [{**sessions(150), "path_cpu_us_per_session": 120.0}]}}}
    for c in plan.concurrency:
        raw[f"sessions_{c}"] = {p: [sessions(1000, 25.0 if p == "sapd" else 10.0)] for p in run.PATHS}
    raw["refusals"] = {p: [sessions(900)] for p in run.REFUSING}
    raw["flood"] = {p: [{**sessions(800), "command": {"p50_ms": 1.0, "p99_ms": 3.0}}]
                    for p in run.REFUSING}
    summary = run.summarise(raw, plan)
    assert summary["upload_mb_s"]["sapd"]["n"] == 1  # the failed run is left out
    ratios = run.headline(summary, raw, plan)
    assert ratios["pop3_retr_ratio_vs_nofilter"] == 1.0
    assert ratios["workers2_cpu_per_session_ratio"] == 1.2
    assert ratios["session_cpu_ratio_vs_relay"] == 1.0 and ratios["sessions_ratio_vs_relay"] == 1.0
    assert ratios["packet_cpu_ratio_vs_floor"] == 2.5
    assert ratios["refusal_rate_ratio_vs_pass"] == 0.9
    assert ratios["p99_rtt_ratio_under_refusal_flood"] == 1.5
    assert ratios["smtp_upload_ratio_vs_floor_offloads_on"] == 1.5
    assert summary["upload_offloads_packets_per_mb"]["sapd"]["median"] == 20
    checked = run.targets(ratios)
    assert checked["rss_mb_10k_flows"] == {"value": 30.0, "target": "<= 44", "met": True}
    assert checked["workers2_cpu_per_session_ratio"]["met"] is False
    results = {"summary": summary, "raw": raw, "targets": checked, "failures": [],
               "plan": {"paths": run.PATHS, "concurrency": plan.concurrency,
                        "scaling_concurrency": 64},
               "mode": "quick", "date": "today",
               "machine": {"cpus": 2, "cpu_model": "cpu", "kernel": "k", "python": "3"}}
    table = run.format_table(results)
    assert "| POP3 RETR, offloads off, MB/s" in table and "| relay attempts refused/s, 64" in table
    assert "| SMTP upload, offloads on, MB/s" in table and "| smtp_upload_ratio_vs_floor_offloads_on | 1.50" in table
    json.dumps(results)
    plot = pytest.importorskip("bench.plot")
    plot.plot(results, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG")


def test_the_engine_micro_benchmark_replays_a_whole_data_phase() -> None:
    from bench import engine_micro

    packets, start, end = engine_micro.record()
    assert end - start == engine_micro.SEGMENTS * 3 // 2
    assert engine_micro.replay(packets, start, end) > 0
