"""Hostile clients against ``winnow serve``: what each costs the server, and whether it survives.

Starts the server itself and measures, on loopback:

1. a chat request with one huge message (``--sizes_mb``, default 10 and 100 MB), then bodies of
   ``--shape_mb`` (default 31, just under the default cap) shaped to cost the most per byte: one
   long token-id prompt, as many messages as fit, as many content parts as fit: the status, the
   time to answer, and the server's peak RSS while answering (``VmHWM`` in ``/proc/PID/status``,
   reset before each request through ``/proc/PID/clear_refs`` where the kernel allows). A
   watchdog kills the server if its RSS passes ``--rss_cap_gb`` (the machine is shared: an
   unprotected server would take it all), and says so;
2. a chat request with ``--stop_strings`` stop strings: its status and time, and the latency of
   a normal request sent meanwhile;
3. ``--half_open`` sockets that send half a request line and never finish: the latency of a
   normal request while they are held, and how many the server has closed after
   ``--hold_s`` seconds.

    python benchmarks/serve_hostile.py                    # demo-tiny
    python benchmarks/serve_hostile.py --server_args "--max_request_bytes 1000000"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import sys
import threading
import time
from urllib.parse import urlsplit

import httpx
from serve_load import ServerProcess

CHAT = [{"role": "user", "content": "What is 2 + 3?"}]


def status_kb(pid: int, field: str) -> int | None:
    """A ``kB`` figure (VmRSS, VmHWM) of a live process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Watchdog:
    """Kills the server if its resident memory passes the cap (keeps a shared machine alive)."""

    def __init__(self, pid: int, cap_kb: int):
        self.pid, self.cap_kb, self.fired = pid, cap_kb, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            rss = status_kb(self.pid, "VmRSS")
            if rss is None:
                return
            if rss > self.cap_kb:
                self.fired = True
                os.kill(self.pid, signal.SIGKILL)
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux 4.0+); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def normal_request(url: str) -> tuple[int, float]:
    start = time.perf_counter()
    resp = httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4}, timeout=300)
    return resp.status_code, time.perf_counter() - start


def repeat(unit: str, size: int) -> str:
    """``unit`` repeated (comma-separated) to about ``size`` characters."""
    return ",".join([unit] * max(1, size // (len(unit) + 1)))


def shaped_bodies(args) -> list[tuple[str, str, bytes]]:
    """(label, route, body) for each hostile body, smallest first (VmHWM only grows)."""
    out = []
    for mb in args.sizes_mb:
        content = ("hello world " * (mb * 1024 * 1024 // 12 + 1))[: mb * 1024 * 1024]
        out.append(
            (
                f"{mb} MB message",
                "chat/completions",
                json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 4}).encode(),
            )
        )
    if args.shape_mb:
        size = args.shape_mb * 1024 * 1024
        message = json.dumps({"role": "user", "content": "a"})
        part = json.dumps({"type": "text", "text": "a"})
        out += [
            (
                f"{args.shape_mb} MB of token ids",
                "completions",
                f'{{"max_tokens": 4, "prompt": [{repeat("7", size)}]}}'.encode(),
            ),
            (
                f"{args.shape_mb} MB of messages",
                "chat/completions",
                f'{{"max_tokens": 4, "messages": [{repeat(message, size)}]}}'.encode(),
            ),
            (
                f"{args.shape_mb} MB of content parts",
                "chat/completions",
                f'{{"max_tokens": 4, "messages": [{{"role": "user", "content": [{repeat(part, size)}]}}]}}'.encode(),
            ),
        ]
    out.sort(key=lambda item: len(item[2]))
    return out


def big_bodies(args) -> None:
    server = ServerProcess(args.model, *shlex.split(args.server_args))
    pid = server.proc.pid
    dog = Watchdog(pid, int(args.rss_cap_gb * 1024 * 1024))
    try:
        print(f"server idle: VmHWM {status_kb(pid, 'VmHWM') / 1024:.0f} MB", flush=True)
        for label, route, body in shaped_bodies(args):
            reset = reset_peak(pid)
            before = status_kb(pid, "VmRSS") or 0
            start = time.perf_counter()
            try:
                resp = httpx.post(
                    f"{server.url}/v1/{route}", content=body, timeout=600, headers={"Content-Type": "application/json"}
                )
                outcome = f"{resp.status_code} {resp.json()['error']['code'] if resp.status_code >= 400 else ''}"
            except (httpx.HTTPError, ValueError) as e:
                outcome = f"no answer ({type(e).__name__})"
            seconds = time.perf_counter() - start
            hwm = status_kb(pid, "VmHWM")
            peak = "server gone"
            if hwm is not None:
                peak = f"VmHWM {hwm / 1024:.0f} MB" + (f" (+{max(0, hwm - before) / 1024:.0f} MB)" if reset else "")
            if dog.fired:
                peak = f"KILLED by the watchdog at {args.rss_cap_gb} GB RSS"
            print(f"{label:<26} {outcome.strip():<32} {seconds:6.2f} s   {peak}", flush=True)
            if server.proc.poll() is not None:
                print(f"     server exited with {server.proc.returncode}", flush=True)
                break
    finally:
        dog.close()
        server.stop()


def stop_strings(args) -> None:
    server = ServerProcess(args.model, *shlex.split(args.server_args))
    try:
        stops = [f"stop{i:05d}" for i in range(args.stop_strings)]
        body = {"messages": CHAT, "max_tokens": 16, "stop": stops}
        result: dict = {}

        def hostile() -> None:
            start = time.perf_counter()
            resp = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=600)
            result["status"], result["seconds"] = resp.status_code, time.perf_counter() - start

        thread = threading.Thread(target=hostile)
        thread.start()
        time.sleep(0.5)  # let the hostile request reach the model thread first
        code, seconds = normal_request(server.url)
        thread.join()
        print(
            f"{args.stop_strings} stop strings: {result['status']} in {result['seconds']:.2f} s; "
            f"a normal request meanwhile: {code} in {seconds:.2f} s",
            flush=True,
        )
    finally:
        server.stop()


def half_open(args) -> None:
    server = ServerProcess(args.model, *shlex.split(args.server_args))
    parts = urlsplit(server.url)
    socks: list[socket.socket] = []
    try:
        _, baseline = normal_request(server.url)
        for _ in range(args.half_open):
            s = socket.create_connection((parts.hostname, parts.port), timeout=5)
            s.sendall(b"POST /v1/chat/completions HT")  # half a request line, never finished
            socks.append(s)
        code, seconds = normal_request(server.url)
        print(
            f"{args.half_open} half-open sockets held: a normal request {code} in {seconds:.2f} s "
            f"(alone: {baseline:.2f} s)",
            flush=True,
        )
        deadline = time.monotonic() + args.hold_s
        closed: set[int] = set()
        while time.monotonic() < deadline and len(closed) < len(socks):
            for i, s in enumerate(socks):
                if i in closed:
                    continue
                s.settimeout(0.01)
                try:
                    if s.recv(4096) == b"":
                        closed.add(i)
                except TimeoutError:
                    pass
                except OSError:
                    closed.add(i)
        print(f"closed by the server within {args.hold_s:.0f} s: {len(closed)} of {len(socks)}", flush=True)
    finally:
        for s in socks:
            s.close()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo-tiny", help="model dir or demo name (default: demo-tiny)")
    parser.add_argument("--server_args", default="", help="extra winnow serve flags, one string")
    parser.add_argument("--sizes_mb", type=int, nargs="*", default=[10, 100])
    parser.add_argument("--shape_mb", type=int, default=31, help="size of the shaped bodies (0: none)")
    parser.add_argument("--rss_cap_gb", type=float, default=8.0)
    parser.add_argument("--stop_strings", type=int, default=10000)
    parser.add_argument("--half_open", type=int, default=200)
    parser.add_argument("--hold_s", type=float, default=20.0)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.sizes_mb or args.shape_mb:
        big_bodies(args)
    if args.stop_strings:
        stop_strings(args)
    if args.half_open:
        half_open(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
