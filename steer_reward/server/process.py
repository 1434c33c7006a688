"""A reward server in a child process on a loopback port: for tests, benchmarks and examples.

The child is always killed on ``stop`` (and on leaving the ``with`` block), even when it never became healthy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["free_port", "ServerProcess"]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m steer_reward.cli serve ARGS --host 127.0.0.1 --port PORT`` (or any ``command``) as a child.

    >>> with ServerProcess(["--model", "demo"]) as server:  # doctest: +SKIP
    ...     print(server.url)
    http://127.0.0.1:40123
    """

    def __init__(self, serve_args: Sequence[str] = (), port: int | None = None, env: Mapping[str, str] | None = None,
                 startup_timeout_s: float = 180.0, log_path: str | Path | None = None,
                 command: Sequence[str] | None = None, stop_timeout_s: float = 15.0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = list(command) if command is not None else [
            sys.executable, "-m", "steer_reward.cli", "serve", *serve_args, "--host", "127.0.0.1",
            "--port", str(self.port)]
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self._log = None

    def start(self) -> "ServerProcess":
        if self.log_path:
            self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command, env=self.env, stdout=self._log or subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT if self._log else subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode} before answering "
                                   f"/health; log: {self.log_path or 'not kept'}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer /health within {self.startup_timeout_s} s")

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux ``/proc``)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/PID/status")

    def open_fds(self) -> int:
        """Open file descriptors of the server process (sockets included; Linux ``/proc``)."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def kill(self) -> None:
        """SIGKILL, no clean shutdown: what a crash looks like to clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
