"""Session fixtures: tiny real models built offline, small datasets, and a helper to run the CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # demo_world/: the demo's scripts live in the checkout, not the package
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' models are tiny and several processes (a server, a client, pytest) share 2 cores: one
# torch thread each avoids OpenMP threads spinning against each other (seen: 20x slower runs).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def winnow_cache(tmp_path_factory):
    """Demo models built during tests go to a private cache, never the user's."""
    path = tmp_path_factory.mktemp("winnow-cache")
    os.environ["WINNOW_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from winnow.demo.build import build_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path, vocab_size=1024, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny random-weight Qwen2-architecture chat model (ChatML template, eos and pad set)."""
    from winnow.demo.build import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-qwen2", arch="qwen2", tokenizer_dir=tiny_tokenizer_dir, seed=0
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer_dir):
    """The same, in the Llama architecture."""
    from winnow.demo.build import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama", tokenizer_dir=tiny_tokenizer_dir, seed=1
    )


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def math_jsonl(tmp_path):
    """Eight messages-format arithmetic rows."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} + {i + 1}?"},
                {"role": "assistant", "content": str(2 * i + 1)},
            ]
        }
        for i in range(8)
    ]
    return write_jsonl(tmp_path / "math.jsonl", rows)


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


# --- reward models (rewards issue)


@pytest.fixture(scope="session")
def tiny_classifier_rm(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny one-label sequence-classification reward model (random weights)."""
    from rm_builders import build_tiny_classifier_rm

    return build_tiny_classifier_rm(tmp_path_factory.mktemp("rms") / "classifier", tiny_tokenizer_dir, seed=3)


@pytest.fixture(scope="session")
def tiny_prm(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny Math-Shepherd-style PRM: causal LM, ``<step>`` tag token, '+'/'-' labels, config hint."""
    from rm_builders import build_tiny_prm

    return build_tiny_prm(
        tmp_path_factory.mktemp("rms") / "prm-shepherd", tiny_tokenizer_dir, style="math_shepherd", seed=4
    )


@pytest.fixture(scope="session")
def tiny_qwen_prm(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny PRM in the Qwen2.5-Math-PRM checkpoint layout (``<extra_0>``, 2-class ``score`` head)."""
    from rm_builders import build_tiny_prm

    return build_tiny_prm(tmp_path_factory.mktemp("rms") / "prm-qwen", tiny_tokenizer_dir, style="qwen_prm", seed=5)


@pytest.fixture(scope="session")
def tiny_token_prm(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny token-classification PRM (2 labels, read at each step's last token)."""
    from rm_builders import build_tiny_prm

    return build_tiny_prm(
        tmp_path_factory.mktemp("rms") / "prm-token", tiny_tokenizer_dir, style="token_classification", seed=6
    )


# --- `winnow serve` subprocesses (shared by the server tests)

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
