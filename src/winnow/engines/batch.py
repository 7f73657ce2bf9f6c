"""The batch engine (``--sampler_engine client --batch_api true``): the client engine's requests sent
through a provider's OpenAI-style Batch API, at about half the price and with far higher rate limits,
answered within hours instead of seconds.

One ``generate`` call turns its prompts into requests (one per prompt with ``n``; ``n_mode: parallel``
sends ``n`` single requests), writes them as JSONL, uploads it in chunks of at most
``max_requests`` requests and ``max_bytes`` bytes (``POST /v1/files``), creates one batch per chunk
(``POST /v1/batches``), polls each (every ``poll_s`` seconds, backing off to ``poll_max_s``), downloads
its output and error files, and returns the completions aligned like any engine's. Every API call goes
through the client engine's retry ladder; the key never leaves the client (see ``openai.py``).

Durability. A request's ``custom_id`` is ``{position}-{first sample}-{digest of the request body}``: the
same row, asked the same way, has the same id in every run. A small log beside the output
(``.<name>.batches.jsonl``, appended and fsynced line by line) records, per submission, its ids and
input file before the batch is created (``creating``), the batch id once it is (``created``), and its
end (``finished``: status, output and error files, and the ids that got no usable answer). A resumed
run reads it first: a request whose id is in a batch still running or finished with its answer is
re-attached (its answer downloaded again if needed) and never sent again; a request whose batch
failed, expired or was cancelled before answering it is submitted anew. A batch whose creation was
cut short (a kill between ``creating`` and ``created``) is looked for among the provider's batches
by the ``winnow_key`` in its metadata; only if the provider has none is it submitted again. A
retried ``create`` looks for its batch the same way first, so a lost answer never makes a second
batch.

Ctrl-C stops polling; batches keep running at the provider and a ``--resume true`` re-attaches them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from winnow.engines.openai import INTERRUPTED, Interrupted, OpenAIEngine
from winnow.engines.prompts import errors
from winnow.errors import ConfigError, StoreError
from winnow.schema import Completion, Prompt, SamplingParams

TERMINAL = ("completed", "failed", "expired", "cancelled")
STATE_VERSION = 1


@dataclass
class _Request:
    """One line of a batch input file: ``count`` samples of prompt number ``slot``, from sample ``first``."""

    slot: int
    first: int
    count: int
    custom_id: str
    line: bytes


@dataclass
class _Submission:
    """One provider batch, as far as this run knows it."""

    key: str  # winnow's own id, in the batch's metadata (finds a batch whose creation answer was lost)
    ids: list[str]
    file_id: str | None = None
    batch_id: str | None = None
    status: str = "creating"  # the provider's status; "lost": never created, its requests are free again
    created: float = 0.0
    failed: set[str] = field(default_factory=set)  # ids the batch did not answer usably (known once finished)
    finished: bool = False
    output_file: str | None = None
    error_file: str | None = None
    reason: str = ""  # why the batch as a whole failed, expired or was cancelled
    task: asyncio.Task | None = None

    def answers(self, custom_id: str) -> bool:
        """Whether this batch has answered, or may still answer, ``custom_id``."""
        return self.status not in ("lost", "failed") and custom_id not in self.failed


class BatchLog:
    """The submissions of one output, one JSON line per event, appended and fsynced (a torn last line,
    from a kill mid-write, is skipped on reading)."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict[str, _Submission]:
        subs: dict[str, _Submission] = {}
        if not self.path.exists():
            return subs
        with open(self.path, "rb") as f:
            for raw in f:
                try:
                    e = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if not isinstance(e, dict) or "k" not in e:
                    continue
                if e.get("e") == "creating":
                    subs[e["k"]] = _Submission(e["k"], list(e["ids"]), file_id=e.get("file"), created=e.get("t", 0.0))
                    continue
                sub = subs.get(e["k"])
                if sub is None:
                    continue
                if e.get("e") == "created":
                    sub.batch_id, sub.status = e["batch"], "validating"
                elif e.get("e") == "lost":
                    sub.status = "lost"
                elif e.get("e") == "finished":
                    sub.status, sub.finished, sub.reason = e["status"], True, e.get("reason", "")
                    sub.output_file, sub.error_file = e.get("output"), e.get("errors")
                    sub.failed = set(e.get("failed") or ())
        return subs

    def append(self, entry: dict[str, Any]) -> None:
        data = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            with open(self.path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise StoreError(
                f"cannot write {self.path}: {e.strerror or e}; the batches submitted so far are "
                "recorded: make room and rerun with --resume true"
            ) from None


class BatchEngine:
    """The client engine's requests through a provider's Batch API (files + batches), resumable."""

    name = "batch"

    def __init__(
        self,
        model: str,
        *,
        max_requests: int = 50_000,
        max_bytes: int = 200 * 1024 * 1024,
        poll_s: float = 30.0,
        poll_max_s: float = 600.0,
        completion_window: str = "24h",
        batches_in_flight: int = 4,
        endpoint: str = "/v1/chat/completions",
        n_mode: str = "auto",
        state_path: str | os.PathLike | None = None,
        **client_kwargs: Any,
    ):
        if n_mode not in ("auto", "native", "parallel"):
            raise ConfigError(f"engine_kwargs n_mode must be auto, native or parallel, got {n_mode!r}")
        client_kwargs["stream"] = False  # a batch request is never streamed
        self.client = OpenAIEngine(model, **client_kwargs)
        self.model = model
        self.max_requests = int(max_requests)
        self.max_bytes = int(max_bytes)
        self.poll_s = float(poll_s)
        self.poll_max_s = max(self.poll_s, min(float(poll_max_s), 20 * self.poll_s))
        self.completion_window = completion_window
        self.batches_in_flight = max(1, int(batches_in_flight))
        self.endpoint = endpoint
        self.parallel = n_mode == "parallel"
        self.log: BatchLog | None = BatchLog(Path(state_path)) if state_path else None
        self.subs: dict[str, _Submission] = {}
        self.by_id: dict[str, _Submission] = {}  # custom_id -> the newest submission holding it
        self._ready: asyncio.Lock | None = None
        self._loaded = False
        self.requests_done = 0
        self.requests_sent = 0

    # ------------------------------------------------------------------ protocol

    def keep_state(self, output_path: Path, resume: bool) -> None:
        """Keep the submission log beside ``output_path``; a run that does not resume starts it afresh."""
        stem = output_path.name[:-6] if output_path.name.endswith(".jsonl") else output_path.name
        path = output_path.with_name(f".{stem}.batches.jsonl")
        if not resume:
            path.unlink(missing_ok=True)
        self.log = BatchLog(path)

    def batch_plan(self, n: int) -> tuple[int, int]:
        # a batch is worth its latency when large: whole batches per call, a few in flight
        per_prompt = n if self.parallel else 1
        return max(1, self.max_requests // per_prompt), self.batches_in_flight

    def describe(self) -> dict[str, Any]:
        return {
            **self.client.describe(),
            "name": self.name,
            "batch_api": True,
            "max_requests": self.max_requests,
            "max_bytes": self.max_bytes,
            "poll_s": self.poll_s,
            "completion_window": self.completion_window,
            "endpoint": self.endpoint,
            "n_mode": "parallel" if self.parallel else "native",
            "state": self.log.path.name if self.log else None,
        }

    def stats(self) -> dict[str, Any]:
        """Batches by status and requests sent and answered, plus the API calls' counts."""
        by_status = Counter(sub.status for sub in self.subs.values())
        return {
            "batches": dict(sorted(by_status.items())),
            "requests_sent": self.requests_sent,
            "requests_answered": self.requests_done,
            **self.client.stats(),
        }

    def progress_fields(self) -> dict[str, str]:
        """Progress-bar fields: batches submitted / in progress / done, and requests done."""
        live = [s for s in self.subs.values() if s.status != "lost"]
        done = sum(1 for s in live if s.status in TERMINAL)
        return {
            "batches": f"{len(live)} sent/{len(live) - done} running/{done} done",
            "requests": f"{self.requests_done}/{self.requests_sent}",
        }

    def interrupt(self) -> None:
        """Stop polling and submitting; batches keep running at the provider (``--resume true`` re-attaches)."""
        self.client.interrupt()

    async def aclose(self) -> None:
        tasks = [s.task for s in self.subs.values() if s.task is not None and not s.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.aclose()

    async def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        requests, out = self._requests(prompts, params)
        try:
            await self._load()
        except Interrupted:
            return [errors(params.n, INTERRUPTED) for _ in prompts]
        needed: dict[str, _Submission] = {}
        fresh: list[_Request] = []
        for r in requests:
            sub = self.by_id.get(r.custom_id)
            if sub is not None and sub.answers(r.custom_id):
                needed[sub.key] = sub
            else:
                fresh.append(r)
        for chunk in self._chunks(fresh, out):
            sub = await self._submit(chunk, out)
            if sub is not None:
                needed[sub.key] = sub
        tasks = []
        for sub in needed.values():
            if sub.task is None:
                sub.task = asyncio.create_task(self._follow(sub))
            tasks.append(sub.task)
        # shielded: a generate call cancelled does not stop batches other calls are waiting for too
        done = await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
        results: dict[str, dict | BaseException] = dict(zip(needed, done, strict=True))
        for r in requests:
            if out[r.slot][r.first] is not None:
                continue  # failed before it was sent
            sub = self.by_id[r.custom_id]
            got = results.get(sub.key)
            if isinstance(got, BaseException):
                if not isinstance(got, (Interrupted, asyncio.CancelledError)):
                    raise got
                completions = errors(r.count, INTERRUPTED)
            else:
                # popped: an answer is handed out once, and its memory goes with it
                completions = self._answer(sub, got.pop(r.custom_id, None) if got else None, params, r.count)
                self.requests_done += 1
            out[r.slot][r.first : r.first + r.count] = completions
        return [list(cs) for cs in out]

    # ------------------------------------------------------------------ requests

    def _requests(self, prompts: list[Prompt], params: SamplingParams) -> tuple[list[_Request], list[list]]:
        """The batch lines for ``prompts``, and the (empty) completion slots they fill."""
        n = params.n
        shares = [(k, 1) for k in range(n)] if self.parallel and n > 1 else [(0, n)]
        requests = []
        for slot, prompt in enumerate(prompts):
            for first, count in shares:
                body = self.client._body(prompt, params, count)
                digest = hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
                custom_id = f"{prompt.position}-{first}-{digest[:12]}"
                line = json.dumps(
                    {"custom_id": custom_id, "method": "POST", "url": self.endpoint, "body": body}, ensure_ascii=False
                ).encode("utf-8")
                requests.append(_Request(slot, first, count, custom_id, line))
        return requests, [[None] * n for _ in prompts]

    def _chunks(self, requests: list[_Request], out: list[list]) -> list[list[_Request]]:
        """``requests`` cut into batch input files within the request and byte limits."""
        chunks: list[list[_Request]] = []
        current: list[_Request] = []
        size = 0
        for r in requests:
            if len(r.line) + 1 > self.max_bytes:
                out[r.slot][r.first : r.first + r.count] = errors(
                    r.count, f"the request is {len(r.line) + 1} bytes, over --batch_max_bytes {self.max_bytes}"
                )
                continue
            if current and (len(current) >= self.max_requests or size + len(r.line) + 1 > self.max_bytes):
                chunks.append(current)
                current, size = [], 0
            current.append(r)
            size += len(r.line) + 1
        if current:
            chunks.append(current)
        return chunks

    # ------------------------------------------------------------------ submitting

    async def _submit(self, chunk: list[_Request], out: list[list]) -> _Submission | None:
        """Upload ``chunk`` and create its batch; None (the chunk's slots filled with errors) if the run
        stopped first."""
        sdk = self.client.client
        key = uuid.uuid4().hex[:16]
        data = b"".join(r.line + b"\n" for r in chunk)
        try:
            uploaded = await self.client.api_call(
                lambda: sdk.files.create(file=(f"winnow-{key}.jsonl", data, "application/jsonl"), purpose="batch"),
                "uploading a batch input file",
            )
            sub = _Submission(key, [r.custom_id for r in chunk], file_id=uploaded.id, created=time.time())
            self._record({"k": key, "e": "creating", "file": uploaded.id, "ids": sub.ids, "t": sub.created})
            self._add(sub)
            attempts = 0

            async def create() -> Any:
                nonlocal attempts
                attempts += 1
                if attempts > 1:  # the first try may have made the batch before its answer was lost
                    found = await self._find({key})
                    if key in found:
                        return found[key]
                return await sdk.batches.create(
                    input_file_id=uploaded.id,
                    endpoint=self.endpoint,
                    completion_window=self.completion_window,
                    metadata={"winnow_key": key},
                )

            batch = await self.client.api_call(create, "creating a batch")
        except Interrupted:
            for r in chunk:
                out[r.slot][r.first : r.first + r.count] = errors(r.count, INTERRUPTED)
            return None
        sub.batch_id, sub.status = batch.id, batch.status
        self._record({"k": key, "e": "created", "batch": batch.id})
        self.requests_sent += len(chunk)
        return sub

    def _add(self, sub: _Submission) -> None:
        self.subs[sub.key] = sub
        for cid in sub.ids:
            self.by_id[cid] = sub

    def _record(self, entry: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.append(entry)

    async def _load(self) -> None:
        """Read the submission log once; find the batches whose creation was cut short."""
        if self._ready is None:
            self._ready = asyncio.Lock()
        async with self._ready:
            if self._loaded:
                return
            self._loaded = True
            if self.log is None:
                return
            if not self.log.path.exists():
                self._record({"v": STATE_VERSION, "model": self.model, "endpoint": self.endpoint})
            for sub in self.log.read().values():
                self._add(sub)
            orphans = {s.key: s for s in self.subs.values() if s.status == "creating"}
            if orphans:
                found = await self._find(set(orphans), since=min(s.created for s in orphans.values()))
                for key, sub in orphans.items():
                    if key in found:
                        sub.batch_id, sub.status = found[key].id, found[key].status
                        self._record({"k": key, "e": "created", "batch": sub.batch_id})
                    else:
                        sub.status = "lost"
                        self._record({"k": key, "e": "lost"})

    async def _find(self, keys: set[str], since: float = 0.0) -> dict[str, Any]:
        """The provider's batches carrying these ``winnow_key``s, newest first, back to ``since`` (less an
        hour for clocks that disagree)."""
        sdk = self.client.client
        found: dict[str, Any] = {}
        after = None
        while keys - set(found):
            page = await self.client.api_call(
                functools.partial(sdk.batches.list, limit=100, **({"after": after} if after else {})), "listing batches"
            )
            for batch in page.data:
                key = (batch.metadata or {}).get("winnow_key")
                if key in keys:
                    found.setdefault(key, batch)
            if not page.data or not page.has_more or (since and page.data[-1].created_at < since - 3600):
                break
            after = page.data[-1].id
        return found

    # ------------------------------------------------------------------ waiting

    async def _follow(self, sub: _Submission) -> dict[str, dict]:
        """Poll ``sub`` until it ends, then its answers by custom_id (the output and error files' lines)."""
        sdk = self.client.client
        delay = self.poll_s
        while not sub.finished:  # at least one look: a batch found by its key may have ended already
            batch = await self.client.api_call(
                lambda: sdk.batches.retrieve(sub.batch_id), f"checking batch {sub.batch_id}"
            )
            sub.status = batch.status
            if batch.status in TERMINAL:
                sub.output_file, sub.error_file = batch.output_file_id, batch.error_file_id
                errors = (batch.errors.data or []) if batch.errors else []
                if errors:
                    sub.reason = "; ".join(f"{e.code}: {e.message}" for e in errors[:3])
                break
            if not await self.client._sleep(delay):
                raise Interrupted(INTERRUPTED)
            delay = min(delay * 1.5, self.poll_max_s)
        answers: dict[str, dict] = {}
        for file_id in (sub.output_file, sub.error_file):
            if not file_id:
                continue
            content = await self.client.api_call(
                functools.partial(sdk.files.content, file_id),
                f"downloading {file_id} of batch {sub.batch_id}",
                missing_ok=True,
            )
            if content is None:
                sub.reason = sub.reason or f"its file {file_id} is gone from the provider"
                continue
            for raw in content.content.splitlines():
                try:
                    entry = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(entry, dict) and entry.get("custom_id") in self.by_id:
                    answers[entry["custom_id"]] = entry
        if not sub.finished:
            sub.failed = {cid for cid in sub.ids if not _usable(answers.get(cid))}
            sub.finished = True
            self._record(
                {
                    "k": sub.key,
                    "e": "finished",
                    "status": sub.status,
                    "output": sub.output_file,
                    "errors": sub.error_file,
                    "failed": sorted(sub.failed),
                    "reason": sub.reason,
                }
            )
        return answers

    def _answer(self, sub: _Submission, entry: dict | None, params: SamplingParams, n: int) -> list[Completion]:
        """The completions of one request from its line in the output or error file."""
        scrub = self.client._scrub
        where = f"batch {sub.batch_id} {sub.status}"
        if entry is None:
            why = sub.reason or "no answer for this request in its output or error file"
            return errors(n, scrub(f"{where}: {why}"))
        response = entry.get("response") or {}
        error = entry.get("error")
        if error:
            return errors(n, scrub(f"{where}: {error.get('code')}: {error.get('message')}"))
        status = response.get("status_code")
        if status != 200:
            body = response.get("body")
            inner = body.get("error", body) if isinstance(body, dict) else body
            message = inner.get("message") if isinstance(inner, dict) else inner
            return errors(n, scrub(f"HTTP {status}: {str(message)[:500]} ({where})"))
        return self.client.answer(response.get("body"), params, n)


def _usable(entry: dict | None) -> bool:
    """Whether a result line holds an answer worth keeping (a 200 with some content)."""
    if not entry or entry.get("error"):
        return False
    response = entry.get("response") or {}
    if response.get("status_code") != 200:
        return False
    choices = (response.get("body") or {}).get("choices") or []
    return any(
        ((c.get("message") or {}).get("content") or (c.get("message") or {}).get("tool_calls"))
        for c in choices
        if isinstance(c, dict)
    )
