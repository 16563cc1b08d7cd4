"""A ``bentoml serve`` of the medattn service as a child process: start, wait until ready, stop or kill.

A test harness, not part of the library: used by the end-to-end tests (``from tests.server_process
import ServerProcess``; the repo root is on pytest's path) and by ``benchmarks/serving_benchmark.py``.
It runs the same command as ``medattn serve``. BentoML's arbiter (circus) gives each worker a
session of its own, so stopping means walking the process tree, not just signalling the arbiter.
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx
import psutil

from medattn.serving.settings import bentoml_serve_command

READY_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """One ``bentoml serve`` (arbiter + service processes) in its own process group."""

    env: dict[str, str]
    log_path: Path
    repo_root: Path  # the service is imported as serving.service from here
    port: int = field(default_factory=free_port)
    process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerProcess":
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(bentoml_serve_command("127.0.0.1", self.port), cwd=self.repo_root,
                                            env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S, probe: str = "/readyz") -> None:
        """Until ``probe`` answers 200 (``/livez``: the process is up, model or not)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}{probe}", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def processes(self) -> list[psutil.Process]:
        """The arbiter and every worker (circus puts workers in sessions of their own)."""
        if self.process is None:
            return []
        try:
            arbiter = psutil.Process(self.process.pid)
            return [arbiter, *arbiter.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILL the arbiter and all its workers at once: no shutdown code runs anywhere."""
        self._kill_and_reap(self.processes())
        self._wait_port_closed()

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL whatever is left after 30 s."""
        victims = self.processes()
        if not victims:
            return
        victims[0].terminate()
        _, alive = psutil.wait_procs(victims, timeout=30)
        self._kill_and_reap(alive)

    def _kill_and_reap(self, victims: list[psutil.Process]) -> None:
        """SIGKILL ``victims``, wait for them, then reap the arbiter (our own child)."""
        for proc in victims:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=30)
        if self.process is not None:
            self.process.wait(timeout=30)

    def _wait_port_closed(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)

    def log_tail(self, n_chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-n_chars:] if self.log_path.exists() else ""
