"""Output files: the JSONL records, the resume index, the failed-row log and the run manifest.

Crash safety. Each finished position is recorded twice, in an order that makes the second write the
commit point: a group's lines are appended to the output and flushed, then one line is appended to
a small index beside it::

    {"p": position, "w": watermark, "e": output end offset, "k": kind, "t": totals, "i": row id}

``k`` says what became of the row: ``w`` written (lines in the output), ``f`` filtered (done, no
lines), ``x`` failed and to be tried again by a resumed run (an API outage, say), ``b`` failed for
good (a bad data row, an answer cut at the token limit). ``t`` holds the running totals of every
run of this output, so a summary can account for every row ever read.

On resume the output is cut back to the last indexed end offset (a torn or unindexed tail never
survives) and the resume state is read from the tail of the index alone: positions below the
watermark are all done, and the pipeline never starts a position more than ``reorder_window``
past the watermark, so only the index lines written since the watermark was ``reorder_window``
lower need reading. Rows waiting for a retry are kept in *checkpoint* lines
(``{"c": [positions], ...}``) written at every open and every ``reorder_window`` index lines;
the entries after the last checkpoint add (``x``) or settle (any other kind) retries. So resume
cost does not grow with the output, and a retry stays pending, in the index and in the failed
log, until its row is written or logged again, whatever is killed when.

The failed-row log (``<name>.failed.jsonl``) is what a person reads: one entry per row that
produced nothing, with its reason. It is appended to as rows fail and compacted (atomically) when
a run opens and closes it, so that it lists each such row once, and only while it is failed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from winnow.errors import ConfigError, OutputExistsError, StoreError, WinnowError

INDEX_VERSION = 2
WRITTEN, FILTERED, RETRY, FAILED = "w", "f", "x", "b"


def dumps(record: dict[str, Any]) -> str:
    """One JSONL line (no newline inside, UTF-8 kept readable)."""
    return json.dumps(record, ensure_ascii=False, default=str)


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=2, default=str), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a half-written copy must not be left behind
        raise


@dataclass
class Totals:
    """What every run of one output did, together: the rows it accounts for, by outcome."""

    groups: int = 0  # rows with lines in the output
    lines: int = 0
    filtered: int = 0
    failed: int = 0  # rows in the failed log (``retry`` of them will be tried again on resume)
    retry: int = 0

    @property
    def rows(self) -> int:
        return self.groups + self.filtered + self.failed

    def pack(self) -> list[int]:
        return [self.groups, self.lines, self.filtered, self.failed, self.retry]

    @classmethod
    def unpack(cls, value: Any) -> Totals:
        if isinstance(value, list) and len(value) == 5 and all(isinstance(v, int) for v in value):
            return cls(*value)
        return cls()


@dataclass
class ResumeState:
    """What earlier runs of this output finished: all positions below ``watermark`` plus ``done``,
    except those in ``redo`` (failed earlier for a reason worth another try)."""

    watermark: int = 0
    done: set[int] = field(default_factory=set)
    redo: set[int] = field(default_factory=set)
    totals: Totals = field(default_factory=Totals)

    def is_done(self, position: int) -> bool:
        return (position < self.watermark or position in self.done) and position not in self.redo

    def finished(self, position: int) -> bool:
        """Whether an earlier run settled ``position`` (written, filtered or logged), retries included."""
        return position < self.watermark or position in self.done

    def count_done(self, total: int) -> int:
        """How many of positions ``0..total-1`` are done (without probing each one)."""
        done = min(self.watermark, total) + sum(1 for p in self.done if self.watermark <= p < total)
        return done - sum(1 for p in self.redo if p < total and self.finished(p))


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
    """Refuse an existing output that is neither resumed nor overridden, and a directory that cannot
    be written (cheap: a run checks this before it loads any model)."""
    directory = Path(output_dir).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"--output_dir {output_dir}: cannot create it ({e.strerror or e}); choose a directory you can write to"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {output_dir}: not writable by this user; choose a directory you can write to")
    if output_file is None or resume or override:
        return
    path = directory / output_file
    if has_run(path):
        raise OutputExistsError(
            f"{path} already exists; add --resume true to continue it or --override_exist_file true to replace it"
        )


def side_files(path: Path) -> tuple[Path, Path, Path]:
    """(failed log, manifest, resume index) of the output ``path``."""
    stem = path.name[:-6] if path.name.endswith(".jsonl") else path.name
    return (
        path.with_name(f"{stem}.failed.jsonl"),
        path.with_name(f"{stem}.manifest.json"),
        path.with_name(f".{stem}.index"),
    )


def has_run(path: Path) -> bool:
    """Whether a run has written ``path``: lines in it, or a failed log or index beside it (a run
    whose every row failed leaves an empty output, and its failed log must not be lost)."""
    failed, _, index = side_files(path)
    return any(p.exists() and p.stat().st_size > 0 for p in (path, failed)) or (
        index.exists() and index.stat().st_size > 0 and path.exists()
    )


class OutputStore:
    """One output file and its side files, opened for a fresh run or for resuming one."""

    def __init__(
        self,
        output_dir: str,
        output_file: str | None,
        *,
        fingerprint: str,
        resume: bool = False,
        override: bool = False,
        reorder_window: int = 4096,
        fsync_every_s: float = 1.0,
    ):
        self.dir = Path(output_dir).expanduser()
        check_writable(self.dir, None, resume=resume, override=override)
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
        self.failed_path, self.manifest_path, self.index_path = side_files(self.path)
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
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if data.get("fingerprint") == self.fingerprint:
                candidates.append((manifest.stat().st_mtime, data.get("output_file")))
        candidates = [c for c in candidates if c[1] and has_run(self.dir / c[1])]
        return max(candidates)[1] if candidates else None

    def _open(self, resume: bool, override: bool) -> None:
        exists = has_run(self.path)
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
        if self._index.tell() == 0:
            self._write_index({"reorder_window": self.reorder_window, "v": INDEX_VERSION})
        self._watermark = self.state.watermark
        self._done_above = set(self.state.done)
        self._pending = set(self.state.redo)  # retries not yet settled, durable in the index
        self.totals = Totals(**vars(self.state.totals))
        self._since_checkpoint = 0
        self._compact_failed_log()
        self._failed = open(self.failed_path, "ab")  # noqa: SIM115
        self._checkpoint()

    def _check_fingerprint(self) -> None:
        if not self.manifest_path.exists():
            return
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return
        if data.get("fingerprint") not in (None, self.fingerprint):
            raise WinnowError(
                f"{self.path} was written with other data or sampling options (see {self.manifest_path.name}); "
                "resume with the same options, or choose another --output_file"
            )

    def _recover(self) -> ResumeState:
        """Read what earlier runs finished; cut the output and the index back to their last good line."""
        if not self.index_path.exists():
            raise WinnowError(
                f"{self.path} has no resume index ({self.index_path.name}); it was not written by "
                "winnow sample, or the index was deleted; use --override_exist_file true to start over"
            )
        with open(self.index_path, "rb") as f:
            header_line = f.readline()
        try:
            header = json.loads(header_line)
            window = int(header["reorder_window"])
        except (ValueError, KeyError, TypeError):
            header, window = {}, self.reorder_window
        self.reorder_window = max(self.reorder_window, window)
        size = self.path.stat().st_size
        last: dict | None = None
        last_end = len(header_line)
        newest_first: list[dict] = []  # the entries since the last checkpoint, newest first
        checkpoint: dict | None = None
        done: set[int] = set()
        for line, end in _tail_lines(self.index_path):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a damaged line: its group is simply redone
            if not isinstance(entry, dict) or "reorder_window" in entry:
                break  # the header: nothing earlier
            if last is None:
                if entry.get("e", 0) > size:
                    continue  # indexed, but the output lost it (power loss): redo it
                last, last_end = entry, end
            if checkpoint is None:
                if "c" in entry:
                    checkpoint = entry
                else:
                    newest_first.append(entry)
            if "p" in entry and entry["p"] >= last["w"]:
                done.add(entry["p"])
            if checkpoint is not None and entry["w"] < last["w"] - window:
                break  # every later-finished position is above this: nothing more to read
        self._truncate(self.index_path, last_end)
        if last is None:
            self._truncate(self.path, 0)
            return ResumeState(redo=self._legacy_retries() if header.get("v") is None else set())
        self._truncate(self.path, last["e"])
        if header.get("v") is None:  # an index of winnow 0.1's first format: retries live in the failed log
            pending = self._legacy_retries()
        else:
            pending = set(checkpoint["c"]) if checkpoint is not None else set()
        for entry in reversed(newest_first):
            if entry.get("k") == RETRY:
                pending.add(entry["p"])
            else:
                pending.discard(entry["p"])
        totals = Totals.unpack(last.get("t"))
        if "t" not in last:
            totals.groups = int(last.get("g", 0))
        return ResumeState(watermark=last["w"], done=done, redo=pending, totals=totals)

    def _legacy_retries(self) -> set[int]:
        return {e["position"] for e in self._failed_entries() if e.get("retry") and isinstance(e.get("position"), int)}

    def _failed_entries(self) -> list[dict]:
        if not self.failed_path.exists():
            return []
        out = []
        with open(self.failed_path, "rb") as f:
            for raw in f:
                try:
                    entry = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue  # a torn last line: its row is not indexed as failed, so it is redone
                if isinstance(entry, dict):
                    out.append(entry)
        return out

    def _compact_failed_log(self) -> None:
        """Rewrite the failed log to list each failed row once (its newest entry), and only rows the index
        says are failed: a retry whose row was written since, or an entry whose index line was lost to a
        kill (the row is redone), leaves the log."""
        entries = self._failed_entries()
        if not entries:
            return
        newest: dict[Any, dict] = {}
        for k, entry in enumerate(entries):
            position = entry.get("position")
            newest[position if isinstance(position, int) else ("no-position", k)] = entry
        keep = []
        for key, entry in newest.items():
            if isinstance(key, int):
                settled = key < self._watermark or key in self._done_above
                if (
                    not settled
                    or (entry.get("retry") and key not in self._pending)
                    or (not entry.get("retry") and key in self._pending)
                ):
                    continue
            keep.append(entry)
        if len(keep) == len(entries):
            return
        tmp = self.failed_path.with_name(self.failed_path.name + ".tmp")
        tmp.write_bytes(b"".join((dumps(e) + "\n").encode("utf-8") for e in keep))
        os.replace(tmp, self.failed_path)

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
        """Append one finished group's records (none: the row was filtered) and mark its position done."""
        if records:
            self._append(self._out, "".join(dumps(r) + "\n" for r in records).encode("utf-8"))
        self._settle(position, WRITTEN if records else FILTERED)
        if records:
            self.totals.groups += 1
            self.totals.lines += len(records)
        else:
            self.totals.filtered += 1
        self._mark(position, WRITTEN if records else FILTERED, row_id)

    def write_failed(
        self, position: int | None, row_id: str | None, source: str, reason: str, stage: str, retry: bool = False
    ) -> None:
        """Log a row that produced nothing and count it done for this run; ``retry`` rows (failures that
        may be transient, such as an API outage) are tried again by a resumed run."""
        entry: dict[str, Any] = {"id": row_id, "source": source, "stage": stage, "reason": reason}
        if position is not None:
            entry["position"] = position
        if retry:
            entry["retry"] = True
        self._append(self._failed, (dumps(entry) + "\n").encode("utf-8"))
        if position is None:
            return
        kind = RETRY if retry and position is not None else FAILED
        self._settle(position, kind)
        self.totals.failed += 1
        if kind == RETRY:
            self.totals.retry += 1
            self._pending.add(position)
        self._mark(position, kind, row_id)

    def _settle(self, position: int, kind: str) -> None:
        """A row an earlier run logged as failed is now written, filtered or failed again: it leaves
        the failed totals (and the retries) before its new outcome is counted."""
        if position in self._pending:
            self._pending.discard(position)
            self.totals.failed -= 1
            self.totals.retry -= 1

    def _mark(self, position: int, kind: str, row_id: str | None) -> None:
        self._done_above.add(position)
        while self._watermark in self._done_above:
            self._done_above.discard(self._watermark)
            self._watermark += 1
        self._write_index(
            {
                "p": position,
                "w": self._watermark,
                "e": self._out.tell(),
                "k": kind,
                "t": self.totals.pack(),
                **({"i": row_id} if row_id else {}),
            }
        )
        self._since_checkpoint += 1
        if self._since_checkpoint >= self.reorder_window:
            self._checkpoint()
        now = time.monotonic()
        if now - self._last_sync >= self.fsync_every_s:
            self.sync()
            self._last_sync = now

    def _checkpoint(self) -> None:
        """Record the rows waiting for a retry, so that a resume need not read the index further back."""
        self._write_index(
            {"c": sorted(self._pending), "w": self._watermark, "e": self._out.tell(), "t": self.totals.pack()}
        )
        self._since_checkpoint = 0

    def _write_index(self, entry: dict[str, Any]) -> None:
        self._append(self._index, (dumps(entry) + "\n").encode("utf-8"))

    def _append(self, f, data: bytes) -> None:
        """Append and flush, or say in one line which file could not be written and what to do."""
        try:
            f.write(data)
            f.flush()
        except OSError as e:
            raise self._write_error(f.name, e) from None

    def _write_error(self, name: str, e: OSError) -> StoreError:
        return StoreError(
            f"cannot write {name}: {e.strerror or e}; everything written before is kept: make room "
            "(or lift the limit) and rerun the same command with --resume true"
        )

    def sync(self) -> None:
        """Make what was written survive a power loss (output and failed log first, then the index)."""
        for f in (self._out, self._failed, self._index):
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise self._write_error(f.name, e) from None

    def close(self) -> None:
        if self._out.closed:
            return
        try:
            self.sync()
        finally:
            for f in (self._out, self._failed, self._index):
                try:
                    f.close()
                except OSError:
                    pass  # the sync above has said what could not be written
        self._compact_failed_log()
        if self.failed_path.exists() and self.failed_path.stat().st_size == 0:
            self.failed_path.unlink()

    def discard(self) -> None:
        """Remove the (closed) files of a run that settled no row: an empty output must not look
        like a finished one; the manifest stays and says why."""
        for path in (self.path, self.index_path, self.failed_path):
            if path.exists():
                path.unlink()

    def write_manifest(self, data: dict[str, Any]) -> None:
        try:
            atomic_write_json(
                self.manifest_path, {"output_file": self.path.name, "fingerprint": self.fingerprint, **data}
            )
        except OSError as e:
            raise self._write_error(str(self.manifest_path), e) from None


def parquet_record(record: dict[str, Any]) -> dict[str, Any]:
    """A record as Parquet holds it with one schema for every run: each completion's ``scores`` become a
    list of ``{name, value, steps}`` (not a map keyed by reward name), and their free-form ``info`` and the
    completion's ``trace`` (a search's steps, a trajectory's turn infos) JSON strings."""
    completions = record.get("completions")
    if not isinstance(completions, list):
        return record
    out = []
    for c in completions:
        c = dict(c)
        scores = c.pop("scores", None) or {}
        c["scores"] = [
            {
                "name": name,
                "value": s.get("value"),
                "steps": s.get("steps"),
                "info": json.dumps(s["info"], ensure_ascii=False, default=str) if s.get("info") else None,
            }
            for name, s in scores.items()
        ]
        if c.get("trace") is not None:
            c["trace"] = json.dumps(c["trace"], ensure_ascii=False, default=str)
        out.append(c)
    return {**record, "completions": out}


def write_parquet(jsonl: Path, parquet: Path, batch_rows: int = 2000) -> int:
    """The JSONL output again as Parquet (written atomically); returns the rows written. Two passes over
    the file: the first unifies the schemas of its batches, the second writes, so memory stays at one batch."""
    from winnow.errors import require

    pa = require("pyarrow", "hf", "--output_parquet")
    import pyarrow.parquet as pq

    def batches() -> Iterator[list[dict]]:
        rows: list[dict] = []
        with open(jsonl, "rb") as f:
            for raw in f:
                if raw.strip():
                    rows.append(parquet_record(json.loads(raw)))
                    if len(rows) >= batch_rows:
                        yield rows
                        rows = []
        if rows:
            yield rows

    schemas = [pa.Table.from_pylist(rows).schema for rows in batches()]
    if not schemas:
        return 0
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    tmp = parquet.with_name(parquet.name + ".tmp")
    written = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for rows in batches():
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                written += len(rows)
        os.replace(tmp, parquet)
    finally:
        tmp.unlink(missing_ok=True)
    return written
