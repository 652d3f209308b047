"""A redis-server owned by a test (or the benchmark): its own free port and directory, no
persistence, so a test can flush, restart or kill it without touching the shared server.
The Redis twin of :mod:`tests.usage.pgserver`; ``bench/peers.py`` uses it too."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.helpers import free_port, stop


def _pong(port: int) -> bool:
    """Whether the server answers PING (not merely accepts: ``-LOADING`` is not ready)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """``start()``, ``stop()``, ``start()`` again (same ``url``); ``close()`` removes it all.

    As a context manager: started on entry, closed on exit. ``workdir`` (kept on close) is
    where it may write; by default a temp dir of its own (removed on close). ``prefix`` goes
    before the command, e.g. ``["taskset", "-c", "1"]``.
    """

    def __init__(self, *, workdir: Path | None = None, prefix: Sequence[str] = ()) -> None:
        self.port = free_port()
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="chatgate-redis-")) if workdir is None else workdir
        self._prefix = list(prefix)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start it and wait until it answers PING."""
        self.proc = subprocess.Popen(
            [
                *self._prefix,
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not _pong(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server on port {self.port} did not answer PING")
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (``signal.SIGKILL`` for a crash); ``start()`` brings it back, empty."""
        if self.proc is not None:
            stop(self.proc, sig)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
