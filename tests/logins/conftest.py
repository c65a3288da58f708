"""A real redis-server for the store tests: on a unix socket (no TCP port),
started and stopped by the test, as the replica's faults need."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

START_TIMEOUT = 10.0


class RedisServer:
    """redis-server on `sock`: start, kill, pause (SIGSTOP), resume, and start
    again on the same socket. `args` are more of its options."""

    def __init__(self, sock: Path, *args: str) -> None:
        self.sock = sock
        self.args = args
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self) -> RedisServer:
        assert self.proc is None
        self.sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen([self.binary(), "--port", "0", "--unixsocket", str(self.sock),
                                      "--save", "", "--appendonly", "no", *self.args],
                                     stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():  # the socket file appears before the server listens
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on {self.sock}")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        import redis

        try:
            with redis.Redis(unix_socket_path=str(self.sock), socket_timeout=1.0) as client:
                client.ping()
        except redis.AuthenticationError:
            return True  # listening; it wants a user
        except redis.RedisError:
            return False
        return True

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    @staticmethod
    def binary() -> str:
        server = shutil.which("redis-server")
        if server is None:
            if os.environ.get("CI") == "true":
                pytest.fail("redis-server not found (CI=true: a missing capability is a failure)")
            pytest.skip("redis-server not found (apt-get install redis-server)")
        pytest.importorskip("redis")
        return server


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """One server for the whole session, for tests that need it only to be there."""
    server = RedisServer(tmp_path_factory.mktemp("redis") / "redis.sock").start()
    yield server.url
    server.stop()


@pytest.fixture
def redis_server(tmp_path_factory):
    """A server of the test's own, to kill, pause and restart (not started)."""
    # a short directory: a unix socket's path has room for 107 bytes
    server = RedisServer(tmp_path_factory.mktemp("redis") / "redis.sock")
    yield server
    server.stop()
