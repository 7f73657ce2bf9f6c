"""Protections of ``winnow serve`` at the HTTP level, below the routes (docs/serve.md, "Limits").

:class:`BodyGuard` (ASGI middleware) caps each request body's size (413) and the time to send it
(408) while the app reads it, so an oversized body is never held in memory. :class:`GuardedH11Protocol`
(uvicorn's HTTP/1.1 protocol, extended) gives each connection a deadline to send a whole request
head (408) and caps the open connections, closing the oldest one still sending a head when a new
one would pass the cap: clients that open connections and never finish a request cannot exhaust
the server's file descriptors or shut others out.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from winnow.serve.serving import ServingError

log = logging.getLogger("winnow.serve")

Message = dict[str, Any]


def error_bytes(status: int, message: str, code: str) -> bytes:
    """OpenAI's error body for ``status``, as JSON bytes."""
    kind = "server_overloaded" if status == 503 else "invalid_request_error"
    return json.dumps(ServingError(status, message, type=kind, code=code).body()).encode()


def raw_response(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, for a transport with no request
    in progress (h11 cannot answer a request it has not parsed)."""
    body = error_bytes(status, message, code)
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# ----------------------------------------------------------------------------- request bodies


class BodyGuard:
    """ASGI middleware: a body over ``max_bytes`` is answered 413, and one not sent within
    ``timeout_body`` seconds of the request head 408, as soon as that is known.

    A declared ``Content-Length`` over the cap is refused before a byte of the body is read; a
    chunked body is counted as it arrives. The app sees the client disconnect, its own answer is
    dropped, and the 413/408 is sent instead. After a 413 the connection stays open while the
    client finishes sending (uvicorn discards the rest, within the next head's deadline): closing
    on unread data would reset the connection and could lose the answer before the client reads
    it. After a 408 it is closed.
    """

    def __init__(self, app: Any, *, max_bytes: int, timeout_body: float):
        self.app = app
        self.max_bytes = int(max_bytes)
        self.timeout_body = float(timeout_body)

    def _too_large(self, size: str) -> tuple[int, str, str, bool]:
        return (
            413,
            f"the request body is {size}; this server takes at most {self.max_bytes} bytes (--max_request_bytes)",
            "request_too_large",
            False,
        )

    async def __call__(self, scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await _reply(send, *self._too_large(f"{declared} bytes"))
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_body
        received = 0
        body_done = False
        refusal: tuple[int, str, str, bool] | None = None  # status, message, code, close the connection

        async def guarded_receive() -> Message:
            nonlocal received, body_done, refusal
            if refusal is not None:
                return {"type": "http.disconnect"}
            if body_done:  # later receives only wait for a disconnect (streaming responses): no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                refusal = (
                    408,
                    f"the request body did not arrive within {self.timeout_body:g} s (--timeout_body)",
                    "request_timeout",
                    True,
                )
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    refusal = self._too_large(f"over {self.max_bytes} bytes (chunked)")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if refusal is None:
                await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if refusal is None:
                raise
        if refusal is not None:
            log.warning("refused a request to %s: %s", scope.get("path"), refusal[1])
            await _reply(send, *refusal)


def _content_length(scope: Message) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses a malformed Content-Length before the app runs
    return None


async def _reply(send: Any, status: int, message: str, code: str, close: bool) -> None:
    body = error_bytes(status, message, code)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": headers + ([(b"connection", b"close")] if close else []),
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ----------------------------------------------------------------------------- connections


class ConnectionGuard:
    """What the connections of one server share: the cap on open connections, the deadline for a
    request head, and which connections are waiting for one (oldest first)."""

    def __init__(self, *, max_connections: int, timeout_headers: float):
        self.max_connections = int(max_connections)
        self.timeout_headers = float(timeout_headers)
        self.open: set[GuardedH11Protocol] = set()
        self.waiting: dict[GuardedH11Protocol, None] = {}


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol where a connection must send each request head within the guard's
    deadline (from its opening, or from the end of the previous response), else it gets a 408 and
    is closed; and where a connection past the cap closes the oldest one waiting for a head (or,
    when every other one is busy with a request, is itself refused with a 503)."""

    def __init__(self, *args: Any, guard: ConnectionGuard, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self.guard
        guard.open.add(self)
        if len(guard.open) > guard.max_connections:
            oldest = next((c for c in guard.waiting if c is not self), None)
            if oldest is None:
                self._shut(
                    raw_response(
                        503,
                        f"the server holds {guard.max_connections} connections, all busy "
                        "(--max_connections); retry shortly",
                        "server_overloaded",
                        {"retry-after": "1"},
                    )
                )
                return
            oldest._shut(None)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a new request head was parsed: its deadline is met
            self._head_arrived()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._await_head()  # the next head is due in time too (a pipelined one disarms this at once)
        super().on_response_complete()

    # ------------------------------------------------------------------ head deadline

    def _await_head(self) -> None:
        self._head_arrived()
        self._head_timer = self.loop.call_later(self.guard.timeout_headers, self._head_timeout)
        self.guard.waiting[self] = None

    def _head_arrived(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.guard.waiting.pop(self, None)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is not h11.IDLE:  # still sending a body already answered (413): just close
            self._shut(None)
            return
        self._shut(
            raw_response(
                408,
                f"no complete request head within {self.guard.timeout_headers:g} s (--timeout_headers)",
                "request_timeout",
            )
        )

    def _shut(self, response: bytes | None) -> None:
        """Close now: with ``response`` written first, or (None) dropped at once, freeing its socket."""
        self._forget()
        if response is None:
            self.transport.abort()
            return
        self.transport.write(response)
        self.transport.close()

    def _forget(self) -> None:
        self._head_arrived()
        self.guard.open.discard(self)
