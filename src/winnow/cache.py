"""Stage-1 cache files (``--cache_files``): earlier samples, matched to this run's rows by ``id``.

Two line shapes are read: the swift record (``messages`` ending with the sampled assistant turn,
``id``; one line per sample; what ``swift sample`` and ``winnow sample`` write by default) and the
raw record (``id``, prompt ``messages``, ``completions``: a list of completion dicts). A row takes
the lines whose ``id`` is its own id or swift's id of it (so files written by ``swift sample`` match
too), else the lines with its prompt (a file written with another ``--dataset`` spelling, say).
Scores in the cache are dropped: stage 2 scores afresh. A cache file that does not exist yet is
not an error when there is an engine: its rows are sampled, as swift does (its rft.py relies on it).
"""

from __future__ import annotations

import json
from pathlib import Path

from winnow.errors import DataError
from winnow.schema import Completion, Prompt


def _prompt_key(messages: list) -> str:
    body = [{"role": m.get("role"), "content": m.get("content")} for m in messages if m.get("role") != "system"]
    return json.dumps(body, ensure_ascii=False, sort_keys=True)


class SampleCache:
    """Completions from cache files, by row id (and by prompt, for lines without one)."""

    def __init__(self, paths: list[str], missing_ok: bool = False):
        self.by_id: dict[str, list[Completion]] = {}
        self.by_prompt: dict[str, list[Completion]] = {}
        self.lines = 0
        self.missing: list[str] = []
        for path in paths:
            file = Path(path).expanduser()
            if not file.is_file() and missing_ok:
                self.missing.append(str(file))
                continue
            self._read(file)

    def _read(self, path: Path) -> None:
        if not path.is_file():
            raise DataError(
                f"--cache_files {path}: no such file (with --sampler_engine no there is nothing to sample it with)"
            )
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                self._add(row, f"{path}:{lineno}")
                self.lines += 1

    def _add(self, row: dict, where: str) -> None:
        if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
            raise DataError(f"{where}: a cache line needs 'messages' (a swift or raw record)")
        messages = row["messages"]
        if isinstance(row.get("completions"), list):
            completions = [Completion.from_dict(d) for d in row["completions"]]
            for c in completions:
                c.scores, c.reward = {}, None
            completions = [c for c in completions if c.finish_reason != "reference"]
            prompt_messages = messages
        else:
            if not messages or messages[-1].get("role") != "assistant":
                raise DataError(f"{where}: a swift cache line must end with the assistant turn")
            completions = [Completion(text=str(messages[-1].get("content") or ""))]
            prompt_messages = messages[:-1]
        if row.get("id") is not None:
            self.by_id.setdefault(str(row["id"]), []).extend(completions)
        self.by_prompt.setdefault(_prompt_key(prompt_messages), []).extend(completions)

    def get(self, prompt: Prompt) -> list[Completion]:
        """The cached completions of a row (a fresh list; empty if the row is not cached)."""
        found = self.by_id.get(prompt.id)
        if found is None and prompt.swift_id:
            found = self.by_id.get(prompt.swift_id)
        if found is None:
            found = self.by_prompt.get(_prompt_key(prompt.messages), [])
        return [Completion(**{**c.__dict__, "scores": {}}) for c in found]
