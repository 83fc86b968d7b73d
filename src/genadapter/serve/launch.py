"""Run the service as a child process on a free loopback port (tests and benchmarks use this)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m genadapter.serve` on 127.0.0.1; `with ServerProcess(...) as server: server.url`.

    Requests need a key of the database (`SQLiteStore(db).create_key(...)` before start) unless `no_auth`;
    `extra_args` go to the command line as they are."""

    def __init__(
        self,
        db: str | Path,
        base: str | Path | None = None,
        generator: str | Path | None = None,
        config: dict | None = None,
        log_path: str | Path | None = None,
        threads: int = 1,
        startup_timeout_s: float = 120.0,
        no_auth: bool = False,
        extra_args: Sequence[str] = (),
    ):
        self.db, self.base, self.generator = db, base, generator
        self.config = config or {}
        self.threads = threads
        self.no_auth = no_auth
        self.extra_args = list(extra_args)
        self.startup_timeout_s = startup_timeout_s
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="genadapter-serve-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "genadapter.serve", "--host", HOST, "--port", str(self.port)]
        command += ["--db", str(self.db), "--config", json.dumps(self.config), "--threads", str(self.threads)]
        command += ["--log-level", "warning"]
        if self.base is not None:
            command += ["--base", str(self.base)]
        if self.generator is not None:
            command += ["--generator", str(self.generator)]
        if self.no_auth:
            command.append("--no-auth")
        return command + self.extra_args

    def start(self) -> ServerProcess:
        for _ in range(3):  # another process may take the free port before the server binds it
            self.port = free_port()
            with open(self.log_path, "ab") as log:
                env = {**os.environ, "HF_HUB_OFFLINE": "1"}
                self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
            if self._wait_ready():
                return self
            if "address already in use" not in self.log_tail().lower():
                break
        self.stop()
        raise RuntimeError(f"the server did not start; its log ends with:\n{self.log_tail()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout_s
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    return False
                try:
                    if client.get(f"{self.url}/healthz").status_code == 200:
                        return True
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        return False

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (a crash, as far as the server can tell)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
