"""A small fault-injecting OpenAI-compatible chat server, for tests and benchmarks (loopback only).

Plain asyncio (no web framework) so that one process sustains hundreds of concurrent requests with
a fixed latency. Run it standalone::

    python tests/support/fakeserver.py --port 0 --latency 0.05      # prints its base URL, then serves

or in-process from a test: ``with FakeServer(latency=0.01).running() as server: server.url``.

Routes: ``GET /health``, ``GET /v1/models``, ``GET /stats`` (request counts, most requests in
flight), ``POST /reset`` (clears counts and fault state), ``POST /v1/chat/completions``
(non-streaming and SSE streaming), and OpenAI's Batch API: ``POST /v1/files`` (multipart upload),
``GET /v1/files/{id}`` and ``/v1/files/{id}/content``, ``POST /v1/batches``, ``GET /v1/batches``
(newest first, ``limit``/``after`` pagination), ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``.

Batches move through validating -> in_progress -> finalizing -> completed, one status every
``batch_step`` seconds (``hold_batches`` keeps them in progress until set back to False); their
requests are answered like chat requests, markers included, at finalizing. Output and error files
have OpenAI's line shape (``{"id", "custom_id", "response": {"status_code", "request_id", "body"},
"error"}``): a request hitting a 4xx/5xx fault goes to the error file. Whole-batch faults are prompt
markers too: ``[[batchfail-once]]`` fails the batch at validation (``errors.data``), ``[[expire-once]]``
expires it (requests before the marked one answered, the rest in the error file as
``batch_expired``). ``batch_submitted`` and ``batch_answered`` count, per ``custom_id``, how often a
request was in a created batch and how often it was answered (billed), so tests can tell that
nothing was sent or paid for twice. ``kill_at[stage] = pid`` SIGKILLs a client at a stage of the
protocol, just before the server answers it: ``upload`` (file stored), ``create`` (batch created),
``poll`` (a status request while in progress), ``done`` (a status request that would report the
end), ``download`` (an output file requested); ``stage#N`` kills at its Nth time. ``lose_creates = k``
answers the next k batch creations with a 502 after making the batch.

Behaviour is deterministic and chosen per request, from three places (later ones add to earlier):

- server options (constructor arguments / command-line flags);
- the model name: ``NAME?key=value&key=value``, e.g. ``deepseek-r1?reasoning=reasoning&n=ignore``;
- markers in the last user message: ``[[429-once]]``, ``[[empty-always]]``, ``[[slow=0.5]]``.

Options: ``latency`` (seconds before answering), ``reasoning`` (``reasoning_content``,
``reasoning`` or ``none``; default ``reasoning_content`` for model names containing ``r1`` or
``reason``, else ``none``), ``n`` (``honour`` or ``ignore``: answer one choice whatever ``n`` is),
``retry_after`` (seconds sent with 429s, default 0.05), ``hang`` (seconds a timeout fault waits,
default 3600), ``words`` (every answer padded to this many words), ``fault`` (a fault applied to every
prompt), ``agent`` (multi-turn scripting: with tools in the request, call the first tool this many times,
one call per turn, then answer with the last tool result: ``The answer is \\boxed{RESULT}.``; the call's
arguments are ``{"expression": "A + B"}``, ``{"code": "print(A + B)"}`` or ``{"a": A, "b": B}`` as the tool's
parameters ask; with ``agent_vary`` the i-th choice of a request passes ``B + i``, so only the first is right),
``wrong_turns`` (answers are off by one while the conversation has fewer assistant
turns than this: a first attempt fails, a retry succeeds), ``chaos`` (a probability: each request hits
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
import os
import re
import signal
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
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


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
    agent: int = 0  # tool calls before the answer (multi-turn scripting)
    agent_vary: int = 0  # the i-th choice of an agent request calls with B + i (samples that differ)
    wrong_turns: int = 0  # answers off by one while the conversation has fewer assistant turns than this

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
        elif key == "agent":
            self.agent = int(value)
        elif key == "agent_vary":
            self.agent_vary = int(value)
        elif key == "wrong_turns":
            self.wrong_turns = int(value)
        else:
            raise ValueError(f"unknown fake-server option {key!r}")


class FakeServer:
    """The server: ``await start()`` / ``await stop()`` in a loop, or ``with running()`` from sync code."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        latency: float = 0.0,
        reasoning: str | None = None,
        n: str = "honour",
        retry_after: float = 0.05,
        hang: float = 3600.0,
        fault: list[str] | None = None,
        chaos: float = 0.0,
        chaos_seed: int = 0,
        batch_step: float = 0.05,
        agent: int = 0,
        wrong_turns: int = 0,
    ):
        import random

        self.host, self.port = host, port
        self.defaults = dict(
            latency=latency,
            reasoning=reasoning,
            n=n,
            retry_after=retry_after,
            hang=hang,
            chaos=chaos,
            agent=agent,
            wrong_turns=wrong_turns,
        )
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
        # the Batch API's state
        self.batch_step = batch_step
        self.hold_batches = False
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.batch_submitted: Counter = Counter()  # custom_id -> times it was in a created batch
        self.batch_answered: Counter = Counter()  # custom_id -> times it was answered (billed)
        self.kill_at: dict[str, int] = {}  # stage (or stage#N) -> pid of a client to SIGKILL there (once)
        self.stage_hits: Counter = Counter()
        self.lose_creates = 0  # batch creations answered 502 after the batch was made
        self._ids = 0
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
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    body = await _read_chunked(reader)
                else:
                    length = int(headers.get("content-length") or 0)
                    body = await reader.readexactly(length) if length else b""
                self.requests += 1
                route, _, query = path.partition("?")
                keep = await self._route(method, route, headers, body, writer, dict(parse_qsl(query)))
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
    def _send(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        headers: dict | None = None,
        content_type: str = "application/json",
    ) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n".encode()
            + body
        )

    def _json(self, writer, status: int, data: dict, headers: dict | None = None) -> bool:
        self._send(writer, status, json.dumps(data).encode(), headers)
        return True

    async def _route(
        self,
        method: str,
        path: str,
        headers: dict,
        body: bytes,
        writer: asyncio.StreamWriter,
        query: dict | None = None,
    ) -> bool:
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
        if path.startswith("/v1/files") or path.startswith("/v1/batches"):
            return self._batch_api(method, path, query, headers, body, writer)
        return self._json(writer, 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}})

    def stats(self) -> dict:
        return {
            "requests": self.requests,
            "chat_requests": self.chat_requests,
            "in_flight": self.in_flight,
            "batches": len(self.batches),
            "batch_submitted": sum(self.batch_submitted.values()),
            "batch_answered": sum(self.batch_answered.values()),
            "faults": dict(self.faults_hit),
            "max_in_flight": self.max_in_flight,
            "models": dict(self.models),
            "busy_s": (self.last_at - self.first_at) if self.first_at and self.last_at else 0.0,
        }

    def reset(self) -> None:
        self.batch_submitted.clear()
        self.batch_answered.clear()
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
            return self._json(
                writer,
                401,
                {"error": {"message": f"Incorrect API key provided: {key}", "type": "invalid_request_error"}},
            )
        if fault == "timeout":
            await asyncio.sleep(opts.hang)
        if fault == "drop":
            return False
        if fault == "malformed":
            self._send(writer, 200, b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess')
            return True
        answer = self._completion(req, prompt, opts, fault)
        if req.get("stream"):
            include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
            base = {k: answer[k] for k in ("id", "created", "model")}
            await self._stream(writer, base, answer["choices"], answer["usage"] if include_usage else None, cut=fault)
            return fault != "cutdrop"
        return self._json(writer, 200, answer)

    def _completion(self, req: dict, prompt: str, opts: Options, fault: str | None) -> dict:
        """The chat completion object answering ``req`` (the answer's faults applied)."""
        n = int(req.get("n") or 1)
        if opts.n == "ignore":
            n = 1
        max_tokens = req.get("max_completion_tokens") or req.get("max_tokens")
        messages = req.get("messages") or []
        choices = [
            self._choice(i, prompt, opts, fault, max_tokens, req.get("tools"), req.get("response_format"), messages)
            for i in range(n)
        ]
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        completion_tokens = sum(c.pop("_tokens") for c in choices)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        self._ids += 1
        return {
            "id": f"chatcmpl-{self._ids}",
            "created": int(time.time()),
            "model": str(req.get("model", "")),
            "object": "chat.completion",
            "choices": choices,
            "usage": usage,
        }

    @staticmethod
    def _choice(
        index: int,
        prompt: str,
        opts: Options,
        fault: str | None,
        max_tokens,
        tools=None,
        response_format=None,
        messages: list | None = None,
    ) -> dict:
        m = SUM.search(prompt)
        messages = messages or []
        total = int(m.group(1)) + int(m.group(2)) if m else 0
        if opts.wrong_turns and sum(1 for x in messages if x.get("role") == "assistant") < opts.wrong_turns:
            total += 1
        content: str | None = (
            f"The answer is \\boxed{{{total}}}." if m else f"Answer {index}: {MARKER.sub('', prompt).strip()[:200]}"
        )
        if response_format and response_format.get("type") in ("json_schema", "json_object"):
            # a JSON answer: {"answer": A+B} for sums, else {"answer": <echo>}; [[badjson]] breaks it
            content = json.dumps(
                {"answer": int(m.group(1)) + int(m.group(2)) if m else MARKER.sub("", prompt).strip()[:200]}
            )
            if fault == "badjson":  # cut short: not valid JSON
                content = content[:-1]
        elif opts.agent and tools:  # the scripted agent: call the first tool, then answer with what it said
            users = [i for i, x in enumerate(messages) if x.get("role") == "user"]
            results = [x for x in messages[(users[-1] if users else 0) :] if x.get("role") == "tool"]
            if len(results) < opts.agent:
                return FakeServer._call(index, tools[0], m, len(results), index if opts.agent_vary else 0)
            content = f"The answer is \\boxed{{{str(results[-1].get('content', '')).strip()}}}."
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
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": f"call_{index}",
                        "type": "function",
                        "function": {"name": name, "arguments": json.dumps({"a": index, "b": 2})},
                    }
                ],
            }
            finish = "tool_calls"
        if reasoning is not None:
            message[opts.reasoning] = reasoning
        tokens = len((content or "").split()) + len((reasoning or "").split())
        return {"index": index, "message": message, "finish_reason": finish, "logprobs": None, "_tokens": tokens}

    @staticmethod
    def _call(index: int, tool: dict, m: re.Match | None, k: int, slip: int = 0) -> dict:
        """A scripted call of ``tool`` on the request's sum (its parameters decide the arguments' shape)."""
        a, b = (int(m.group(1)), int(m.group(2)) + slip) if m else (1, 1)
        function = tool.get("function") or {}
        params = (function.get("parameters") or {}).get("properties") or {}
        arguments = (
            {"expression": f"{a} + {b}"}
            if "expression" in params
            else {"code": f"print({a} + {b})"}
            if "code" in params
            else {"a": a, "b": b}
        )
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": f"call_{k}_{index}",
                    "type": "function",
                    "function": {"name": function.get("name", ""), "arguments": json.dumps(arguments)},
                }
            ],
        }
        return {
            "index": index,
            "message": message,
            "finish_reason": "tool_calls",
            "logprobs": None,
            "_tokens": len(json.dumps(arguments).split()),
        }

    async def _stream(
        self, writer: asyncio.StreamWriter, base: dict, choices: list[dict], usage: dict | None, cut: str | None = None
    ) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")

        def event(data: str) -> None:
            payload = f"data: {data}\n\n".encode()
            writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")

        def chunk(index: int, delta: dict, finish: str | None = None) -> None:
            event(
                json.dumps(
                    {
                        **base,
                        "object": "chat.completion.chunk",
                        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
                    }
                )
            )

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
                chunk(
                    c["index"],
                    {
                        "tool_calls": [
                            {
                                "index": k,
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": call["function"]["name"], "arguments": args[: len(args) // 2]},
                            }
                        ]
                    },
                )
                chunk(c["index"], {"tool_calls": [{"index": k, "function": {"arguments": args[len(args) // 2 :]}}]})
            chunk(c["index"], {}, c["finish_reason"])
            await writer.drain()
        if usage is not None:
            event(json.dumps({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
        event("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    # ------------------------------------------------------------------ batch API

    def _new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids:06d}"

    def _kill(self, stage: str) -> None:
        """SIGKILL the client registered for ``stage`` (or ``stage#N``: its Nth time), once, before the
        server answers it."""
        self.stage_hits[stage] += 1
        pid = self.kill_at.pop(stage, None) or self.kill_at.pop(f"{stage}#{self.stage_hits[stage]}", None)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)

    def _batch_api(self, method: str, path: str, query: dict, headers: dict, body: bytes, writer) -> bool:
        parts = path.strip("/").split("/")[1:]  # after "v1"
        try:
            if parts == ["files"] and method == "POST":
                return self._json(writer, 200, self._upload(headers, body))
            if parts[0] == "files" and len(parts) >= 2 and method == "GET":
                f = self.files.get(parts[1])
                if f is None:
                    return self._json(
                        writer,
                        404,
                        {"error": {"message": f"No such File object: {parts[1]}", "type": "invalid_request_error"}},
                    )
                if parts[2:] == ["content"]:
                    if f["purpose"] == "batch_output":
                        self._kill("download")
                    self._send(writer, 200, f["bytes"], content_type="application/octet-stream")
                    return True
                return self._json(writer, 200, f["object"])
            if parts == ["batches"] and method == "POST":
                batch = self._create_batch(json.loads(body))
                if self.lose_creates > 0:  # made, but the answer is lost: a client that retries blindly makes two
                    self.lose_creates -= 1
                    return self._json(writer, 502, {"error": {"message": "upstream timed out", "type": "server_error"}})
                return self._json(writer, 200, batch)
            if parts == ["batches"] and method == "GET":
                return self._json(writer, 200, self._list_batches(query))
            batch = self.batches.get(parts[1]) if len(parts) >= 2 else None
            if batch is None:
                return self._json(
                    writer,
                    404,
                    {"error": {"message": f"No batch found with id '{parts[-1]}'", "type": "invalid_request_error"}},
                )
            if parts[2:] == ["cancel"] and method == "POST":
                self._advance(batch)
                if batch["status"] in ("validating", "in_progress"):
                    batch["status"], batch["cancelling_at"] = "cancelling", int(time.time())
                    batch["_cancel_at"] = time.monotonic()
                return self._json(writer, 200, self._public(batch))
            if method == "GET":
                self._advance(batch)
                if batch["status"] == "in_progress":
                    self._kill("poll")
                elif batch["status"] in ("completed", "failed", "expired", "cancelled"):
                    self._kill("done")
                return self._json(writer, 200, self._public(batch))
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            return self._json(writer, 400, {"error": {"message": f"bad request: {e}", "type": "invalid_request_error"}})
        return self._json(writer, 404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}})

    def _upload(self, headers: dict, body: bytes) -> dict:
        """A multipart/form-data upload (fields ``purpose`` and ``file``), as the openai SDK sends it."""
        boundary = re.search(r"boundary=\"?([^\";]+)", headers.get("content-type", ""))
        if boundary is None:
            raise ValueError("expected multipart/form-data")
        fields: dict[str, tuple[str | None, bytes]] = {}
        for part in body.split(b"--" + boundary.group(1).encode())[1:]:
            if part.startswith(b"--"):
                break
            head, _, content = part.partition(b"\r\n\r\n")
            disposition = head.decode("utf-8", "replace")
            name = re.search(r'name="([^"]*)"', disposition)
            filename = re.search(r'filename="([^"]*)"', disposition)
            if name:
                fields[name.group(1)] = (filename.group(1) if filename else None, content.removesuffix(b"\r\n"))
        if "file" not in fields or "purpose" not in fields:
            raise ValueError("an upload needs the fields file and purpose")
        filename, data = fields["file"]
        f = self._store_file(data, fields["purpose"][1].decode(), filename or "upload.jsonl")
        self._kill("upload")
        return f

    def _store_file(self, data: bytes, purpose: str, filename: str) -> dict:
        fid = self._new_id("file")
        obj = {
            "id": fid,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }
        self.files[fid] = {"bytes": data, "purpose": purpose, "object": obj}
        return obj

    def _create_batch(self, req: dict) -> dict:
        f = self.files.get(req["input_file_id"])
        if f is None:
            raise ValueError(f"no file {req['input_file_id']}")
        now = int(time.time())
        bid = self._new_id("batch")
        batch = {
            "id": bid,
            "object": "batch",
            "endpoint": req["endpoint"],
            "errors": None,
            "input_file_id": req["input_file_id"],
            "completion_window": req["completion_window"],
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": req.get("metadata"),
            "_t0": time.monotonic(),
            "_lines": [],
            "_fault": None,
        }
        for number, raw in enumerate(f["bytes"].decode("utf-8").splitlines(), start=1):
            if not raw.strip():
                continue
            line = json.loads(raw)
            if line.get("url") != req["endpoint"] or line.get("method") != "POST":
                batch["_fault"] = (
                    "failed",
                    {
                        "code": "invalid_url",
                        "line": number,
                        "param": "url",
                        "message": f"the line's url must be {req['endpoint']}",
                    },
                )
            batch["_lines"].append(line)
        ids = [line["custom_id"] for line in batch["_lines"]]
        if len(set(ids)) != len(ids):
            batch["_fault"] = (
                "failed",
                {
                    "code": "duplicate_custom_id",
                    "line": None,
                    "param": "custom_id",
                    "message": "custom_id values must be unique within a batch",
                },
            )
        for line in batch["_lines"]:
            prompt = _last_user(line["body"].get("messages") or [])
            for marker, status in (("batchfail", "failed"), ("expire", "expired")):
                if batch["_fault"] is None and self._marked(marker, prompt):
                    batch["_fault"] = (status, line["custom_id"])
        batch["request_counts"]["total"] = len(ids)
        self.batch_submitted.update(ids)
        self.batches[bid] = batch
        self._kill("create")
        return self._public(batch)

    def _marked(self, marker: str, prompt: str) -> bool:
        """Whether ``prompt`` carries ``[[marker-COUNT]]`` and its count is not spent (counting this use)."""
        for found in MARKER.findall(prompt):
            kind, _, count = found.partition("-")
            if kind == marker and self.hits[(marker, prompt)] < (COUNTS.get(count or "always") or int(count)):
                self.hits[(marker, prompt)] += 1
                return True
        return False

    def _list_batches(self, query: dict) -> dict:
        for b in self.batches.values():
            self._advance(b)
        newest = sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)
        if query.get("after"):
            newest = [b for b in newest if b["id"] < query["after"]]
        limit = int(query.get("limit") or 20)
        page = newest[:limit]
        return {
            "object": "list",
            "data": [self._public(b) for b in page],
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(newest) > limit,
        }

    @staticmethod
    def _public(batch: dict) -> dict:
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _advance(self, batch: dict) -> None:
        """Move a batch on to the status its age gives it; answer its requests on reaching the end."""
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return
        now = int(time.time())
        if batch["status"] == "cancelling":
            if time.monotonic() - batch["_cancel_at"] >= self.batch_step:
                self._finish(batch, "cancelled", now, answered=0)
            return
        steps = int((time.monotonic() - batch["_t0"]) / self.batch_step) if self.batch_step > 0 else 3
        fault = batch["_fault"]
        if steps >= 1 and fault is not None and fault[0] == "failed":
            detail = (
                fault[1]
                if isinstance(fault[1], dict)
                else {
                    "code": "token_limit_exceeded",
                    "line": None,
                    "param": None,
                    "message": "Enqueued token limit reached for this model. Try again later.",
                }
            )
            batch.update(status="failed", failed_at=now, errors={"object": "list", "data": [detail]})
            return
        if steps >= 1 and batch["in_progress_at"] is None:
            batch.update(status="in_progress", in_progress_at=now)
        if self.hold_batches:
            return
        if steps >= 2 and batch["finalizing_at"] is None:
            batch.update(status="finalizing", finalizing_at=now)
        if steps >= 3:
            if fault is not None and fault[0] == "expired":
                ids = [line["custom_id"] for line in batch["_lines"]]
                self._finish(batch, "expired", now, answered=ids.index(fault[1]))
            else:
                self._finish(batch, "completed", now, answered=len(batch["_lines"]))

    def _finish(self, batch: dict, status: str, now: int, answered: int) -> None:
        """Answer the first ``answered`` requests; the rest did not run (expired or cancelled)."""
        out, errors = [], []
        for k, line in enumerate(batch["_lines"]):
            rid = self._new_id("batch_req")
            if k >= answered:
                code = "batch_expired" if status == "expired" else "batch_cancelled"
                errors.append(
                    {
                        "id": rid,
                        "custom_id": line["custom_id"],
                        "response": None,
                        "error": {
                            "code": code,
                            "message": "This request could not be executed before the completion window expired."
                            if status == "expired"
                            else "The batch was cancelled.",
                        },
                    }
                )
                continue
            code, body = self._batch_answer(line["body"])
            entry = {
                "id": rid,
                "custom_id": line["custom_id"],
                "response": {"status_code": code, "request_id": self._new_id("req"), "body": body},
                "error": None,
            }
            (out if code == 200 else errors).append(entry)
            if code == 200:
                self.batch_answered[line["custom_id"]] += 1
        batch["request_counts"].update(completed=len(out), failed=len(errors))
        for entries, key, name in ((out, "output_file_id", "output"), (errors, "error_file_id", "error")):
            if entries:
                data = "".join(json.dumps(e) + "\n" for e in entries).encode()
                batch[key] = self._store_file(data, "batch_output", f"{batch['id']}_{name}.jsonl")["id"]
        batch.update(status=status, **{f"{status}_at": now})
        if status in ("expired", "cancelled") or batch["finalizing_at"] is None:
            batch["finalizing_at"] = batch["finalizing_at"] or now

    def _batch_answer(self, req: dict) -> tuple[int, dict]:
        """(status code, body) of one batch request: a chat completion, or an error for 4xx/5xx faults."""
        prompt = _last_user(req.get("messages") or [])
        try:
            opts = self._options(str(req.get("model", "")), prompt)
        except ValueError as e:
            return 400, {"error": {"message": str(e), "type": "invalid_request_error"}}
        fault = self._fault(opts, prompt, False)
        if fault in ("429", "500", "503", "401", "timeout", "drop", "malformed"):
            status = int(fault) if fault.isdigit() else 500
            return status, {"error": {"message": f"injected {fault}", "type": "fault", "code": None}}
        return 200, self._completion(req, prompt, opts, fault)


def _last_user(messages: list[dict]) -> str:
    users = [m for m in messages if m.get("role") == "user"]
    return str(users[-1].get("content", "")) if users else ""


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked HTTP/1.1 body."""
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)


def _pieces(text: str, parts: int = 3) -> list[str]:
    """``text`` cut into a few stream deltas that join back to it."""
    if not text:
        return []
    step = max(1, -(-len(text) // parts))
    return [text[i : i + step] for i in range(0, len(text), step)]


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
    parser.add_argument("--batch-step", type=float, default=0.05, help="seconds per batch status")
    parser.add_argument("--agent", type=int, default=0, help="tool calls before the answer (multi-turn scripting)")
    parser.add_argument("--wrong-turns", type=int, default=0, help="wrong answers before a right one")
    args = parser.parse_args(argv)
    server = FakeServer(
        args.host,
        args.port,
        latency=args.latency,
        reasoning=args.reasoning,
        n=args.n,
        retry_after=args.retry_after,
        hang=args.hang,
        fault=args.fault,
        chaos=args.chaos,
        chaos_seed=args.chaos_seed,
        batch_step=args.batch_step,
        agent=args.agent,
        wrong_turns=args.wrong_turns,
    )

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
