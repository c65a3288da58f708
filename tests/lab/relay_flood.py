"""Relay attempts from client addresses that never logged in, until SIGTERM.

Run inside the lab's client namespace (`lab.spawn("client", ...)`), one
thread per source address, each opening session after session: EHLO, MAIL
FROM a local sender, RCPT TO an external recipient, QUIT. One JSON line per
attempt goes to stdout: the source, the outcome ("refused" for the gate's
550 telling the user to log in, "relayed" if the RCPT was accepted, else "error") and the time it
took. A separate process, so that the test's own thread keeps its namespace.
"""

from __future__ import annotations

import argparse
import json
import signal
import smtplib
import sys
import threading
import time
import uuid


def attempt(server: str, source: str, sender: str, timeout: float) -> str:
    recipient = f"flood-{uuid.uuid4().hex[:10]}@external.example"
    try:
        smtp = smtplib.SMTP(server, 25, source_address=(source, 0), timeout=timeout,
                            local_hostname="flood.lab.example")
    except (OSError, smtplib.SMTPException):
        return "error"
    try:
        smtp.ehlo("flood.lab.example")
        code, text = smtp.mail(sender)
        if code == 250:
            code, text = smtp.rcpt(recipient)
    except (OSError, smtplib.SMTPException):
        return "error"
    finally:
        smtp.close()  # no QUIT: the gate resets a refused session
    if code == 250:
        return "relayed"
    return "refused" if code == 550 and b"log in" in text.lower() else "error"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", required=True)
    parser.add_argument("--sender", required=True)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("sources", nargs="+")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    lock = threading.Lock()

    def run(source: str) -> None:
        while not stop.is_set():
            started = time.monotonic()
            outcome = attempt(args.server, source, args.sender, args.timeout)
            line = json.dumps({"source": source, "outcome": outcome,
                               "seconds": round(time.monotonic() - started, 4)})
            with lock:
                print(line, flush=True)

    threads = [threading.Thread(target=run, args=(s,)) for s in args.sources]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        for thread in threads:
            thread.join(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
