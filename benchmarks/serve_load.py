"""Load test of ``winnow serve``: N concurrent chat requests through the official async openai client.

Starts the server itself (once with dynamic batching, once without), fires ``--requests``
concurrent chat completions at each, and sends ``--baseline_requests`` one at a time as the
baseline. Prints errors, requests/s and p50/p99 latency per mode and the speed-up ratios.

    python benchmarks/serve_load.py                      # demo-tiny, 200 requests, 16 tokens
    python benchmarks/serve_load.py --model DIR --requests 200 --max_tokens 32
    python benchmarks/serve_load.py --model demo-policy --engine vllm --python .venv-vllm/bin/python \
        --engine_kwargs '{"kv_cache_space_gb": 1}'

It also streams one 256-token answer and prints the time to its first token against the whole answer
(goal: under 10%; engines that do not stream token by token send the answer when it is done).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

READY = re.compile(r"ready at (http://\S+)/v1 ")


@dataclass
class Result:
    name: str
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    engine_calls: int | None = None

    @property
    def rps(self) -> float:
        return (self.requests - self.errors) / self.seconds

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    def line(self) -> str:
        calls = f"  engine calls {self.engine_calls}" if self.engine_calls is not None else ""
        return (
            f"{self.name:<34} {self.requests:>4} req  {self.errors} errors  {self.rps:7.2f} req/s  "
            f"p50 {self.pct(0.5) * 1000:7.0f} ms  p99 {self.pct(0.99) * 1000:7.0f} ms{calls}"
        )


class ServerProcess:
    """``winnow serve`` on a free loopback port; ready when its ready line is out and /health answers."""

    def __init__(self, model: str, *extra: str, timeout: float = 300, python: str = sys.executable):
        self.log = Path(tempfile.mkstemp(prefix="winnow-serve-", suffix=".log")[1])
        src = str(Path(__file__).resolve().parents[1] / "src")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [python, "-m", "winnow", "serve", "--model", model, "--port", "0", *extra],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        self.url = None
        while time.monotonic() < deadline and self.proc.poll() is None:
            match = READY.search(self.log.read_text(errors="replace"))
            if match:
                try:
                    if httpx.get(f"{match.group(1)}/health", timeout=2).status_code == 200:
                        self.url = match.group(1)
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"server did not start:\n{self.log.read_text(errors='replace')[-2000:]}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.unlink(missing_ok=True)


async def _one(client: openai.AsyncOpenAI, model: str, i: int, max_tokens: int) -> float:
    start = time.perf_counter()
    resp = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"What is {i} + {i + 1}?"}],
        max_tokens=max_tokens,
        temperature=1.0,
    )
    assert resp.choices and resp.choices[0].message.content is not None
    return time.perf_counter() - start


async def _load(url: str, model: str, n: int, max_tokens: int, concurrent: bool) -> tuple[int, float, list[float]]:
    client = openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key="EMPTY",
        max_retries=0,
        timeout=600,
        http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=n + 8)),
    )
    async with client:
        await _one(client, model, -1, max_tokens)  # warm-up
        start = time.perf_counter()
        if concurrent:
            outcomes = await asyncio.gather(
                *(_one(client, model, i, max_tokens) for i in range(n)), return_exceptions=True
            )
        else:
            outcomes = []
            for i in range(n):
                try:
                    outcomes.append(await _one(client, model, i, max_tokens))
                except Exception as e:  # counted as an error, like the concurrent case
                    outcomes.append(e)
        seconds = time.perf_counter() - start
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    for e in errors[:3]:
        print(f"  error: {type(e).__name__}: {e}", file=sys.stderr)
    return len(errors), seconds, [o for o in outcomes if not isinstance(o, BaseException)]


def engine_args(args) -> list[str]:
    return ["--engine", args.engine, *(["--engine_kwargs", args.engine_kwargs] if args.engine_kwargs else [])]


def time_to_first_token(args, max_tokens: int = 256) -> tuple[float, float, int]:
    """(seconds to the first content chunk, seconds to the end, chunks) of one streamed greedy answer."""
    server = ServerProcess(args.model, *engine_args(args), python=args.python)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0, timeout=600)
        model = server.health()["model"]
        messages = [{"role": "user", "content": "Tell me a long story about numbers."}]
        client.chat.completions.create(model=model, messages=messages, max_tokens=8)  # warm-up
        start = time.perf_counter()
        first, chunks = None, 0
        for chunk in client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
                first = first if first is not None else time.perf_counter() - start
        return first or 0.0, time.perf_counter() - start, chunks
    finally:
        server.stop()


def run_mode(args, name: str, batching: bool, n: int, concurrent: bool) -> Result:
    server = ServerProcess(
        args.model,
        "--dynamic_batching",
        str(batching).lower(),
        "--max_batch_size",
        str(args.max_batch_size),
        "--max_wait_ms",
        str(args.max_wait_ms),
        "--max_queue",
        str(max(args.requests, args.baseline_requests) * 2),
        *engine_args(args),
        python=args.python,
    )
    try:
        model = server.health()["model"]
        calls_before = server.health()["engine_calls"]
        errors, seconds, latencies = asyncio.run(_load(server.url, model, n, args.max_tokens, concurrent))
        calls = server.health()["engine_calls"] - calls_before - 1  # less the warm-up
    finally:
        server.stop()
    return Result(name, n, errors, seconds, latencies, calls)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-tiny", help="model dir or demo name (default: demo-tiny)")
    parser.add_argument("--requests", type=int, default=200, help="concurrent requests per mode")
    parser.add_argument("--baseline_requests", type=int, default=50, help="requests sent one at a time")
    parser.add_argument("--max_tokens", type=int, default=16)
    parser.add_argument("--max_batch_size", type=int, default=64)
    parser.add_argument("--max_wait_ms", type=float, default=10.0)
    parser.add_argument("--engine", default="transformers")
    parser.add_argument("--engine_kwargs", default=None, help="JSON, passed to winnow serve")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the server (a vLLM venv)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    on = run_mode(args, "concurrent, dynamic batching on", True, args.requests, True)
    print(on.line(), flush=True)
    off = run_mode(args, "concurrent, dynamic batching off", False, args.requests, True)
    print(off.line(), flush=True)
    one = run_mode(args, "one request at a time", True, args.baseline_requests, False)
    print(one.line(), flush=True)
    print(f"batching on / off: {on.rps / off.rps:.2f}x req/s;  on / one-at-a-time: {on.rps / one.rps:.2f}x req/s")
    first, total, chunks = time_to_first_token(args)
    print(
        f"streamed 256-token answer: first token after {first:.3f}s of {total:.3f}s ({first / total:.1%}; "
        f"{chunks} chunks)"
    )
    ok = on.errors == 0 and off.errors == 0 and one.errors == 0
    print("0 errors: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
