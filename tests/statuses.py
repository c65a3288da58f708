"""A worker's status with every field filled in, for the tests of the
status's readers (the CLI, the metrics) and of its JSON."""

from sapd_nfq.admin.report import EngineSeconds, LearnerStatus, ReceiveStatus, WorkerStatus
from sapd_nfq.admin.stats import ENGINE_BUCKETS

WORKER = WorkerStatus(
    pid=42, started=1000.0, queue=0, mode="forward", config="/etc/sapd-nfq/sapd-nfq.toml",
    virtusertable="/etc/mail/virtusertable", postfix_maps=("hash:/etc/postfix/virtual",),
    virtusertable_entries=3, flows_tracked=1, flows_evicted=0, logins_held=1,
    logins_by_source={"pop3": 1},
    store={"backend": "sqlite", "connected": True, "pending_writes": 0, "last_error": None},
    decisions={"pass": 1, "fail": 0}, counters={"packets": 9, "pass": 1}, retained_bytes=0,
    reloads=0, reload_errors=0,
    login_logs=LearnerStatus(files=("/var/log/dovecot.log",), lines=7, logins=1, sessions=1),
    last_reload_error=None, verdicts={"accept": 9}, rows={"pass|row 2: ...": 1}, logins={"pop3": 1},
    engine_seconds=EngineSeconds(buckets=(9,) + (0,) * len(ENGINE_BUCKETS), sum=1e-4, bounds=ENGINE_BUCKETS),
    receive=ReceiveStatus(gso=True, overruns=0, cut=0, batches=3, verdict_errors=1), engine="compiled")
