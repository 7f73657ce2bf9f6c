"""Running winnow for real: the CLI in a subprocess, `winnow serve` until it is healthy, polling for a state."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import httpx


def raw_output(out: Path) -> list[str]:
    """Flags of a test run that writes raw output to ``out/o.jsonl`` without a progress bar."""
    return ["--output_format", "raw", "--output_dir", str(out), "--output_file", "o.jsonl", "--progress", "false"]


def run_winnow(
    *args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None, check: bool = False
) -> subprocess.CompletedProcess:
    """Run the real ``winnow`` command in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "winnow", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"winnow {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def wait_for(predicate, timeout: float = 60.0, what: str = "the condition") -> None:
    """Poll ``predicate`` until it holds (a file another process writes, a state a cluster reaches)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def wait_healthy(url: str, timeout: float = 10.0) -> None:
    """Poll a server's health route until it answers (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    health = url.rsplit("/v1", 1)[0] + "/health"
    while True:
        try:
            with urllib.request.urlopen(health, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.01)


READY = re.compile(r"ready at (http://\S+)/v1 ")


class Server:
    """A ``winnow serve`` subprocess whose output goes to a file (a pipe left unread could block it)."""

    def __init__(
        self,
        log: Path,
        *args: str,
        command: str = "serve",
        startup_timeout: float = 120.0,
        python: str = sys.executable,
        env: dict | None = None,
    ):
        self.log = log
        self.args = args
        env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [python, "-m", "winnow", command, *args, "--port", "0"], stdout=out, stderr=subprocess.STDOUT, env=env
            )
        self.url = self._wait_ready(startup_timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def _wait_ready(self, timeout: float) -> str:
        """The URL from the ready line, once ``/health`` answers (polled; no fixed sleeps)."""
        deadline = time.monotonic() + timeout
        url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"winnow serve exited {self.proc.returncode}:\n{self.output()[-3000:]}")
            if url is None:
                match = READY.search(self.output())
                url = match.group(1) if match else None
            if url is not None:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        return url
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"winnow serve not ready after {timeout}s:\n{self.output()[-3000:]}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"winnow serve ignored signal {sig}:\n{self.output()[-3000:]}") from None
        return self.proc.returncode
