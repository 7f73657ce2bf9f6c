"""A small fault-injecting OpenAI-compatible chat server, for tests and benchmarks (loopback only).

Plain asyncio (no web framework) so that one process sustains hundreds of concurrent requests with
a fixed latency. Run it standalone::

    python tests/fakeserver.py --port 0 --latency 0.05      # prints its base URL, then serves

or in-process from a test: ``with FakeServer(latency=0.01).running() as server: server.url``.

Routes: ``GET /health``, ``GET /v1/models``, ``GET /stats`` (request counts, most requests in
flight), ``POST /reset`` (clears counts and fault state), ``POST /v1/chat/completions``
(non-streaming and SSE streaming).

Behaviour is deterministic and chosen per request, from three places (later ones add to earlier):

- server options (constructor arguments / command-line flags);
- the model name: ``NAME?key=value&key=value``, e.g. ``deepseek-r1?reasoning=reasoning&n=ignore``;
- markers in the last user message: ``[[429-once]]``, ``[[empty-always]]``, ``[[slow=0.5]]``.

Options: ``latency`` (seconds before answering), ``reasoning`` (``reasoning_content``,
``reasoning`` or ``none``; default ``reasoning_content`` for model names containing ``r1`` or
``reason``, else ``none``), ``n`` (``honour`` or ``ignore``: answer one choice whatever ``n`` is),
``retry_after`` (seconds sent with 429s, default 0.05), ``hang`` (seconds a timeout fault waits,
default 3600), ``words`` (every answer padded to this many words), ``fault`` (a fault applied to every
prompt), ``chaos`` (a probability: each request hits
one fault drawn at random from ``CHAOS_FAULTS``, seeded by ``chaos_seed``; ``cut``/``cutdrop``
apply to streams, ``drop`` otherwise).

Faults are ``KIND-COUNT``: KIND is ``429``, ``500``, ``503``, ``401`` (echoing the key back),
``timeout`` (no answer for ``hang`` seconds), ``drop`` (close the connection without an answer),
``malformed`` (200 with broken JSON),
``empty`` (content ``""``), ``null`` (content null), ``length`` (finish_reason length),
``filter`` (finish_reason content_filter), ``toolcall`` (the answer is a call of the request's first tool,
``content: null``, finish_reason tool_calls), ``cut`` (a stream that stops half-way through the answer
with no finish_reason and no ``[DONE]``, the HTTP body ended cleanly, as a proxy that drops its
upstream does), ``cutdrop`` (the same, the connection closed mid-body); COUNT is ``once``, ``twice``,
``always`` or a number:
how many requests for the same prompt text the fault hits before the server answers normally.

Answers: "What is A + B?" prompts get ``The answer is \\boxed{A+B}.``; others an echo. Tokens are
counted as whitespace-separated words; ``max_tokens`` truncates the answer (finish_reason length).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

MARKER = re.compile(r"\[\[([^\]]+)\]\]")
SUM = re.compile(r"What is (-?\d+) \+ (-?\d+)\?")
COUNTS = {"once": 1, "twice": 2, "always": 10**9}
CHAOS_FAULTS = ("429", "500", "503", "drop", "malformed", "cut", "cutdrop", "empty")
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
           500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Options:
    """How the server answers one request (server defaults, then model-name options, then markers)."""

    latency: float = 0.0
    reasoning: str | None = None
    n: str = "honour"
    retry_after: float = 0.05
    hang: float = 3600.0
    faults: list[tuple[str, int]] = field(default_factory=list)
    chaos: float = 0.0
    words: int = 0  # pad every answer to this many words (a long answer)

    def apply(self, key: str, value: str) -> None:
        if key in ("latency", "slow"):
            self.latency = float(value)
        elif key == "reasoning":
            self.reasoning = value
        elif key == "n":
            self.n = value
        elif key == "retry_after":
            self.retry_after = float(value)
        elif key == "hang":
            self.hang = float(value)
        elif key == "fault":
            kind, _, count = value.partition("-")
            self.faults.append((kind, COUNTS.get(count or "always") or int(count)))
        elif key == "chaos":
            self.chaos = float(value)
        elif key == "words":
            self.words = int(value)
        else:
            raise ValueError(f"unknown fake-server option {key!r}")


class FakeServer:
    """The server: ``await start()`` / ``await stop()`` in a loop, or ``with running()`` from sync code."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, latency: float = 0.0,
                 reasoning: str | None = None, n: str = "honour", retry_after: float = 0.05,
                 hang: float = 3600.0, fault: list[str] | None = None, chaos: float = 0.0, chaos_seed: int = 0):
        import random

        self.host, self.port = host, port
        self.defaults = dict(latency=latency, reasoning=reasoning, n=n, retry_after=retry_after, hang=hang,
                             chaos=chaos)
        self.rng = random.Random(chaos_seed)
        self.faults_hit: Counter = Counter()  # fault kind -> requests it hit
        self.default_faults = list(fault or [])
        self.hits: Counter = Counter()  # (fault kind, prompt text) -> requests it has hit
        self.requests = 0
        self.chat_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.models: Counter = Counter()
        self.last_body: dict | None = None  # the last chat request's body, for tests to inspect
        self.first_at: float | None = None  # monotonic time the first chat request arrived
        self.last_at: float | None = None  # ... and the last chat answer was written
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        """The base URL clients use (``http://127.0.0.1:PORT/v1``)."""
        return f"http://{self.host}:{self.port}/v1"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._connection, self.host, self.port, backlog=2048)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

    @contextlib.contextmanager
    def running(self):
        """Serve from a background thread for the duration of a ``with`` block."""
        started = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self.start())
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=serve, name="fakeserver", daemon=True)
        self._thread.start()
        started.wait(10)
        try:
            yield self
        finally:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # ------------------------------------------------------------------ HTTP

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    break
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                self.requests += 1
                keep = await self._route(method, path.split("?")[0], headers, body, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    @staticmethod
    def _send(writer: asyncio.StreamWriter, status: int, body: bytes, headers: dict | None = None,
              content_type: str = "application/json") -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {len(body)}\r\n{extra}\r\n".encode() + body)

    def _json(self, writer, status: int, data: dict, headers: dict | None = None) -> bool:
        self._send(writer, status, json.dumps(data).encode(), headers)
        return True

    async def _route(self, method: str, path: str, headers: dict, body: bytes, writer: asyncio.StreamWriter) -> bool:
        if method == "GET" and path == "/health":
            return self._json(writer, 200, {"status": "ok"})
        if method == "GET" and path == "/v1/models":
            return self._json(writer, 200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
        if method == "GET" and path == "/stats":
            return self._json(writer, 200, self.stats())
        if method == "POST" and path == "/reset":
            self.reset()
            return self._json(writer, 200, {"status": "ok"})
        if method == "POST" and path == "/v1/chat/completions":
            self.chat_requests += 1
            if self.first_at is None:
                self.first_at = time.monotonic()
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                return await self._chat(headers, body, writer)
            finally:
                self.in_flight -= 1
                self.last_at = time.monotonic()
        return self._json(writer, 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}})

    def stats(self) -> dict:
        return {"requests": self.requests, "chat_requests": self.chat_requests, "in_flight": self.in_flight,
                "faults": dict(self.faults_hit),
                "max_in_flight": self.max_in_flight, "models": dict(self.models),
                "busy_s": (self.last_at - self.first_at) if self.first_at and self.last_at else 0.0}

    def reset(self) -> None:
        self.hits.clear()
        self.faults_hit.clear()
        self.models.clear()
        self.requests = self.chat_requests = self.max_in_flight = 0
        self.first_at = self.last_at = None

    # ------------------------------------------------------------------ chat

    def _options(self, model: str, prompt: str) -> Options:
        opts = Options(**self.defaults)
        for f in self.default_faults:
            opts.apply("fault", f)
        name, _, query = model.partition("?")
        for k, v in parse_qsl(query):
            opts.apply(k, v)
        for marker in MARKER.findall(prompt):
            key, sep, value = marker.partition("=")
            opts.apply(key, value) if sep else opts.apply("fault", marker)
        if opts.reasoning is None:
            opts.reasoning = "reasoning_content" if ("r1" in name.lower() or "reason" in name.lower()) else "none"
        return opts

    def _fault(self, opts: Options, prompt: str, stream: bool) -> str | None:
        """The fault this request hits, counting hits per (kind, prompt) so 'once' means once."""
        for kind, count in opts.faults:
            key = (kind, prompt)
            if self.hits[key] < count:
                self.hits[key] += 1
                self.faults_hit[kind] += 1
                return kind
        if opts.chaos and self.rng.random() < opts.chaos:
            kind = self.rng.choice(CHAOS_FAULTS)
            if kind in ("cut", "cutdrop") and not stream:
                kind = "drop"
            self.faults_hit[kind] += 1
            return kind
        return None

    async def _chat(self, headers: dict, body: bytes, writer: asyncio.StreamWriter) -> bool:
        try:
            req = json.loads(body)
            messages = req["messages"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return self._json(writer, 400, {"error": {"message": "bad request body", "type": "invalid_request"}})
        model = str(req.get("model", ""))
        self.last_body = req
        self.models[model] += 1
        users = [m for m in messages if m.get("role") == "user"]
        prompt = str(users[-1].get("content", "")) if users else ""
        try:
            opts = self._options(model, prompt)
        except ValueError as e:
            return self._json(writer, 400, {"error": {"message": str(e), "type": "invalid_request"}})
        fault = self._fault(opts, prompt, bool(req.get("stream")))
        if opts.latency:
            await asyncio.sleep(opts.latency)
        if fault in ("429", "500", "503"):
            status = int(fault)
            headers = {"Retry-After": f"{opts.retry_after:g}"} if status == 429 else None
            return self._json(writer, status, {"error": {"message": f"injected {status}", "type": "fault"}}, headers)
        if fault == "401":  # echoes the key, as some servers do: the client must not log it
            key = headers.get("authorization", "").removeprefix("Bearer ")
            return self._json(writer, 401, {"error": {"message": f"Incorrect API key provided: {key}",
                                                      "type": "invalid_request_error"}})
        if fault == "timeout":
            await asyncio.sleep(opts.hang)
        if fault == "drop":
            return False
        if fault == "malformed":
            self._send(writer, 200, b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess')
            return True
        n = int(req.get("n") or 1)
        if opts.n == "ignore":
            n = 1
        max_tokens = req.get("max_completion_tokens") or req.get("max_tokens")
        choices = [self._choice(i, prompt, opts, fault, max_tokens, req.get("tools")) for i in range(n)]
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        completion_tokens = sum(c.pop("_tokens") for c in choices)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        base = {"id": f"chatcmpl-{self.chat_requests}", "created": int(time.time()), "model": model}
        if req.get("stream"):
            include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
            await self._stream(writer, base, choices, usage if include_usage else None, cut=fault)
            return fault != "cutdrop"
        return self._json(writer, 200, {**base, "object": "chat.completion", "choices": choices, "usage": usage})

    @staticmethod
    def _choice(index: int, prompt: str, opts: Options, fault: str | None, max_tokens, tools=None) -> dict:
        m = SUM.search(prompt)
        content: str | None = (f"The answer is \\boxed{{{int(m.group(1)) + int(m.group(2))}}}." if m
                               else f"Answer {index}: {MARKER.sub('', prompt).strip()[:200]}")
        reasoning = f"Let me think step by step about: {prompt[:60]}" if opts.reasoning != "none" else None
        finish = "stop"
        if opts.words:
            content += " " + " ".join(f"step{i}" for i in range(max(0, opts.words - len(content.split()))))
        words = content.split()
        if max_tokens is not None and len(words) > int(max_tokens):
            content, finish = " ".join(words[: int(max_tokens)]), "length"
        if fault == "length":
            content, finish = " ".join(words[: max(1, len(words) // 2)]), "length"
        elif fault == "filter":
            content, finish = "", "content_filter"
        elif fault == "empty":
            content = ""
        elif fault == "null":
            content = None
        message: dict = {"role": "assistant", "content": content}
        if fault == "toolcall" and tools:
            name = tools[0]["function"]["name"]
            message = {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{index}", "type": "function",
                 "function": {"name": name, "arguments": json.dumps({"a": index, "b": 2})}}]}
            finish = "tool_calls"
        if reasoning is not None:
            message[opts.reasoning] = reasoning
        tokens = len((content or "").split()) + len((reasoning or "").split())
        return {"index": index, "message": message, "finish_reason": finish, "logprobs": None, "_tokens": tokens}

    async def _stream(self, writer: asyncio.StreamWriter, base: dict, choices: list[dict], usage: dict | None,
                      cut: str | None = None) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")

        def event(data: str) -> None:
            payload = f"data: {data}\n\n".encode()
            writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")

        def chunk(index: int, delta: dict, finish: str | None = None) -> None:
            event(json.dumps({**base, "object": "chat.completion.chunk",
                              "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}))

        for c in choices:
            msg = c["message"]
            chunk(c["index"], {"role": "assistant", "content": ""})
            field_name = next((k for k in ("reasoning_content", "reasoning") if k in msg), None)
            if field_name:
                for piece in _pieces(msg[field_name]):
                    chunk(c["index"], {field_name: piece})
            pieces = _pieces(msg["content"] or "")
            if cut in ("cut", "cutdrop"):  # half the answer, then nothing: no finish_reason, no [DONE]
                for piece in pieces[: max(1, len(pieces) // 2)]:
                    chunk(c["index"], {"content": piece})
                if cut == "cut":
                    writer.write(b"0\r\n\r\n")
                await writer.drain()
                return
            for piece in pieces:
                chunk(c["index"], {"content": piece})
            for k, call in enumerate(msg.get("tool_calls") or ()):  # a call in two deltas, as servers send them
                args = call["function"]["arguments"]
                chunk(c["index"], {"tool_calls": [{"index": k, "id": call["id"], "type": "function",
                                                   "function": {"name": call["function"]["name"],
                                                                "arguments": args[: len(args) // 2]}}]})
                chunk(c["index"], {"tool_calls": [{"index": k, "function": {"arguments": args[len(args) // 2:]}}]})
            chunk(c["index"], {}, c["finish_reason"])
            await writer.drain()
        if usage is not None:
            event(json.dumps({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
        event("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


def _pieces(text: str, parts: int = 3) -> list[str]:
    """``text`` cut into a few stream deltas that join back to it."""
    if not text:
        return []
    step = max(1, -(-len(text) // parts))
    return [text[i:i + step] for i in range(0, len(text), step)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fault-injecting OpenAI-compatible chat server (loopback).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--reasoning", default=None, choices=("reasoning_content", "reasoning", "none"))
    parser.add_argument("--n", default="honour", choices=("honour", "ignore"))
    parser.add_argument("--retry-after", type=float, default=0.05)
    parser.add_argument("--hang", type=float, default=3600.0)
    parser.add_argument("--fault", action="append", default=[], help="KIND-COUNT applied to every prompt")
    parser.add_argument("--chaos", type=float, default=0.0, help="probability of a random fault per request")
    parser.add_argument("--chaos-seed", type=int, default=0)
    args = parser.parse_args(argv)
    server = FakeServer(args.host, args.port, latency=args.latency, reasoning=args.reasoning, n=args.n,
                        retry_after=args.retry_after, hang=args.hang, fault=args.fault, chaos=args.chaos,
                        chaos_seed=args.chaos_seed)

    async def serve() -> None:
        url = await server.start()
        print(url, flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    sys.exit(0)


if __name__ == "__main__":
    main()
