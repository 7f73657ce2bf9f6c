"""Request limits (serve/guard.py) against a real ``winnow serve`` with small limits: oversized and slow
bodies, trickled heads, half-open and idle connections, the connection cap. Every loop here is bounded;
every socket is closed whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from urllib.parse import urlsplit

import httpx

from tests.support.serve import (
    CHAT,
    MAX_BYTES,
    MAX_CONNECTIONS,
    TIMEOUT_BODY,
    TIMEOUT_HEADERS,
    error,
    post,
)


def connect(limited_server, timeout: float = 10) -> socket.socket:
    parts = urlsplit(limited_server.url)
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout)


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed this connection (EOF or reset), without waiting."""
    sock.setblocking(False)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def http_status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/1.1 ") else 0


def first_response(raw: bytes) -> tuple[int, dict]:
    """Status and JSON body of the first HTTP response in ``raw``."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    return http_status(raw), json.loads(rest[: _content_length(head)])


def read_response(sock: socket.socket, timeout: float = 10) -> bytes:
    """One whole HTTP response (head and ``Content-Length`` body), leaving the connection open."""
    sock.settimeout(timeout)
    raw = b""
    while True:
        head, sep, body = raw.partition(b"\r\n\r\n")
        if sep and len(body) >= _content_length(head):
            return raw
        chunk = sock.recv(65536)
        if not chunk:
            return raw
        raw += chunk


def _content_length(head: bytes) -> int:
    return next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )


def test_declared_body_over_the_cap_is_413_before_it_is_sent(limited_server):
    with connect(limited_server) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n"
        )  # 100 MB announced, not a byte of it sent
        raw = read_response(sock, timeout=5)  # the answer comes at once, though the body never does
    status, body = first_response(raw)
    assert status == 413, raw[:300]
    err = body["error"]
    assert err["code"] == "request_too_large" and "--max_request_bytes" in err["message"]
    assert str(MAX_BYTES) in err["message"] and err["type"] == "invalid_request_error"


def test_chunked_body_over_the_cap_is_413(limited_server):
    def chunks():
        for _ in range(30):  # 300 kB, chunked: no Content-Length to refuse up front
            yield b" " * 10_000

    resp = httpx.post(
        f"{limited_server.url}/v1/chat/completions",
        content=chunks(),
        timeout=30,
        headers={"Content-Type": "application/json"},
    )
    assert error(resp, 413)["code"] == "request_too_large"
    assert post(limited_server, "chat/completions", {"messages": CHAT, "max_tokens": 2}).status_code == 200


def test_body_sent_too_slowly_is_408(limited_server):
    with connect(limited_server) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"messages"'
        )  # then nothing more
        start = time.monotonic()
        raw = read_until_closed(sock, timeout=TIMEOUT_BODY + 15)
    assert http_status(raw) == 408, raw[:300]
    assert time.monotonic() - start < TIMEOUT_BODY + 10
    assert b"--timeout_body" in raw and b"request_timeout" in raw


def test_request_head_trickled_byte_by_byte_is_408(limited_server):
    with connect(limited_server) as sock:
        start = time.monotonic()
        for byte in b"GET /health HTTP/1.1\r\nHost: t\r\n":  # 3.2 s at 0.1 s a byte: past the deadline
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # closed by the server: what this test waits for
                break
            time.sleep(0.1)
        raw = read_until_closed(sock, timeout=10)
    assert http_status(raw) == 408 and b"--timeout_headers" in raw, raw[:300]
    assert time.monotonic() - start < TIMEOUT_HEADERS + 10


def test_half_open_connections_are_closed_and_others_still_served(limited_server):
    """200 clients that send half a request line (more than --max_connections): a normal request
    is answered meanwhile, and the server closes every one of them within --timeout_headers."""
    socks: list[socket.socket] = []
    try:
        for _ in range(200):
            sock = connect(limited_server)
            sock.sendall(b"POST /v1/chat/completions HT")
            socks.append(sock)
        resp = post(limited_server, "chat/completions", {"messages": CHAT, "max_tokens": 2}, timeout=30)
        assert resp.status_code == 200, resp.text[:300]

        deadline = time.monotonic() + TIMEOUT_HEADERS + 15
        open_socks = list(socks)
        while open_socks and time.monotonic() < deadline:
            open_socks = [s for s in open_socks if not closed_by_server(s)]
            time.sleep(0.05)
        assert not open_socks, f"{len(open_socks)} of {len(socks)} half-open connections still open"
    finally:
        for sock in socks:
            sock.close()
    assert limited_server.health()["status"] == "ok"


def test_past_the_cap_with_every_connection_busy_a_new_one_is_refused_with_503(limited_server):
    busy: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS + 4):  # each busy reading its body, until --timeout_body
            sock = connect(limited_server)
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\nExpect: 100-continue\r\n\r\n"
            )
            busy.append(sock)
            if sock.recv(65536).startswith(b"HTTP/1.1 100"):  # the server holds its head and reads its body
                sock.sendall(b"{")
        with connect(limited_server) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            status, body = first_response(read_until_closed(sock, timeout=10))
        assert status == 503 and body["error"]["code"] == "server_overloaded", body
        assert "--max_connections" in body["error"]["message"]
    finally:
        for sock in busy:
            sock.close()
    assert limited_server.health()["status"] == "ok"


def test_idle_keep_alive_connection_with_half_a_next_request_is_closed(limited_server):
    with connect(limited_server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        assert http_status(read_response(sock)) == 200
        sock.sendall(b"GET /hea")  # the next request, never finished
        raw = read_until_closed(sock, timeout=TIMEOUT_HEADERS + 15)
    assert http_status(raw) == 408 and b"--timeout_headers" in raw
