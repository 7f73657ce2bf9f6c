"""Math answer verification with the ``math-verify`` library, with a per-verification timeout that
works off the main thread, run in a pool of worker processes.

math-verify's own timeouts use ``signal.alarm`` and refuse to run outside the main thread, so they
are switched off and winnow applies its own deadline around parse + verify: ``SIGALRM`` in a main
thread (the worker processes), an asynchronous exception injected by a timer elsewhere (sympy is
pure Python, so it is interrupted promptly). A worker stuck in C code past a hard deadline is
killed and the pool restarted; its verifications are "cannot judge".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import logging
import os
import re
import signal
import threading
from typing import Any

from winnow.errors import require


class VerifyTimeout(BaseException):
    """A verification ran past its deadline (a BaseException so library ``except Exception`` cannot eat it)."""


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the answer was cut off


def answer_text(completion: str) -> str:
    """What to parse from a completion: the last ``<answer>`` block, then its last ``\\boxed{}``."""
    tags = _ANSWER_TAG.findall(completion)
    text = tags[-1] if tags else completion
    boxed = last_boxed(text)
    return f"\\boxed{{{boxed}}}" if boxed is not None else text


def reference_text(reference: str) -> str:
    """What to parse from a reference: after a GSM8K ``####``, else its last ``\\boxed{}``, else all of it."""
    if "####" in reference:
        return reference.rsplit("####", 1)[1].strip()
    boxed = last_boxed(reference)
    if boxed is not None:
        return f"\\boxed{{{boxed}}}"
    plain = re.sub(r"\\[A-Za-z]+", "", reference)  # LaTeX commands aside, is it prose?
    if "\n" not in reference.strip() and len(reference) < 200 and not re.search(r"[A-Za-z]{2,}|:", plain):
        # a bare answer field ("4a-2", "1\\frac{1}{4}"): parse it as LaTeX, not as free text
        return f"\\boxed{{{reference.strip()}}}"
    return reference


def call_with_timeout(fn, seconds: float | None):
    """``fn()``, or :class:`VerifyTimeout` after ``seconds``, in any thread."""
    if not seconds or seconds <= 0:
        return fn()
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):

        def on_alarm(signum, frame):
            raise VerifyTimeout

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    target = threading.get_ident()
    lock = threading.Lock()
    state = {"done": False}

    def fire() -> None:
        with lock:
            if not state["done"]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(VerifyTimeout))

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        return fn()
    finally:
        with lock:
            state["done"] = True
        timer.cancel()


@functools.lru_cache(maxsize=1)
def _math_verify():
    mv = require("math_verify", "math", "the math reward")
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its "timeout disabled" warning: ours is on
    return mv


@functools.lru_cache(maxsize=4096)
def _parse_reference(reference: str):
    mv = _math_verify()
    return mv.parse(reference_text(reference), parsing_timeout=None)


def verify_answer(completion: str, reference: str | None, timeout: float | None = 5.0) -> tuple[float | None, str]:
    """(1.0 correct / 0.0 wrong / None cannot judge, why) for one completion against a reference."""
    if reference is None or not str(reference).strip():
        return None, "no reference"
    mv = _math_verify()

    def run() -> tuple[float | None, str]:
        gold = _parse_reference(str(reference))
        if not gold:
            return None, "reference cannot be parsed"
        pred = mv.parse(answer_text(completion), parsing_timeout=None)
        if not pred:
            return 0.0, "no answer found"
        ok = mv.verify(gold, pred, timeout_seconds=None)
        return (1.0, "correct") if ok else (0.0, "wrong")

    try:
        return call_with_timeout(run, timeout)
    except VerifyTimeout:
        return None, "timeout"
    except Exception as e:  # a parser bug on odd input is "cannot judge", not a crashed run
        return None, f"error: {type(e).__name__}"


def _parse_answer(text: str, timeout: float | None) -> list:
    """math-verify's parse of one answer text; [] when nothing parses, it times out or the parser fails."""
    mv = _math_verify()
    try:
        return call_with_timeout(lambda: mv.parse(text, parsing_timeout=None), timeout) or []
    except VerifyTimeout:
        return []
    except Exception:  # a parser bug on odd input: no answer, not a crashed report
        return []


def _equivalent(gold: list, pred: list, timeout: float | None) -> bool:
    mv = _math_verify()
    try:
        return bool(call_with_timeout(lambda: mv.verify(gold, pred, timeout_seconds=None), timeout))
    except VerifyTimeout:
        return False
    except Exception:
        return False


def answer_classes(answers: list[str | None], timeout: float | None = 5.0) -> list[int | None]:
    """The equivalence class of each answer text (numbered in order of appearance; None: nothing parses).

    Each distinct text is parsed once and grouped by its parsed value's canonical form (``0.5``, ``1/2`` and
    ``\\frac{1}{2}`` are one form); math-verify then compares only one representative per distinct form, so N
    answers with D distinct values cost at most D² verifications, not N².
    """
    parsed: dict[str, tuple[str, list] | None] = {}
    for text in answers:
        if text is not None and text not in parsed:
            value = _parse_answer(text, timeout)
            parsed[text] = (str(value[0]), value) if value else None
    form_class: dict[str, int] = {}
    representatives: list[list] = []
    out: list[int | None] = []
    for text in answers:
        entry = parsed.get(text) if text is not None else None
        if entry is None:
            out.append(None)
            continue
        form, value = entry
        if form not in form_class:
            match = next((i for i, rep in enumerate(representatives) if _equivalent(rep, value, timeout)), None)
            if match is None:
                match = len(representatives)
                representatives.append(value)
            form_class[form] = match
        out.append(form_class[form])
    return out


def verify_batch(pairs: list[tuple[str, str | None]], timeout: float | None) -> list[tuple[float | None, str]]:
    """Verify many (completion, reference) pairs (the unit of work sent to a worker process)."""
    return [verify_answer(c, r, timeout) for c, r in pairs]


def _warm() -> None:
    _math_verify()
    _parse_reference("1")


class MathVerifier:
    """Verifies answers in ``workers`` processes (0: in the calling thread); shared by math rewards."""

    def __init__(self, workers: int | None = None, timeout: float | None = 5.0, chunk: int = 16):
        self.workers = min(4, os.cpu_count() or 1) if workers is None else int(workers)
        self.timeout = timeout
        self.chunk = max(1, chunk)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {"workers": self.workers, "timeout": self.timeout}

    def _get_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                from winnow.procs import worker_context

                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.workers, mp_context=worker_context(), initializer=_warm
                )
            return self._pool

    def _restart(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            for proc in list(getattr(pool, "_processes", {}).values()):  # stuck in C code: no other way out
                proc.kill()
            pool.shutdown(wait=False, cancel_futures=True)

    def verify_blocking(self, pairs: list[tuple[str, str | None]]) -> list[tuple[float | None, str]]:
        """Verify in the calling thread, or in the pool when it has workers."""
        if self.workers <= 0:
            return verify_batch(pairs, self.timeout)
        return asyncio.run(self.verify(pairs))

    async def verify(self, pairs: list[tuple[str, str | None]]) -> list[tuple[float | None, str]]:
        """Verify without blocking the event loop."""
        if not pairs:
            return []
        loop = asyncio.get_running_loop()
        if self.workers <= 0:
            return await loop.run_in_executor(None, verify_batch, pairs, self.timeout)
        pool = self._get_pool()
        chunks = [pairs[i : i + self.chunk] for i in range(0, len(pairs), self.chunk)]
        futures = [loop.run_in_executor(pool, verify_batch, c, self.timeout) for c in chunks]
        # the in-worker deadline normally fires; this one catches a worker stuck where signals cannot reach
        hard = (self.timeout or 60) * self.chunk + 30
        done, pending = await asyncio.wait(futures, timeout=hard)
        if pending:
            for f in pending:
                f.cancel()
            self._restart()
        out: list[tuple[float | None, str]] = []
        for c, f in zip(chunks, futures, strict=True):
            if f in done and f.exception() is None:
                out.extend(f.result())
            else:
                out.extend([(None, "timeout (worker restarted)")] * len(c))
        return out

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
