"""Start the provider and the service together, each in its own uvicorn process.

    python -m examples.payments_http.run --data payments-http-data [--port 8000]

The provider keeps its ledger in ``DATA/provider.db``, the service its state in
``DATA/service/payments.db``; Ctrl-C stops both. To see a crash, kill -9 the service process
(its pid is printed) and run the service alone again with the same data directory (the command is
printed too): pending charges are re-sent under their idempotency keys and nothing is charged
twice.

The :class:`Server` helper it uses is also how the tests and bench/bench_http.py run the two
processes: free ports on 127.0.0.1, a readiness check on a URL, SIGKILL, and a stop that always
reaps the child.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx

ROOT = Path(__file__).resolve().parents[2]

__all__ = ("Server", "free_port", "provider_server", "service_server")


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (bind to port 0, then release)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One uvicorn app in a child process: ``start``, ``kill`` (SIGKILL), ``stop`` (SIGTERM,
    then SIGKILL after ``grace`` seconds). A context manager stops it on exit, whatever happened.

    Args:
        args: the ``python -m`` arguments (module and its options, without ``--port``).
        port: the port (default: a free one, kept across restarts).
        ready_path: the path that answers 200 once the app has started.
        log: a file that collects the child's stdout and stderr (appended across restarts).
    """

    def __init__(self, args: list[str], *, port: int | None = None, ready_path: str = "/health",
                 log: Path | None = None) -> None:
        self.args = args
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ready_path = ready_path
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def start(self, *, timeout: float = 30.0) -> Self:
        """Start the process and wait until it answers ``ready_path``.

        Raises:
            RuntimeError: it exited, or did not answer within ``timeout`` seconds (it is
                stopped first).
        """
        if self.log is not None and self._log_file is None:
            self._log_file = self.log.open("ab")
        out = self._log_file if self._log_file is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *self.args, "--port", str(self.port)], cwd=ROOT,
            stdout=out, stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.args[0]} exited with {self.proc.returncode}"
                                       f"{self._tail()}")
                try:
                    if client.get(self.url + self.ready_path).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.args[0]} did not start in {timeout} s{self._tail()}")

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the process, SIGKILL it after ``grace`` seconds; return its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def _tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n" + self.log.read_text(errors="replace")[-3000:]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def provider_server(db: Path, *, seed: int | None = None, failure_rate: float = 0.05,
                    decline_rate: float = 0.05, latency: tuple[float, float] = (0.002, 0.02),
                    log: Path | None = None) -> Server:
    """The provider, its ledger in ``db`` (not started)."""
    return Server(["examples.payments_http.provider", "--db", str(db),
                   "--failure-rate", str(failure_rate), "--decline-rate", str(decline_rate),
                   "--latency", str(latency[0]), str(latency[1]),
                   *(["--seed", str(seed)] if seed is not None else [])],
                  log=log)


def service_server(data: Path, provider: str, *, concurrency: int = 32,
                   log: Path | None = None) -> Server:
    """The service, its state in ``data`` (not started)."""
    return Server(["examples.payments_http.service", "--data", str(data), "--provider", provider,
                   "--concurrency", str(concurrency)], log=log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("payments-http-data"))
    ap.add_argument("--port", type=int, default=8000, help="the service's port")
    args = ap.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    with provider_server(args.data / "provider.db") as provider:
        provider.start()
        service = service_server(args.data / "service", provider.url)
        service.port, service.url = args.port, f"http://127.0.0.1:{args.port}"
        with service:
            service.start()
            assert service.proc is not None
            print(f"provider {provider.url} (pid {provider.proc and provider.proc.pid}), "
                  f"service {service.url} (pid {service.proc.pid})\n"
                  f"after a kill -9, restart the service with: {sys.executable} -m "
                  f"{' '.join(service.args)} --port {service.port}", flush=True)
            try:
                while service.proc.poll() is None and provider.proc is not None \
                        and provider.proc.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass


if __name__ == "__main__":
    main()
