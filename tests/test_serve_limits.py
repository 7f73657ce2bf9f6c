"""Hostile and broken clients against a real ``winnow serve`` subprocess (loopback only).

One server with small limits serves the whole module: oversized and slow bodies, half-open
connections, long lists, prompts too long to tokenize, input that used to be a 500, and the
request fields that used to be dropped silently (``min_p``, ``chat_template_kwargs``). Every loop
here is bounded; every socket is closed whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.commands import Server

MAX_BYTES = 200_000
TIMEOUT_HEADERS = 1.5
TIMEOUT_BODY = 4.0  # long enough to hold --max_connections busy connections while a test looks
MAX_CONNECTIONS = 64
CHAT = [{"role": "user", "content": "What is 2 + 3?"}]
# the tiny model's ChatML template, plus Qwen3's switch: enable_thinking=false pre-fills an empty think block
THINKING_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


@pytest.fixture(scope="module")
def limited_server(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-limits")
    template = folder / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    srv = Server(
        folder / "server.log",
        "--model",
        str(tiny_model),
        "--served_model_name",
        "tiny",
        "--max_new_tokens",
        "4",
        "--max_wait_ms",
        "50",
        "--template",
        str(template),
        "--max_request_bytes",
        str(MAX_BYTES),
        "--max_stop",
        "4",
        "--max_stop_chars",
        "32",
        "--max_messages",
        "8",
        "--max_prompts",
        "4",
        "--max_connections",
        str(MAX_CONNECTIONS),
        "--timeout_headers",
        str(TIMEOUT_HEADERS),
        "--timeout_body",
        str(TIMEOUT_BODY),
    )
    yield srv
    assert srv.stop(signal.SIGTERM) == 0, srv.output()[-2000:]


def post(limited_server, route: str, body: dict | bytes, timeout: float = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # ASCII: lone surrogates escaped
    return httpx.post(
        f"{limited_server.url}/v1/{route}",
        content=content,
        timeout=timeout,
        headers={"Content-Type": "application/json"},
    )


def error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text[:500]
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


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


# ----------------------------------------------------------------------------- body size and time


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


# ----------------------------------------------------------------------------- connections


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


# ----------------------------------------------------------------------------- list sizes


@pytest.mark.parametrize(
    "route, body, param, code, flag",
    [
        (
            "chat/completions",
            {"messages": CHAT, "stop": [f"s{i}" for i in range(10_000)]},
            "stop",
            "array_above_max_length",
            "--max_stop",
        ),
        (
            "chat/completions",
            {"messages": CHAT, "stop": ["ok", "x" * 33]},
            "stop[1]",
            "string_above_max_length",
            "--max_stop_chars",
        ),
        ("completions", {"prompt": "a", "stop": "x" * 33}, "stop", "string_above_max_length", "--max_stop_chars"),
        ("chat/completions", {"messages": CHAT * 9}, "messages", "array_above_max_length", "--max_messages"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 9}]},
            "messages[0].content",
            "array_above_max_length",
            "--max_messages",
        ),
        ("completions", {"prompt": ["a"] * 5}, "prompt", "array_above_max_length", "--max_prompts"),
        ("completions", {"prompt": [[1, 2]] * 5}, "prompt", "array_above_max_length", "--max_prompts"),
    ],
)
def test_lists_over_their_limit_are_400_naming_the_parameter(limited_server, route, body, param, code, flag):
    start = time.monotonic()
    err = error(post(limited_server, route, body), 400)
    assert (err["param"], err["code"]) == (param, code) and flag in err["message"], err
    assert time.monotonic() - start < 10  # refused, not run (10,000 stop strings held the model for minutes)


# ----------------------------------------------------------------------------- prompts too long


def test_prompt_surely_too_long_is_refused_without_tokenizing(limited_server):
    long_text = "hello world " * 2500  # 30,000 characters: over 2048 tokens of at most 13 characters
    for route, body, param in (
        ("chat/completions", {"messages": [{"role": "user", "content": long_text}]}, "messages"),
        ("completions", {"prompt": ["a", long_text]}, "prompt[1]"),
    ):
        err = error(post(limited_server, route, body), 400)
        assert err["code"] == "context_length_exceeded" and err["param"] == param
        assert "at least" in err["message"] and "2048" in err["message"], err  # judged from its length
    # a token-id prompt's length is known: refused with the exact numbers
    err = error(post(limited_server, "completions", {"prompt": list(range(5, 3005)), "max_tokens": 7}), 400)
    assert err["code"] == "context_length_exceeded" and "3007 tokens (3000 in the prompt, 7" in err["message"]


def test_certainly_too_long_is_sound_for_the_tiny_tokenizer(tiny_model):
    from winnow.engines import hf

    tok = hf.load_tokenizer(str(tiny_model))
    chars = hf.longest_token_chars(tok)
    assert json.loads(tok.backend_tokenizer.normalizer.__getstate__())["type"] == "NFC"  # Qwen2's tokenizer
    # its longest token is <|endoftext|>; NFC may fold up to 4 characters of non-ASCII text into one
    assert chars == hf.TokenChars(ascii=len("<|endoftext|>"), other=4 * len("<|endoftext|>"))
    texts = ["hello world " * 50, "<|im_start|>" * 40, "aaaa" * 200, "数学" * 300, "e\u0301" * 300, " " * 700, "x"]
    for text in texts:
        tokens = len(tok(text, add_special_tokens=False)["input_ids"])
        for limit in (1, 10, 50, 100, 500):
            if hf.certainly_too_long(text, limit, chars):
                assert tokens > limit, (text[:20], limit, tokens)
    assert hf.certainly_too_long("x" * (100 * 13 + 1), 100, chars)
    assert not hf.certainly_too_long("x" * (100 * 13), 100, chars)
    assert not hf.certainly_too_long("é" * (100 * 13 + 1), 100, chars)  # non-ASCII: 52 characters a token
    assert not hf.certainly_too_long("x" * 10**6, 1, None)


def test_longest_token_chars_knows_which_tokenizers_it_cannot_bound():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from winnow.engines import hf

    def fast(model, normalizer=None, pre_tokenizer=None):
        tok = Tokenizer(model)
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizer
        return PreTrainedTokenizerFast(tokenizer_object=tok)

    vocab = {"a": 0, "b": 1, "ab": 2, "abab": 3, "[UNK]": 4}
    bpe = models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "ab")])
    assert hf.longest_token_chars(fast(bpe, pre_tokenizer=pre_tokenizers.ByteLevel())) == hf.TokenChars(5, 5)
    # NFC may fold up to 4 characters of non-ASCII text into one before the tokens are found
    assert hf.longest_token_chars(
        fast(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "ab")]), normalizers.NFC())
    ) == hf.TokenChars(5, 20)
    lowered = normalizers.Sequence([normalizers.Replace("  ", " "), normalizers.Lowercase()])
    assert hf.longest_token_chars(fast(models.BPE(vocab=vocab, merges=[]), lowered)) == hf.TokenChars(10, 10)
    # a long word is one [UNK] for WordPiece; stripping accents and dropping whitespace shrink text without bound
    assert hf.longest_token_chars(fast(models.WordPiece(vocab=vocab, unk_token="[UNK]"))) is None
    assert hf.longest_token_chars(fast(models.BPE(vocab=vocab, merges=[]), normalizers.StripAccents())) is None
    assert hf.longest_token_chars(fast(models.BPE(vocab=vocab, merges=[]), None, pre_tokenizers.Whitespace())) is None
    assert hf.longest_token_chars(fast(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]", fuse_unk=True))) is None


# ----------------------------------------------------------------------------- 400, not 500


@pytest.mark.parametrize(
    "route, body, param",
    [
        ("chat/completions", {"messages": CHAT, "seed": 2**64}, "seed"),
        ("chat/completions", {"messages": CHAT, "seed": -(2**63) - 1}, "seed"),
        ("chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
            "messages[0].content[0].text",
        ),
        ("chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}, "messages[0].name"),
        ("chat/completions", {"messages": CHAT, "stop": ["\ud800"]}, "stop[0]"),
        ("chat/completions", {"messages": CHAT, "model": "\ud800"}, "model"),
        ("chat/completions", {"messages": CHAT, "chat_template_kwargs": {"x": ["\ud800"]}}, "chat_template_kwargs"),
        ("completions", {"prompt": ["ok", "\ud800"]}, "prompt[1]"),
        ("chat/completions", {"messages": CHAT, "repetition_penalty": 1e-308}, "repetition_penalty"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages[0].content[0].text",
        ),
    ],
)
def test_bad_input_is_400_naming_the_parameter_not_500(limited_server, route, body, param):
    err = error(post(limited_server, route, body), 400)
    assert err["param"] == param, err
    if "\\ud" in json.dumps(body):
        assert "surrogate" in err["message"]


def test_edge_values_are_served(limited_server):
    for extra in (
        {"seed": 2**64 - 1},
        {"seed": -(2**63)},
        {"temperature": 1e-300},
        {"top_k": 10**30},
        {"stop": ["", ""]},
        {"n": 2, "stream": True},
    ):
        resp = post(limited_server, "chat/completions", {"messages": CHAT, "max_tokens": 2, **extra})
        assert resp.status_code == 200, (extra, resp.text[:300])


# ----------------------------------------------------------------------------- fields that change the answer


def test_min_p_one_keeps_only_the_top_token(limited_server):
    greedy = {"messages": CHAT, "max_tokens": 8, "temperature": 0}
    sampled = {"messages": CHAT, "max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 4}
    want = post(limited_server, "chat/completions", greedy).json()["choices"][0]["message"]["content"]
    plain = [c["message"]["content"] for c in post(limited_server, "chat/completions", sampled).json()["choices"]]
    assert plain != [want] * 4  # sampling a random tiny model does not give the greedy answer four times
    top_only = post(limited_server, "chat/completions", {**sampled, "min_p": 1.0}).json()["choices"]
    assert [c["message"]["content"] for c in top_only] == [want] * 4
    completion = post(limited_server, "completions", {"prompt": "Step 1:", "max_tokens": 6, "temperature": 0})
    top = post(limited_server, "completions", {"prompt": "Step 1:", "max_tokens": 6, "seed": 3, "min_p": 1.0})
    assert top.json()["choices"][0]["text"] == completion.json()["choices"][0]["text"]


def test_chat_template_kwargs_reach_the_template_and_batch_correctly(limited_server):
    def prompt_tokens(resp) -> int:
        assert resp.status_code == 200, resp.text[:300]
        return resp.json()["usage"]["prompt_tokens"]

    base = prompt_tokens(post(limited_server, "chat/completions", {"messages": CHAT, "max_tokens": 1}))
    off = prompt_tokens(
        post(
            limited_server,
            "chat/completions",
            {"messages": CHAT, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": False}},
        )
    )
    assert off > base  # the empty think block was rendered

    async def mixed():
        async with httpx.AsyncClient(base_url=limited_server.url, timeout=60) as http:
            bodies = [
                {
                    "messages": CHAT,
                    "max_tokens": 2,
                    **({"chat_template_kwargs": {"enable_thinking": False}} if i % 2 else {}),
                }
                for i in range(6)
            ]
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=b) for b in bodies))

    before = limited_server.health()["engine_calls"]
    results = asyncio.run(mixed())
    assert [prompt_tokens(r) for r in results] == [base, off] * 3
    assert limited_server.health()["engine_calls"] - before < 6  # still batched together


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"min_tokens": 5}, "min_tokens"),
        ({"ignore_eos": True}, "ignore_eos"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs.add_generation_prompt"),
    ],
)
def test_fields_that_would_change_the_answer_are_refused(limited_server, extra, param):
    err = error(post(limited_server, "chat/completions", {"messages": CHAT, "max_tokens": 2, **extra}), 400)
    assert err["param"] == param, err
    harmless = {"ignore_eos": False, "min_tokens": 0, "skip_special_tokens": True, "store": True, "metadata": {}}
    assert post(limited_server, "chat/completions", {"messages": CHAT, "max_tokens": 2, **harmless}).status_code == 200
