"""The client engine (alias ``openai``): any OpenAI-compatible chat API as the policy, robust at scale.

One request per sample group (the API's ``n`` when the server honours it, else parallel single
requests), at most ``max_concurrency`` requests in flight, optional requests- and tokens-per-minute
limits, and winnow's own retry loop (exponential backoff with jitter, ``Retry-After`` honoured) on
429, 5xx, timeouts, connection errors, malformed bodies and empty answers.

What a request that still fails becomes (never an exception that sinks the run):

- no usable answer after the retries: ``Completion(finish_reason="error", error=...)``;
- an answer cut at ``max_new_tokens`` (``finish_reason="length"``) or blocked
  (``"content_filter"``): kept with that finish reason, its text and its tokens, and an ``error``
  saying why; a completion with an error is not written as a training line, so a row whose every
  sample is like this goes to the failed-rows log with the reason. ``keep_truncated=True`` (an
  engine kwarg) keeps length-truncated answers as usable samples instead. Neither is retried:
  the server would most likely do the same again, at a price.
- a bad API key or an unknown model (HTTP 401/403/404) stops the run with one clear error: every
  other row would fail the same way.

Reasoning models: the reasoning is read from ``reasoning_content`` or ``reasoning`` (servers use
either), streaming or not, into ``Completion.reasoning``.

Tokens: each completion carries the ``usage`` of the request that made it. With ``n`` > 1 in one
request the prompt is billed once: its tokens go to the first completion (so totals are right) and
the completion tokens are split in proportion to the length of each choice. Tokens of attempts
that were retried (an empty answer, say) are added to the first completion too: the totals are
what the server counted.

The API key (``api_key`` kwarg, else ``OPENAI_API_KEY``) is never put in ``describe()``, errors or
logs. The base URL is ``base_url``, else ``OPENAI_BASE_URL``, else the OpenAI default.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from winnow.errors import ConfigError, EngineError, require
from winnow.retry import backoff, is_retryable, retry_after
from winnow.schema import (
    FINISH_CONTENT_FILTER,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    Completion,
    Prompt,
    SamplingParams,
)

FATAL_STATUS = {401: "rejected the API key", 403: "refused access", 404: "does not know this model or route"}
INTERRUPTED = "interrupted: the run was stopped before this request finished"


class _Retry(Exception):
    """A failed attempt worth another try; ``wait`` is the server's Retry-After, if it sent one."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


class Interrupted(Exception):
    """The run is stopping: this request or API call (:meth:`OpenAIEngine.api_call`) was not made, or was
    cancelled at the shutdown deadline."""


class RateLimiter:
    """Requests- and tokens-per-minute limits, plus a shared pause after a 429 with Retry-After.

    Requests are spaced at ``60/rpm`` seconds. Tokens use a bucket holding one minute's worth that
    refills continuously; a request waits while the bucket is empty and its real usage is taken out
    afterwards (the bucket may go below zero, which delays the requests that follow).
    """

    def __init__(self, rpm: int | None = None, tpm: int | None = None):
        self.interval = 60.0 / rpm if rpm else 0.0
        self.tpm = tpm
        self.next_slot = 0.0
        self.tokens = float(tpm or 0)
        self.refilled = time.monotonic()
        self.paused_until = 0.0

    def pause(self, seconds: float) -> None:
        """Hold every request back for ``seconds`` (the server asked for it)."""
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    def spend(self, tokens: int) -> None:
        if self.tpm:
            self.tokens -= tokens

    async def acquire(self) -> None:
        while True:
            now = time.monotonic()
            wait = self.paused_until - now
            if self.tpm:
                self.tokens = min(float(self.tpm), self.tokens + (now - self.refilled) * self.tpm / 60.0)
                self.refilled = now
                if self.tokens <= 0:
                    wait = max(wait, -self.tokens * 60.0 / self.tpm + 0.01)
            if self.interval:
                wait = max(wait, self.next_slot - now)
            if wait <= 0:
                if self.interval:
                    self.next_slot = max(now, self.next_slot) + self.interval
                return
            await asyncio.sleep(wait)


def _strip_userinfo(url: str | None) -> str | None:
    """A URL without any ``user:password@`` part, for the manifest."""
    if not url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _split(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights``, summing exactly to ``total``."""
    if not weights:
        return []
    whole = sum(weights)
    if whole <= 0:
        out = [total // len(weights)] * len(weights)
    else:
        out = [total * w // whole for w in weights]
    out[0] += total - sum(out)
    return out


class _DirectHTTP:
    """Non-streaming chat requests over one aiohttp session, without the SDK's per-request machinery
    (request options, retries wrapper, response parsing), which costs most of the client's CPU at
    high concurrency. Failures are raised as the SDK's own exception types, so one error ladder
    (:meth:`OpenAIEngine._attempt`) serves both paths."""

    def __init__(self, openai: Any, client: Any, headers: dict | None, timeout: float, pool: int):
        self.openai = openai
        self.url = str(client.base_url).rstrip("/") + "/chat/completions"
        self.headers = {
            "Authorization": f"Bearer {client.api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            **(headers or {}),
        }
        self.timeout = timeout
        self.pool = pool
        self._session = None
        self._loop = None

    def _session_for_loop(self):
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop:  # an engine reused under a new event loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.pool, limit_per_host=self.pool),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers=self.headers,
            )
            self._loop = loop
        return self._session

    async def post(self, body: dict) -> Any:
        import aiohttp
        import httpx

        try:
            async with self._session_for_loop().post(self.url, data=json.dumps(body)) as resp:
                raw = await resp.read()
                status, headers = resp.status, resp.headers
        except asyncio.TimeoutError:
            raise
        except aiohttp.ClientError as e:
            raise self.openai.APIConnectionError(
                message=f"{type(e).__name__}: {e}", request=httpx.Request("POST", self.url)
            ) from None
        if status >= 400:
            try:
                err_body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                err_body = raw.decode("utf-8", errors="replace")[:500]
            response = httpx.Response(
                status, headers=dict(headers), content=raw, request=httpx.Request("POST", self.url)
            )
            raise self.openai.APIStatusError(f"Error code: {status}", response=response, body=err_body)
        return json.loads(raw)

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()


class OpenAIEngine:
    """An OpenAI-compatible chat completions API (vLLM, SGLang, ``winnow serve``, a hosted API)."""

    name = "client"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        stream: bool = False,
        max_concurrency: int = 64,
        rpm: int | None = None,
        tpm: int | None = None,
        request_timeout: float = 600.0,
        max_retries: int = 5,
        keep_truncated: bool = True,
        retry_base_s: float = 1.0,
        retry_max_s: float = 60.0,
        shutdown_grace_s: float = 5.0,
        n_mode: str = "auto",
        http_client: str = "auto",
        extra_body: dict | None = None,
        headers: dict | None = None,
        max_tokens_param: str = "max_tokens",
        **unused: Any,
    ):
        openai = require("openai", "client", "the client engine")
        self._openai = openai
        if max_concurrency < 1:
            raise ConfigError(f"--max_concurrency must be at least 1, got {max_concurrency}")
        if n_mode not in ("auto", "native", "parallel"):
            raise ConfigError(f"engine_kwargs n_mode must be auto, native or parallel, got {n_mode!r}")
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        if self.base_url and "@" in urlsplit(self.base_url).netloc:
            raise ConfigError(
                f"the base URL {_strip_userinfo(self.base_url)} holds credentials (user:key@host), "
                "which OpenAI-compatible APIs do not read: every request would fail; put the key in "
                "OPENAI_API_KEY or --engine_kwargs '{\"api_key\": ...}' and drop it from the URL"
            )
        key = api_key or os.environ.get("OPENAI_API_KEY")
        self._key_source = "engine_kwargs" if api_key else "OPENAI_API_KEY" if key else "none"
        if not key:
            if self.base_url is None:
                raise ConfigError(
                    "the client engine needs an API key: set OPENAI_API_KEY, or give "
                    '--engine_kwargs \'{"base_url": "http://host:port/v1"}\' for a local server'
                )
            key = "EMPTY"  # local servers (vLLM, SGLang, winnow serve) accept any key
        self._secret = key if key != "EMPTY" else None
        self.stream = bool(stream)
        self.max_concurrency = int(max_concurrency)
        self.request_timeout = float(request_timeout)
        self.max_retries = int(max_retries)
        self.keep_truncated = bool(keep_truncated)
        self.retry_base_s = float(retry_base_s)
        self.retry_max_s = float(retry_max_s)
        self.shutdown_grace_s = float(shutdown_grace_s)
        self.extra_body = dict(extra_body or {})
        self.max_tokens_param = max_tokens_param
        # None: not known yet; learnt from the first answer to a request with n > 1
        self.native_n: bool | None = {"auto": None, "native": True, "parallel": False}[n_mode]
        self.limiter = RateLimiter(rpm, tpm)
        self.rpm, self.tpm = rpm, tpm
        self.http_client_kind = self._http_client_kind(http_client)
        self.client = openai.AsyncOpenAI(
            api_key=key,
            base_url=self.base_url,
            max_retries=0,
            timeout=self.request_timeout,
            default_headers=headers or None,
            http_client=self._make_http_client(),
        )
        # plain (non-streaming) requests skip the SDK's per-request work when aiohttp is there
        self._direct = (
            _DirectHTTP(openai, self.client, headers, self.request_timeout, max(self.max_concurrency + 16, 100))
            if self.http_client_kind == "aiohttp" and not self.stream
            else None
        )
        self._slots: asyncio.Semaphore | None = None
        self._stop: asyncio.Event | None = None
        self._stopping = False
        self._aborted = False
        self._inflight: set[asyncio.Future] = set()
        self.unused_kwargs = sorted(unused)
        self.counts: Counter = Counter()  # requests, retries, failures by kind
        self.started = time.monotonic()

    # ------------------------------------------------------------------ setup

    def _http_client_kind(self, wanted: str) -> str:
        """aiohttp when installed (several times less CPU per request than the default), else httpx."""
        if wanted not in ("auto", "aiohttp", "httpx"):
            raise ConfigError(f"engine_kwargs http_client must be auto, aiohttp or httpx, got {wanted!r}")
        if wanted == "httpx":
            return "httpx"
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            if wanted == "aiohttp":
                raise ConfigError("http_client aiohttp needs: pip install 'openai[aiohttp]'") from None
            return "httpx"
        return "aiohttp" if hasattr(self._openai, "DefaultAioHttpClient") else "httpx"

    def _make_http_client(self):
        """The SDK's aiohttp client sized for every request in flight; None keeps the SDK default."""
        if self.http_client_kind != "aiohttp":
            return None
        limits = getattr(getattr(self._openai, "_base_client", None), "DEFAULT_CONNECTION_LIMITS", None)
        if limits is None:
            return self._openai.DefaultAioHttpClient()
        size = max(self.max_concurrency + 16, 100)  # idle connections are kept, not reopened per request
        return self._openai.DefaultAioHttpClient(
            limits=type(limits)(max_connections=size, max_keepalive_connections=size)
        )

    # ------------------------------------------------------------------ protocol

    def batch_plan(self, n: int) -> tuple[int, int]:
        # one prompt per call, and a few more prompts waiting than requests allowed in flight, so
        # the next request starts the moment one ends and a slow request holds up nobody else
        return 1, self.max_concurrency + max(4, self.max_concurrency // 8)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model,
            "base_url": _strip_userinfo(self.base_url) or "(OpenAI default)",
            "api_key": self._key_source,
            "stream": self.stream,
            "max_concurrency": self.max_concurrency,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "request_timeout": self.request_timeout,
            "max_retries": self.max_retries,
            "keep_truncated": self.keep_truncated,
            "http_client": self.http_client_kind,
            "native_n": self.native_n,
            **({"extra_body": self.extra_body} if self.extra_body else {}),
            **({"unused_kwargs": self.unused_kwargs} if self.unused_kwargs else {}),
        }

    def stats(self) -> dict[str, Any]:
        """Request counts for the manifest: requests sent, retries, failures by kind."""
        return dict(sorted(self.counts.items()))

    def progress_fields(self) -> dict[str, str]:
        """Extra progress-bar fields: requests/s and retries so far."""
        dt = max(time.monotonic() - self.started, 1e-9)
        out = {"req/s": f"{self.counts['requests'] / dt:.1f}"}
        if self.counts["retries"]:
            out["retries"] = str(self.counts["retries"])
        return out

    def interrupt(self) -> None:
        """Stop: start no new request; cancel those in flight after ``shutdown_grace_s`` seconds."""
        if self._stopping:
            return
        self._stopping = True
        if self._stop is not None:
            self._stop.set()
        asyncio.get_running_loop().call_later(self.shutdown_grace_s, self._abort)

    def _abort(self) -> None:
        self._aborted = True
        for task in list(self._inflight):
            task.cancel()

    async def aclose(self) -> None:
        if self._direct is not None:
            await self._direct.aclose()
        await self.client.close()

    async def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        self._loop_state()
        if len(prompts) == 1:
            return [await self._sample(prompts[0], params)]
        return list(await asyncio.gather(*(self._sample(p, params) for p in prompts)))

    def _loop_state(self) -> None:
        """Make the request slots and the stop event once, inside the run's event loop."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        if self._stop is None:
            self._stop = asyncio.Event()
            if self._stopping:
                self._stop.set()

    # ------------------------------------------------------------------ one prompt

    async def _sample(self, prompt: Prompt, params: SamplingParams) -> list[Completion]:
        """``params.n`` completions of one prompt: one request with ``n`` when the server honours it."""
        n = params.n
        out: list[Completion] = []
        if n > 1 and self.native_n is not False:
            out = await self._request(prompt, params, n)
            answered = [c for c in out if c.finish_reason != FINISH_ERROR]
            if answered and self.native_n is None:
                self.native_n = len(out) >= n
            if len(out) >= n:
                return out[:n]
        elif n == 1:
            return await self._request(prompt, params, 1)
        rest = n - len(out)
        more = await asyncio.gather(*(self._request(prompt, params, 1) for _ in range(rest)))
        return out + [c for cs in more for c in cs]

    def _body(self, prompt: Prompt, params: SamplingParams, n: int) -> dict[str, Any]:
        # what the run leaves unset is not sent: the server's defaults (often the model's own) apply
        body: dict[str, Any] = {"model": self.model, "messages": prompt.messages}
        if prompt.prefix:
            # continue a partial answer: vLLM's and SGLang's extension (an OpenAI API cannot do this)
            body["messages"] = [*prompt.messages, {"role": "assistant", "content": prompt.prefix}]
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        if prompt.tools:
            body["tools"] = prompt.tools
        for key, value in (
            ("temperature", params.temperature),
            ("top_p", params.top_p),
            (self.max_tokens_param, params.max_new_tokens),
            ("seed", None),
        ):
            if value is not None:
                body[key] = value
        if n > 1:
            body["n"] = n
        if params.stop:
            body["stop"] = params.stop
        if params.response_format:
            body["response_format"] = params.response_format
        # not OpenAI parameters: sent only when asked for (vLLM and SGLang accept them)
        if params.top_k is not None:
            body["top_k"] = params.top_k
        if params.repetition_penalty not in (None, 1.0):
            body["repetition_penalty"] = params.repetition_penalty
        if params.min_p:
            body["min_p"] = params.min_p
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        body.update(self.extra_body)
        return body

    async def _request(self, prompt: Prompt, params: SamplingParams, n: int) -> list[Completion]:
        """One request (with retries) for ``n`` samples; failures come back as error completions.

        The result has ``n`` completions, or fewer when the server ignored ``n`` (the caller asks
        for the rest).
        """
        assert self._slots is not None
        body = self._body(prompt, params, n)
        spent = [0, 0]  # tokens of attempts thrown away (empty answers), still billed
        attempt = 0
        while True:
            try:
                if self._stopping:
                    raise Interrupted
                async with self._slots:
                    await self.limiter.acquire()
                    if self._stopping:
                        raise Interrupted
                    out = await self._attempt(body, params, n, spent)
                out[0].prompt_tokens += spent[0]
                out[0].completion_tokens += spent[1]
                return out
            except Interrupted:
                return self._errors(n, INTERRUPTED, spent)
            except _Retry as e:
                self.counts["failed:" + _kind(str(e))] += 1
                if attempt >= self.max_retries:
                    return self._errors(n, f"{e} (gave up after {attempt + 1} attempts)", spent)
                attempt += 1
                if not await self._sleep(self._backoff(e, attempt)):
                    return self._errors(n, INTERRUPTED, spent)
            except EngineError:
                raise
            except Exception as e:  # a bug or a surprise: this row's failure, not the run's
                self.counts["failed:unexpected"] += 1
                return self._errors(n, self._scrub(f"unexpected {type(e).__name__}: {e}"), spent)

    def _backoff(self, e: _Retry, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt``: the server's Retry-After (which pauses every
        request), else exponential backoff with jitter."""
        self.counts["retries"] += 1
        delay = backoff(attempt, self.retry_base_s, self.retry_max_s, e.wait)
        if e.wait is not None:
            self.limiter.pause(delay)  # the server is saying it to every request
        return delay

    async def api_call(self, make: Callable[[], Awaitable[Any]], what: str, *, missing_ok: bool = False) -> Any:
        """One call of another API route (files, batches) through the same retry ladder as chat requests.

        Returns its result; None for HTTP 404 when ``missing_ok``. Raises :class:`EngineError` for a
        failure worth stopping the run (a bad key; an answer still failing after the retries), and
        :class:`Interrupted` when the run stops first.
        """
        self._loop_state()
        attempt = 0
        while True:
            if self._stopping:
                raise Interrupted(INTERRUPTED)
            await self.limiter.acquire()
            self.counts["api_calls"] += 1
            try:
                return await make()
            except (Interrupted, EngineError):  # from a call of its own inside ``make``
                raise
            except Exception as e:
                if missing_ok and getattr(e, "status_code", None) == 404:
                    return None
                try:  # a failure of the call's own stops the run; an EngineError from _classify goes straight up
                    raise EngineError(f"{what} failed: {self._classify(e)}") from None
                except _Retry as retry:
                    problem = retry
                if attempt >= self.max_retries:
                    raise EngineError(f"{what} failed: {problem} (gave up after {attempt + 1} attempts)") from None
                self.counts["failed:" + _kind(str(problem))] += 1
                attempt += 1
                if not await self._sleep(self._backoff(problem, attempt)):
                    raise Interrupted(INTERRUPTED) from None

    async def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` unless the run stops first; False if it did."""
        assert self._stop is not None
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
            return False
        except asyncio.TimeoutError:
            return not self._stopping

    def _errors(self, n: int, message: str, spent: list[int]) -> list[Completion]:
        out = [Completion(text="", finish_reason=FINISH_ERROR, error=message) for _ in range(n)]
        out[0].prompt_tokens, out[0].completion_tokens = spent
        return out

    def _scrub(self, text: str) -> str:
        """Error text as it may be logged: the API key never appears in it."""
        return text.replace(self._secret, "***") if self._secret else text

    # ------------------------------------------------------------------ one attempt

    async def _attempt(self, body: dict, params: SamplingParams, n: int, spent: list[int]) -> list[Completion]:
        """Send once; the completions, or :class:`_Retry` / :class:`EngineError`."""
        openai = self._openai
        self.counts["requests"] += 1
        call = asyncio.ensure_future(self._call(body))
        self._inflight.add(call)
        try:
            choices, usage = await call
        except asyncio.CancelledError:
            if self._aborted and call.cancelled() and not _being_cancelled():
                raise Interrupted from None
            raise
        except (openai.APIError, asyncio.TimeoutError, json.JSONDecodeError, UnicodeDecodeError) as e:
            message = self._classify(e)  # raises _Retry or EngineError
            self.counts[f"failed:{_kind(message)}"] += 1
            return self._errors(n, message, spent)
        finally:
            self._inflight.discard(call)
        return self._completions(choices, usage, params, spent, continuing=bool(body.get("continue_final_message")))

    def _classify(self, e: BaseException) -> str:
        """A failed exchange as :class:`_Retry` (raised: worth another try), :class:`EngineError` (raised: the
        run cannot go on) or the error text of a failure that is the request's own (returned)."""
        openai = self._openai
        if isinstance(e, openai.APIStatusError):
            status = e.status_code
            message = self._scrub(f"HTTP {status}: {_error_message(e)}")
            if status in FATAL_STATUS:
                where = _strip_userinfo(self.base_url) or "the OpenAI API"
                raise EngineError(f"{where} {FATAL_STATUS[status]} (model {self.model!r}): {message}") from None
            if is_retryable(status):
                raise _Retry(message, retry_after(e.response.headers)) from None
            return message
        if isinstance(e, (openai.APITimeoutError, asyncio.TimeoutError)):
            raise _Retry(f"timeout: no answer within --request_timeout {self.request_timeout:g}s") from None
        if isinstance(e, openai.APIConnectionError):
            raise _Retry(self._scrub(f"connection error: {e} {e.__cause__ or ''}".strip())) from None
        if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError, openai.APIResponseValidationError)):
            raise _Retry(f"malformed response: {e}") from None
        if isinstance(e, openai.APIError):  # an error event inside a stream
            raise _Retry(self._scrub(f"server error: {e}")) from None
        return self._scrub(f"unexpected {type(e).__name__}: {e}")

    async def _call(self, body: dict) -> tuple[list[dict], dict]:
        """The HTTP exchange: (choices as {content, reasoning, finish_reason}, usage)."""
        if not self.stream:
            if self._direct is not None:
                data = await self._direct.post(body)
            else:
                data = await self.client.post("/chat/completions", body=body, cast_to=object)
            return parse_chat(data)
        return await asyncio.wait_for(self._call_stream(body), self.request_timeout)

    async def _call_stream(self, body: dict) -> tuple[list[dict], dict]:
        stream = await self.client.post(
            "/chat/completions", body=body, cast_to=object, stream=True, stream_cls=self._openai.AsyncStream[object]
        )
        parts: dict[int, dict] = {}
        usage: dict = {}
        async for chunk in stream:
            if not isinstance(chunk, dict):
                raise json.JSONDecodeError("not a chat completion chunk", str(chunk)[:200], 0)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for ch in chunk.get("choices") or ():
                acc = parts.setdefault(
                    int(ch.get("index") or 0),
                    {"content": [], "reasoning": [], "stop_string": None, "finish_reason": None, "tool_calls": {}},
                )
                delta = ch.get("delta") or {}
                if delta.get("content"):
                    acc["content"].append(delta["content"])
                for call in delta.get("tool_calls") or ():  # pieces of a call, keyed by its index
                    slot = acc["tool_calls"].setdefault(
                        int(call.get("index") or 0),
                        {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
                    )
                    slot["id"] = call.get("id") or slot["id"]
                    function = call.get("function") or {}
                    slot["function"]["name"] += function.get("name") or ""
                    slot["function"]["arguments"] += function.get("arguments") or ""
                reasoning = delta.get("reasoning_content") or delta.get("reasoning")
                if reasoning:
                    acc["reasoning"].append(reasoning)
                if ch.get("finish_reason"):
                    acc["finish_reason"] = ch["finish_reason"]
                    acc["stop_string"] = _stop_string(ch)
        choices = [
            {
                "index": i,
                "content": "".join(p["content"]) if p["content"] else None,
                "reasoning": "".join(p["reasoning"]) or None,
                "finish_reason": p["finish_reason"],
                "stop_string": p["stop_string"],
                "tool_calls": [call for _, call in sorted(p["tool_calls"].items())] or None,
            }
            for i, p in sorted(parts.items())
        ]
        if not choices:
            raise json.JSONDecodeError("the stream ended without any choice", "", 0)
        unfinished = [c["index"] for c in choices if not c["finish_reason"]]
        if unfinished:
            # a stream's last chunk carries the finish reason; without it the answer is a fragment
            # (a dropped connection or upstream), never a finished sample
            raise _Retry(
                f"cut stream: the stream ended before choice {unfinished[0]} finished "
                "(no finish_reason); the connection or the server's upstream dropped"
            )
        return choices, usage

    def answer(self, data: Any, params: SamplingParams, n: int) -> list[Completion]:
        """Exactly ``n`` completions from a chat completion object that came some other way (a batch's
        output file); an unusable one (malformed, every choice empty, too few choices) as error values."""
        spent = [0, 0]
        try:
            out = self._completions(*parse_chat(data), params, spent)
        except json.JSONDecodeError as e:
            return self._errors(n, f"malformed response: {e}", spent)
        except _Retry as e:
            return self._errors(n, str(e), spent)
        if len(out) < n:
            missing = self._errors(n - len(out), f"the answer holds {len(out)} of the {n} choices asked for", [0, 0])
            out += missing
        return out[:n]

    def _completions(
        self, choices: list[dict], usage: dict, params: SamplingParams, spent: list[int], continuing: bool = False
    ) -> list[Completion]:
        """Completions from parsed choices; an answer with no usable choice is retried. Continuing a partial
        answer (``continuing``), an empty continuation is an answer: the partial one was already complete."""
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        self.limiter.spend(prompt_tokens + completion_tokens)
        weights = [len(c["content"] or "") + len(c["reasoning"] or "") + 1 for c in choices]
        out = []
        for c, ct in zip(choices, _split(completion_tokens, weights), strict=True):
            text = c["content"] or ""
            finish = c["finish_reason"] or FINISH_STOP
            stop_string = c.get("stop_string")
            comp = Completion(
                text=text,
                finish_reason=finish,
                completion_tokens=ct,
                reasoning=c["reasoning"],
                tool_calls=c.get("tool_calls"),
                stop_string=stop_string if stop_string in params.stop else None,
            )
            if finish == FINISH_LENGTH:
                if not self.keep_truncated:
                    comp.error = (
                        f"truncated: the answer reached --max_new_tokens {params.max_new_tokens} (finish_reason length)"
                    )
            elif finish == FINISH_CONTENT_FILTER:
                comp.error = "blocked by the server's content filter (finish_reason content_filter)"
            elif not text.strip() and not comp.tool_calls and not continuing:
                comp.finish_reason = FINISH_ERROR
                comp.error = "empty content" + (" (reasoning only)" if c["reasoning"] else "")
            out.append(comp)
        if out:
            out[0].prompt_tokens = prompt_tokens
        if all(c.finish_reason == FINISH_ERROR for c in out):
            # nothing usable, and a new sample may well be: retry, keeping the tokens it cost
            spent[0] += prompt_tokens
            spent[1] += completion_tokens
            raise _Retry(out[0].error or "empty content")
        for comp in out:
            if comp.error:
                self.counts["failed:" + _kind(comp.error)] += 1
        return out


def parse_chat(data: Any) -> tuple[list[dict], dict]:
    """(choices as {index, content, reasoning, tool_calls, finish_reason, stop_string}, usage) of a chat
    completion object; JSONDecodeError if it is not one."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise json.JSONDecodeError("not a chat completion object", str(data)[:200], 0)
    choices: list[dict[str, Any]] = []
    for ch in data["choices"]:
        msg = ch.get("message") or {}
        choices.append(
            {
                "index": ch.get("index", len(choices)),
                "content": msg.get("content"),
                "reasoning": msg.get("reasoning_content") or msg.get("reasoning"),
                "tool_calls": msg.get("tool_calls") or None,
                "finish_reason": ch.get("finish_reason"),
                "stop_string": _stop_string(ch),
            }
        )
    return choices, data.get("usage") or {}


def _stop_string(choice: dict) -> str | None:
    """The stop string a server says it stopped at: vLLM's and winnow serve's ``stop_reason``, SGLang's
    ``matched_stop`` (a token id there, or None, means it stopped otherwise)."""
    for key in ("stop_reason", "matched_stop"):
        value = choice.get(key)
        if isinstance(value, str):
            return value
    return None


def _kind(error: str) -> str:
    """The short kind of an error text, for counts: ``HTTP 429``, ``timeout``, ``truncated``..."""
    return error.split(":")[0].split(" (")[0]


def _being_cancelled() -> bool:
    """Whether the current task itself is being cancelled (not just a request it awaited)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return bool(cancelling()) if cancelling is not None else False


def _error_message(e: Exception) -> str:
    """The server's own error message, if its body has one."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:500]
        if isinstance(inner, str):
            return inner[:500]
    return str(getattr(e, "message", e))[:500]
