"""A reward model behind a server: ``--reward_model http://host:port/v1`` (or --orm_model/--prm_model).

Talks to ``POST {base_url}/rewards`` as ``winnow serve`` answers it (docs/serve.md): a batch of
conversations in, one score (and per-step scores for a PRM) per conversation out. Requests are sent
in chunks, a few at a time, and retried with backoff on 429/5xx/timeouts, honouring Retry-After.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from winnow.errors import RewardError, require
from winnow.retry import backoff, is_retryable, retry_after
from winnow.rewards.base import Sample, check_count
from winnow.schema import Score


def is_remote(spec: str) -> bool:
    """Whether a reward spec names a server rather than a model or a built-in."""
    return spec.startswith(("http://", "https://"))


class RemoteReward:
    """Scores from a reward server's ``/v1/rewards`` route."""

    def __init__(
        self,
        base_url: str,
        *,
        name: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        batch_size: int = 32,
        max_concurrency: int = 4,
        timeout: float = 300.0,
        max_retries: int = 5,
    ):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.name = name or "remote-rm"
        self.model = model
        self.batch_size = max(1, int(batch_size))
        self.max_retries = int(max_retries)
        self._api_key = api_key or os.environ.get("WINNOW_REWARD_API_KEY")
        self._limit = asyncio.Semaphore(max(1, int(max_concurrency)))
        self._timeout = timeout
        self._client = None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "remote",
            "base_url": self.base_url,
            "model": self.model,
            "batch_size": self.batch_size,
        }

    def _http(self):
        if self._client is None:
            httpx = require("httpx", "client", "remote reward models")
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._client = httpx.AsyncClient(timeout=self._timeout, headers=headers)
        return self._client

    async def score(self, samples: list[Sample]) -> list[Score]:
        chunks = [samples[i : i + self.batch_size] for i in range(0, len(samples), self.batch_size)]
        parts = await asyncio.gather(*(self._score_chunk(c) for c in chunks))
        return check_count(self.name, [s for part in parts for s in part], len(samples))

    async def _score_chunk(self, samples: list[Sample]) -> list[Score]:
        body: dict[str, Any] = {"messages": [s.messages for s in samples]}
        if self.model:
            body["model"] = self.model
        async with self._limit:
            data = await self._post(body)
        try:
            rows = sorted(data["data"], key=lambda d: d["index"])
            return [
                Score(value=None if d.get("score") is None else float(d["score"]), steps=d.get("step_scores"))
                for d in rows
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise RewardError(
                f"reward {self.name}: {self.base_url}/rewards answered an unexpected body ({type(e).__name__}: {e})"
            ) from None

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        url = f"{self.base_url}/rewards"
        for attempt in range(self.max_retries + 1):
            server_wait = None
            try:
                resp = await self._http().post(url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                error = f"{type(e).__name__}: {e}"
            else:
                if resp.status_code == 200:
                    return resp.json()
                error = f"HTTP {resp.status_code}: {resp.text[:300]}"
                if not is_retryable(resp.status_code):
                    raise RewardError(f"reward {self.name}: {url} refused the request ({error})")
                server_wait = retry_after(resp.headers)
            if attempt < self.max_retries:
                await asyncio.sleep(backoff(attempt + 1, 0.5, 30.0, server_wait))
        raise RewardError(f"reward {self.name}: {url} failed after {self.max_retries} retries ({error})")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
