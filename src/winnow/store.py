"""Output files: the JSONL records, the resume index, the failed-row log and the run manifest.

Crash safety: each finished group's lines are appended to the output and flushed, then one line
``{"p": position, "w": watermark, "e": end_offset}`` is appended to a small index beside it. On
resume the output is cut back to the last indexed end offset (so a torn or unindexed tail never
survives) and the set of finished positions is read from the tail of the index alone: positions
below the watermark are all done, and the pipeline never starts a position more than
``reorder_window`` past the watermark, so only the index lines written since the watermark was
``reorder_window`` lower need reading. Resume cost therefore does not grow with the output.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from winnow.errors import OutputExistsError, WinnowError


def dumps(record: dict[str, Any]) -> str:
    """One JSONL line (no newline inside, UTF-8 kept readable)."""
    return json.dumps(record, ensure_ascii=False, default=str)


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class ResumeState:
    """What an earlier run of this output finished: all positions below ``watermark`` plus ``done``."""

    watermark: int = 0
    done: set[int] = field(default_factory=set)
    groups: int = 0
    redo: set[int] = field(default_factory=set)  # failed earlier for a reason worth another try

    def is_done(self, position: int) -> bool:
        return (position < self.watermark or position in self.done) and position not in self.redo

    def count_done(self, total: int) -> int:
        """How many of positions ``0..total-1`` are done (without probing each one)."""
        done = min(self.watermark, total) + sum(1 for p in self.done if self.watermark <= p < total)
        return done - sum(1 for p in self.redo if p < total and (p < self.watermark or p in self.done))


def _tail_lines(path: Path):
    """(line, end offset just past its newline) for the complete lines of ``path``, last first."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        pos = f.tell()
        carry = b""
        last = True  # the piece after the final newline is a torn line (or empty)
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + carry  # spans [pos, pos + len(data))
            parts = data.split(b"\n")
            start = pos + len(data)
            for part in reversed(parts[1:]):
                start -= len(part)
                if not last and part.strip():
                    yield part.decode("utf-8", errors="replace"), start + len(part) + 1
                last = False
                start -= 1
            carry = parts[0]
        if carry.strip() and not last:
            yield carry.decode("utf-8", errors="replace"), len(carry) + 1


def check_writable(output_dir: str | os.PathLike, output_file: str | None, *, resume: bool, override: bool) -> None:
    """Refuse an existing output that is neither resumed nor overridden (cheap: a run checks this
    before it loads any model)."""
    if output_file is None or resume or override:
        return
    path = Path(output_dir) / output_file
    if path.exists() and path.stat().st_size > 0:
        raise OutputExistsError(
            f"{path} already exists; add --resume true to continue it or --override_exist_file true to replace it"
        )


class OutputStore:
    """One output file and its side files, opened for a fresh run or for resuming one."""

    def __init__(self, output_dir: str, output_file: str | None, *, fingerprint: str, resume: bool = False,
                 override: bool = False, reorder_window: int = 4096, fsync_every_s: float = 1.0):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.reorder_window = reorder_window
        self.fsync_every_s = fsync_every_s
        name = output_file
        if name is None and resume:
            name = self._latest_matching()
        if name is None:
            name = datetime.now().strftime("%Y-%m-%d-%H-%M-%S") + ".jsonl"
            while (self.dir / name).exists():  # two runs in the same second
                name = name[:-6] + "-1.jsonl"
        self.path = self.dir / name
        stem = name[:-6] if name.endswith(".jsonl") else name
        self.failed_path = self.dir / f"{stem}.failed.jsonl"
        self.manifest_path = self.dir / f"{stem}.manifest.json"
        self.index_path = self.dir / f".{stem}.index"
        self.resumed = False
        self.state = ResumeState()
        self._open(resume, override)
        self._last_sync = time.monotonic()

    # ------------------------------------------------------------------ opening

    def _latest_matching(self) -> str | None:
        """The newest output in the directory that an earlier run of the same options wrote."""
        candidates = []
        for manifest in self.dir.glob("*.manifest.json"):
            try:
                data = json.loads(manifest.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            if data.get("fingerprint") == self.fingerprint:
                candidates.append((manifest.stat().st_mtime, data.get("output_file")))
        candidates = [c for c in candidates if c[1] and (self.dir / c[1]).exists()]
        return max(candidates)[1] if candidates else None

    def _open(self, resume: bool, override: bool) -> None:
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists and resume:
            self._check_fingerprint()
            self.state = self._recover()
            self.resumed = True
        elif exists and not override:
            check_writable(self.dir, self.path.name, resume=resume, override=override)
        else:
            for p in (self.path, self.failed_path, self.index_path):
                if p.exists():
                    p.unlink()
        self._out = open(self.path, "ab")  # noqa: SIM115 - owned by the store, closed in close()
        self._index = open(self.index_path, "ab")  # noqa: SIM115
        self._failed = open(self.failed_path, "ab")  # noqa: SIM115
        if self._index.tell() == 0:
            self._write_index({"reorder_window": self.reorder_window})
        self._watermark = self.state.watermark
        self._done_above = set(self.state.done)

    def _check_fingerprint(self) -> None:
        if not self.manifest_path.exists():
            return
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return
        if data.get("fingerprint") not in (None, self.fingerprint):
            raise WinnowError(
                f"{self.path} was written with other data or sampling options (see {self.manifest_path.name}); "
                "resume with the same options, or choose another --output_file"
            )

    def _recover(self) -> ResumeState:
        """Read what the earlier run finished; cut the output back to its last indexed line."""
        if not self.index_path.exists():
            raise WinnowError(f"{self.path} has no resume index ({self.index_path.name}); it was not written by "
                              "winnow sample, or the index was deleted; use --override_exist_file true to start over")
        with open(self.index_path, "rb") as f:
            header_line = f.readline()
        try:
            window = int(json.loads(header_line)["reorder_window"])
        except (ValueError, KeyError, TypeError):
            window = self.reorder_window
        self.reorder_window = max(self.reorder_window, window)
        size = self.path.stat().st_size
        last: dict | None = None
        last_end = len(header_line)
        done: set[int] = set()
        for line, end in _tail_lines(self.index_path):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a damaged line: its group is simply redone
            if "p" not in entry:
                break  # the header: nothing earlier
            if last is None:
                if entry["e"] > size:
                    continue  # indexed, but the output lost it (power loss): redo it
                last, last_end = entry, end
            if entry["p"] >= last["w"]:
                done.add(entry["p"])
            if entry["w"] < last["w"] - window:
                break  # every later-finished position is above this: nothing more to read
        self._truncate(self.index_path, last_end)
        if last is None:
            self._truncate(self.path, 0)
            return ResumeState()
        self._truncate(self.path, last["e"])
        return ResumeState(watermark=last["w"], done=done, groups=last.get("g", 0), redo=self._take_retries())

    def _take_retries(self) -> set[int]:
        """Positions the failed log marks for another try; their entries leave the log (a row that
        fails again is logged again)."""
        if not self.failed_path.exists():
            return set()
        keep: list[bytes] = []
        redo: set[int] = set()
        with open(self.failed_path, "rb") as f:
            for raw in f:
                try:
                    entry = json.loads(raw)
                except json.JSONDecodeError:
                    continue  # a torn last line
                if entry.get("retry") and isinstance(entry.get("position"), int):
                    redo.add(entry["position"])
                else:
                    keep.append(raw if raw.endswith(b"\n") else raw + b"\n")
        if redo:
            tmp = self.failed_path.with_name(self.failed_path.name + ".tmp")
            tmp.write_bytes(b"".join(keep))
            os.replace(tmp, self.failed_path)
        return redo

    @staticmethod
    def _truncate(path: Path, size: int) -> None:
        if path.exists() and path.stat().st_size > size:
            with open(path, "r+b") as f:
                f.truncate(size)

    # ------------------------------------------------------------------ writing

    def can_start(self, position: int) -> bool:
        """Whether the pipeline may start ``position`` without breaking the resume window."""
        return position < self._watermark + self.reorder_window

    def is_done(self, position: int) -> bool:
        return self.state.is_done(position)

    def write_group(self, position: int, records: list[dict[str, Any]], row_id: str | None = None) -> None:
        """Append one finished group's records and mark its position done."""
        if records:
            self._out.write("".join(dumps(r) + "\n" for r in records).encode("utf-8"))
            self._out.flush()
        self.state.groups += 1
        self._mark(position, row_id)

    def write_failed(self, position: int | None, row_id: str | None, source: str, reason: str, stage: str,
                     retry: bool = False) -> None:
        """Log a row that produced nothing and count it done for this run; ``retry`` rows (failures that
        may be transient, such as an API outage) are tried again by a resumed run."""
        entry = {"id": row_id, "source": source, "stage": stage, "reason": reason}
        if retry and position is not None:
            entry.update(position=position, retry=True)
        self._failed.write((dumps(entry) + "\n").encode("utf-8"))
        self._failed.flush()
        if position is not None:
            self._mark(position, row_id)

    def _mark(self, position: int, row_id: str | None) -> None:
        self._done_above.add(position)
        while self._watermark in self._done_above:
            self._done_above.discard(self._watermark)
            self._watermark += 1
        self._write_index({"p": position, "w": self._watermark, "e": self._out.tell(), "g": self.state.groups,
                           **({"i": row_id} if row_id else {})})
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_every_s:
            self.sync()
            self._last_sync = now

    def _write_index(self, entry: dict[str, Any]) -> None:
        self._index.write((dumps(entry) + "\n").encode("utf-8"))
        self._index.flush()

    def sync(self) -> None:
        """Make what was written survive a power loss (output first, then the index)."""
        for f in (self._out, self._failed, self._index):
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if self._out.closed:
            return
        self.sync()
        for f in (self._out, self._failed, self._index):
            f.close()
        if self.failed_path.exists() and self.failed_path.stat().st_size == 0:
            self.failed_path.unlink()

    def write_manifest(self, data: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path, {"output_file": self.path.name, "fingerprint": self.fingerprint,
                                               **data})


def iter_records(path: str | os.PathLike):
    """The records of a JSONL output, with their line numbers; a torn last line is skipped."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw)
            except json.JSONDecodeError:
                if not raw.endswith(b"\n"):
                    return  # the torn tail of an interrupted run
                raise WinnowError(f"{path}:{lineno}: not valid JSON") from None
