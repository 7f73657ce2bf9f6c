"""The one HTTP retry policy, shared by everything winnow sends over HTTP (the client engine, remote reward
models): which answers are worth another try, how long the server asked to wait, and the backoff."""

from __future__ import annotations

import random
import time
from typing import Any

RETRY_STATUS = frozenset({408, 409, 425, 429})  # and every 5xx
MAX_RETRY_AFTER_S = 600.0  # a server asking for more is capped (and the run says it waited)


def is_retryable(status: int) -> bool:
    """Whether an HTTP status may succeed on another try (timeouts, conflicts, rate limits, server errors)."""
    return status in RETRY_STATUS or status >= 500


def retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date), if the server sent one."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000.0)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            from email.utils import parsedate_to_datetime

            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def backoff(attempt: int, base_s: float, max_s: float, server_wait: float | None = None) -> float:
    """Seconds to wait before try number ``attempt`` (1 = the first retry): the server's Retry-After (capped,
    plus a little jitter), else exponential backoff with jitter in [cap/2, cap]."""
    if server_wait is not None:
        wait = min(server_wait, MAX_RETRY_AFTER_S)
        return wait + random.uniform(0, min(1.0, 0.1 * wait))
    cap = min(max_s, base_s * 2 ** (attempt - 1))
    return random.uniform(cap / 2, cap)
