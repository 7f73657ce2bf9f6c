"""Datasets: specs (``path_or_id[:subset][#N]``), lazy loading, format detection, order and shards.

Rows are read lazily: a first pass over a JSONL file records only byte offsets and a 64-bit key
per row, so the row order (shuffle, ``#N`` sampling, ``--data_range`` shards) is decided without
holding the rows, and each row is parsed only when the pipeline asks for it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from winnow.errors import DataError
from winnow.schema import BadRow, Message, Prompt

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ROLES = {"system", "user", "assistant", "tool"}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
# Columns that hold the reference answer, best first.
REFERENCE_COLUMNS = ("answer", "solution", "ground_truth", "reference", "gt", "target")


# ----------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class DatasetSpec:
    """One ``--dataset`` value: where the rows are, an optional subset and split, an optional row count."""

    path: str
    subset: str | None = None
    n: int | None = None
    text: str = ""
    split: str | None = None  # a hub dataset's split (default: train)


def parse_dataset_spec(text: str) -> DatasetSpec:
    """Parse ``path_or_id[:subset][@split][#N]``; a local path is never split on ':' or '@'."""
    body, n = text, None
    if "#" in text:
        body, _, count = text.rpartition("#")
        try:
            n = int(count)
        except ValueError:
            raise DataError(f"--dataset {text!r}: the part after '#' must be a row count, got {count!r}") from None
        if n < 0:
            raise DataError(f"--dataset {text!r}: the row count must not be negative")
    subset = split = None
    if not os.path.exists(body) and "@" in body:
        body, _, split = body.rpartition("@")
    if not os.path.exists(body) and ":" in body:
        body, _, subset = body.partition(":")
    return DatasetSpec(path=body, subset=subset or None, n=n, text=text, split=split or None)


# ----------------------------------------------------------------------------- sources (random access)


def _key64(data: bytes) -> int:
    return int.from_bytes(hashlib.md5(data).digest()[:8], "big")


class JsonlSource:
    """A JSONL file, indexed by byte offsets; rows are parsed on access."""

    def __init__(self, path: Path):
        self.path = path
        self.name = str(path)
        self.offsets = array("Q")
        self.lines = array("L")
        self.keys = array("Q")
        with open(path, "rb") as f:
            offset = 0
            for lineno, raw in enumerate(f, start=1):
                stripped = raw.strip()
                if stripped:
                    self.offsets.append(offset)
                    self.lines.append(lineno)
                    self.keys.append(_key64(_id_bytes(stripped)))
                offset += len(raw)
        self._fh: BinaryIO | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def where(self, i: int) -> str:
        return f"{self.name}:{self.lines[i]}"

    def row(self, i: int) -> Any:
        if self._fh is None:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open for lazy reads
        self._fh.seek(self.offsets[i])
        raw = self._fh.readline()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"invalid JSON ({e})") from None


def _id_bytes(raw_line: bytes) -> bytes:
    """What a row's id is made from: its own ``id`` field if it has one, else the whole row."""
    if b'"id"' in raw_line:
        try:
            obj = json.loads(raw_line)
            if isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)):
                return ("id:" + str(obj["id"])).encode()
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    return raw_line


class TableSource:
    """Rows that come as a table: JSON arrays, CSV, Parquet and hub datasets (random access).

    ``broken`` maps row numbers that could not be read (a ragged CSV line) to the reason; reading
    one raises ``ValueError``, so it becomes a bad row of its own and the rest of the file goes on.
    """

    def __init__(
        self,
        name: str,
        rows: Any,
        line_offset: int = 1,
        label: str = "row",
        lines: list[int] | None = None,
        broken: dict[int, str] | None = None,
    ):
        self.name = name
        self.rows = rows  # list of dicts, or a datasets.Dataset (memory-mapped)
        self.line_offset = line_offset
        self.label = label
        self.lines = lines
        self.broken = broken or {}
        self.keys = array("Q")
        for i in range(len(rows)):
            row = rows[i]
            if i in self.broken:
                data = f"broken:{i}:{self.broken[i]}".encode()
            elif isinstance(row, dict) and isinstance(row.get("id"), (str, int)):
                data = ("id:" + str(row["id"])).encode()
            else:
                data = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode()
            self.keys.append(_key64(data))

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        if self.lines is not None:
            return f"{self.name}:{self.lines[i]}"
        if self.label == "line":
            return f"{self.name}:{i + self.line_offset}"
        return f"{self.name} row {i}"

    def row(self, i: int) -> Any:
        if i in self.broken:
            raise ValueError(self.broken[i])
        return self.rows[i]


class BrokenSource:
    """A file of a dataset folder that cannot be read at all: one bad row naming the file and why,
    so that the other files of the folder are still sampled."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        self.keys = array("Q", [_key64(f"broken:{name}".encode())])

    def __len__(self) -> int:
        return 1

    def where(self, i: int) -> str:
        return self.name

    def row(self, i: int) -> Any:
        raise ValueError(self.reason)


def _not_utf8(path: Path, e: UnicodeDecodeError) -> DataError:
    return DataError(
        f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); convert the file "
        f"to UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}"
    )


def _read_csv(path: Path) -> TableSource:
    """A CSV file with a header line; a line with more or fewer fields than the header is a bad row."""
    rows: list[dict] = []
    lines: list[int] = []
    broken: dict[int, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: empty CSV file; the first line must name the columns")
            for record in reader:
                if not any(field.strip() for field in record):
                    continue  # a blank line
                lines.append(reader.line_num)
                if len(record) != len(header):
                    broken[len(rows)] = (
                        f"this line has {len(record)} fields and the header {len(header)}; "
                        "quote fields that hold commas or line breaks"
                    )
                    rows.append({})
                else:
                    rows.append(dict(zip(header, record, strict=True)))
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV file ({e}); check its quoting") from None
    return TableSource(str(path), rows, lines=lines, broken=broken)


def _open_file(path: Path):
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return JsonlSource(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: invalid JSON ({e.msg}); a .json dataset must be one JSON array "
                "of rows (use .jsonl for one row per line)"
            ) from None
        if isinstance(data, dict):
            # {"data": [...]} style wrappers
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) == 1:
                data = lists[0]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON array of rows")
        return TableSource(str(path), data)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises its own error types for damaged files
            raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
        return TableSource(str(path), table.to_pylist())
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_SUFFIXES)}")


def _open_folder_file(path: Path):
    """One file of a dataset folder: a file that cannot be read fails as one bad row, not the run."""
    try:
        return _open_file(path)
    except DataError as e:
        return BrokenSource(str(path), f"{e}; the other files of the folder are used")
    except OSError as e:
        return BrokenSource(
            str(path), f"cannot read the file ({e.strerror or e}); the other files of the folder are used"
        )


def _open_hub(spec: DatasetSpec):
    """A Hugging Face hub dataset (``--use_hf true``), through the datasets library and its cache."""
    from winnow import hub

    try:
        import datasets
    except ImportError:
        raise DataError(
            f"--dataset {spec.text}: not a local file or folder, and loading hub datasets needs "
            "the datasets library: pip install 'winnow[hf]'"
        ) from None
    cached = Path(datasets.config.HF_DATASETS_CACHE) / spec.path.replace("/", "___")
    # offline, the datasets library reads its own cache; online, a hub that does not answer is one line at once
    why = None if cached.is_dir() or hub.hf_offline() else hub.unreachable_reason(hub.hf_endpoint())
    if why is not None:
        raise hub.unavailable_error("--dataset", spec.path, "dataset", "Hugging Face", why, str(cached))
    try:
        ds = datasets.load_dataset(spec.path, spec.subset, split=spec.split or "train", token=hub.token())
    except Exception as e:  # the library raises many kinds; all mean "cannot load"
        raise DataError(
            f"--dataset {spec.text}: no local file or folder by that name, and loading it from the "
            f"Hugging Face hub failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    return TableSource(spec.path + (f":{spec.subset}" if spec.subset else ""), ds)


def _data_files(root: Path, skip_hidden: bool = False) -> list[Path]:
    """The data files below ``root`` (by suffix), sorted; ``skip_hidden``: none dot-named or in a dot-named folder."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in FILE_SUFFIXES
        and not (skip_hidden and any(part.startswith(".") for part in p.relative_to(root).parts))
    )


def _pick(files: list[Path], root: Path, token: str) -> list[Path]:
    """The files whose path (below ``root``) names ``token``: a folder of that name, or a file name's part."""

    def names(p: Path) -> set[str]:
        rel = p.relative_to(root)
        return {*rel.parts[:-1], *re.split(r"[-_.]", p.stem), p.stem}

    return [p for p in files if token in names(p)]


def _open_modelscope(spec: DatasetSpec) -> list:
    """A ModelScope dataset (swift's default hub): its repository's data files, read like a dataset folder;
    ``:subset`` and ``@split`` pick the files whose folder or name says so (the split defaults to train
    when the files are split)."""
    from winnow import hub

    root = hub.dataset_dir(spec.path, "--dataset")
    files = _data_files(root, skip_hidden=True)  # a repository's .git and the SDK's dot files are no data
    if not files:
        raise DataError(
            f"--dataset {spec.text}: the ModelScope dataset at {root} has no {'/'.join(FILE_SUFFIXES)} files"
        )
    if spec.subset:
        files = _pick(files, root, spec.subset)
        if not files:
            raise DataError(f"--dataset {spec.text}: no files of subset {spec.subset!r} in {root}")
    split = spec.split or ("train" if _pick(files, root, "train") else None)
    if split:
        chosen = _pick(files, root, split)
        if not chosen:
            raise DataError(f"--dataset {spec.text}: no files of split {split!r} in {root}")
        files = chosen
    return [_open_folder_file(p) for p in files]


def open_sources(spec: DatasetSpec) -> list:
    """The row sources one spec names: a file, every data file of a folder, or a hub dataset."""
    path = Path(spec.path).expanduser()
    if not path.exists():
        from winnow.registry import REGISTRY

        named = REGISTRY.get("dataset", spec.path)  # a registered name (the demo world's, say)
        if named is not None:
            path = Path(named.obj())
    if path.is_file():
        try:
            return [_open_file(path)]
        except OSError as e:
            raise DataError(f"--dataset {spec.text}: cannot read {path} ({e.strerror or e})") from None
    if path.is_dir():
        files = _data_files(path)
        if not files:
            raise DataError(f"--dataset {spec.text}: the folder has no {'/'.join(FILE_SUFFIXES)} files")
        return [_open_folder_file(p) for p in files]
    looks_local = spec.path.startswith((".", "/", "~")) or Path(spec.path).suffix.lower() in FILE_SUFFIXES
    if looks_local:
        raise DataError(f"--dataset {spec.text}: no such file or folder")
    from winnow import hub

    return [_open_hub(spec)] if hub.use_hf() else _open_modelscope(spec)


# ----------------------------------------------------------------------------- formats


def detect_format(row: Any) -> str | None:
    """The row format of a dataset, from one row's keys."""
    if not isinstance(row, dict):
        return None
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row:
        return "alpaca"
    if "query" in row:
        return "query"
    if "prompt" in row:
        return "prompt"
    if "problem" in row or "question" in row:
        return "math"
    return None


FORMAT_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations", "system"),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "query": ("query", "response", "history", "system"),
    "prompt": ("prompt", "completion", "system"),
    "math": ("problem", "question", "system"),
}


class RowError(ValueError):
    """A row that cannot become a prompt; the message is the reason."""


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(p.get("text", "") for p in value)  # OpenAI content parts, text only
    raise RowError(f"{what} must be a string, got {type(value).__name__}")


def _check_messages(messages: Any) -> list[Message]:
    """Chat messages as given, every field kept (tool calls, tool_call_id, name, reasoning_content...),
    text content parts joined; an assistant turn that only calls tools has ``content: null``."""
    if not isinstance(messages, list) or not messages:
        raise RowError("'messages' must be a non-empty list of {role, content}")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise RowError(f"message {k} must have 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RowError(f"message {k} has role {m['role']!r}; use one of {', '.join(sorted(ROLES))}")
        message = dict(m)
        if m.get("content") is None:
            if not (m["role"] == "assistant" and m.get("tool_calls")):
                raise RowError(f"message {k} has no content (only an assistant turn with tool_calls may have none)")
            message["content"] = None
        else:
            message["content"] = _text(m["content"], f"message {k} content")
        if "tool_calls" in m and not isinstance(m["tool_calls"], list):
            raise RowError(f"message {k}: 'tool_calls' must be a list of calls")
        out.append(message)
    return out


def _history_messages(history: Any) -> list[Message]:
    if history in (None, ""):
        return []
    if not isinstance(history, list):
        raise RowError("'history' must be a list of [query, response] pairs")
    msgs: list[Message] = []
    for k, pair in enumerate(history):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowError(f"history item {k} must be a [query, response] pair")
        msgs += [
            {"role": "user", "content": _text(pair[0], f"history {k} query")},
            {"role": "assistant", "content": _text(pair[1], f"history {k} response")},
        ]
    return msgs


def row_to_conversation(row: dict, fmt: str) -> list[Message]:
    """The row's whole conversation (including the dataset's answer, if any) as messages."""
    system = row.get("system")
    head = [{"role": "system", "content": _text(system, "'system'")}] if system else []
    if fmt == "messages":
        return _check_messages(row["messages"])
    if fmt == "sharegpt":
        conv = row.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise RowError("'conversations' must be a non-empty list of {from, value}")
        msgs = []
        for k, turn in enumerate(conv):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise RowError(f"conversation turn {k} must have 'from' and 'value'")
            role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
            if role is None:
                raise RowError(f"conversation turn {k} is from {turn['from']!r}; use human/gpt/system")
            msgs.append({"role": role, "content": _text(turn["value"], f"turn {k} value")})
        return head + msgs
    if fmt == "alpaca":
        instruction = _text(row["instruction"], "'instruction'")
        extra = row.get("input") or ""
        query = f"{instruction}\n{_text(extra, 'input')}" if extra else instruction
        msgs = head + _history_messages(row.get("history")) + [{"role": "user", "content": query}]
        if row.get("output") not in (None, ""):
            msgs.append({"role": "assistant", "content": _text(row["output"], "'output'")})
        return msgs
    if fmt == "query":
        msgs = head + _history_messages(row.get("history"))
        msgs.append({"role": "user", "content": _text(row["query"], "'query'")})
        if row.get("response") not in (None, ""):
            msgs.append({"role": "assistant", "content": _text(row["response"], "'response'")})
        return msgs
    if fmt == "prompt":
        prompt = row["prompt"]
        msgs = head + (
            _check_messages(prompt)
            if isinstance(prompt, list)
            else [{"role": "user", "content": _text(prompt, "'prompt'")}]
        )
        completion = row.get("completion")
        if isinstance(completion, list):
            msgs += _check_messages(completion)
        elif completion not in (None, ""):
            msgs.append({"role": "assistant", "content": _text(completion, "'completion'")})
        return msgs
    if fmt == "math":
        question = row.get("problem", row.get("question"))
        if question is None:
            raise RowError("needs 'problem' or 'question'")
        msgs = head + [{"role": "user", "content": _text(question, "'problem'")}]
        answer = row.get("solution", row.get("answer"))
        if answer not in (None, ""):
            msgs.append({"role": "assistant", "content": str(answer)})
        return msgs
    raise RowError(f"unknown format {fmt!r}")


# the columns ms-swift keeps when it preprocesses a row (besides messages); its row id hashes them
SWIFT_COLUMNS = ("images", "videos", "audios", "tools", "objects", "label", "channel", "margin", "chat_template_kwargs")


def swift_row_id(conversation: list[Message], dataset: str, row: dict | None = None) -> str:
    """ms-swift's id of a row: the md5 of its preprocessed form (the whole conversation, system and
    answer included, the ``--dataset`` name as typed, and swift's standard columns the row has)."""
    processed: dict[str, Any] = {"messages": [{"role": m["role"], "content": m["content"]} for m in conversation]}
    for key in SWIFT_COLUMNS:
        if row is not None and key in row:
            processed[key] = row[key]
    processed["dataset"] = dataset
    return hashlib.md5(json.dumps(processed, sort_keys=True).encode("utf-8")).hexdigest()


def with_system(conversation: list[Message], system: str | None) -> list[Message]:
    """``--system`` as swift applies it: it replaces the conversation's system message, or comes first."""
    if not system:
        return conversation
    if conversation and conversation[0]["role"] == "system":
        return [{"role": "system", "content": system}, *conversation[1:]]
    return [{"role": "system", "content": system}, *conversation]


def row_to_prompt(
    row: Any,
    fmt: str,
    *,
    id: str | None,
    source: str,
    position: int,
    system: str | None,
    dataset: str = "",
    id_suffix: str = "",
) -> Prompt:
    """A dataset row as a :class:`Prompt`; raises :class:`RowError` with the reason if it cannot be one.

    Its id is ``id`` when given, else the row's own ``id`` field, else swift's id of the row
    (:func:`swift_row_id`), followed by ``id_suffix`` (which tells repeated rows apart)."""
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    missing = [k for k in FORMAT_KEYS[fmt][:1] if k not in row and not (fmt == "math" and "question" in row)]
    if missing:
        raise RowError(f"missing field {missing[0]!r} (this file's rows are {fmt} format)")
    conversation = with_system(row_to_conversation(row, fmt), system)
    swift_id = swift_row_id(conversation, dataset, row)
    if id is None:
        own = row.get("id")
        id = (str(own) if isinstance(own, (str, int)) and not isinstance(own, bool) else swift_id) + id_suffix
    response = None
    if conversation and conversation[-1]["role"] == "assistant":
        response = conversation[-1]["content"]
        conversation = conversation[:-1]
    if not conversation or conversation[-1]["role"] not in ("user", "tool"):
        raise RowError("the conversation must end with a user turn (the prompt) before the answer")
    if not any(m["role"] == "user" and (m["content"] or "").strip() for m in conversation):
        raise RowError("empty prompt: no user turn has any text")
    consumed = set(FORMAT_KEYS[fmt]) | {"tools"}
    columns = {k: v for k, v in row.items() if k not in consumed and k != "id"}
    tools = row.get("tools")
    if isinstance(tools, str):  # swift's datasets keep tools as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RowError("'tools' is not valid JSON") from None
    if tools is not None and not isinstance(tools, list):
        raise RowError("'tools' must be a list of function definitions")
    reference = next((str(row[k]) for k in REFERENCE_COLUMNS if row.get(k) not in (None, "")), response)
    return Prompt(
        id=id,
        messages=conversation,
        response=response,
        reference=reference,
        columns=columns,
        source=source,
        position=position,
        dataset=dataset,
        swift_id=swift_id,
        conversational=not (fmt == "prompt" and isinstance(row.get("prompt"), str)),
        tools=tools or None,
    )


# ----------------------------------------------------------------------------- order and shards


def _occurrences(keys: array) -> dict[int, int]:
    """For rows whose key repeats an earlier row's, their occurrence number (1, 2, ...)."""
    seen: set[int] = set()
    dups: dict[int, int] = {}
    counts: dict[int, int] = {}
    for i, k in enumerate(keys):
        if k in seen:
            counts[k] = counts.get(k, 0) + 1
            dups[i] = counts[k]
        else:
            seen.add(k)
    return dups


def sample_indices(size: int, n: int | None, rng: random.Random) -> list[int] | range:
    """swift's ``#N`` rule: fewer rows than the dataset are sampled without replacement; more repeat
    the whole dataset, then sample the remainder."""
    if n is None:
        return range(size)
    if size == 0:
        return []
    whole, rest = divmod(n, size)
    out = list(range(size)) * whole
    out += sorted(rng.sample(range(size), rest)) if rest else []
    return out


def shard_bounds(total: int, index: int, count: int) -> tuple[int, int]:
    """Exact contiguous shard ``index`` of ``count``: the shards cover every row exactly once."""
    return index * total // count, (index + 1) * total // count


class RowPlan:
    """The ordered rows of one run (after ``#N``, shuffle, shard and batch limits), read lazily.

    Kept as three flat arrays (source, row index, copy number) so that a plan of millions of rows
    costs a few bytes per row.
    """

    def __init__(
        self,
        sources: list,
        formats: list[str | None],
        dups: list[dict[int, int]],
        system: str | None,
        names: list[str] | None = None,
        columns: dict[str, str] | None = None,
        keep_columns: bool = True,
    ):
        self.sources = sources
        self.columns = dict(columns or {})  # --columns: renames applied to every row first
        self.keep_columns = keep_columns
        self.names = names or [""] * len(sources)  # each source's --dataset name, as typed
        self.formats = formats
        self.dups = dups
        self.system = system
        self.src = array("H")
        self.idx = array("Q")
        self.copy = array("H")

    def __len__(self) -> int:
        return len(self.idx)

    def id_suffix(self, position: int) -> str:
        """What tells a repeated row apart: ``-k`` for the k-th repeat of a line in its file, ``-rK``
        for the K-th copy that ``#N`` above the dataset size made."""
        s, i, copy = self.src[position], self.idx[position], self.copy[position]
        out = f"-{self.dups[s][i]}" if i in self.dups[s] else ""
        return out if copy == 0 else f"{out}-r{copy}"

    def row_id(self, position: int) -> str:
        """An id for a row that cannot be read (a hash of its bytes): a readable row's id is made when it
        is read (:func:`row_to_prompt`)."""
        s, i = self.src[position], self.idx[position]
        return f"{self.sources[s].keys[i]:016x}" + self.id_suffix(position)

    def read(self, position: int) -> Prompt | BadRow:
        """The prompt at ``position`` of the run's order, or why that row cannot be used."""
        s, i = self.src[position], self.idx[position]
        source = self.sources[s]
        where = source.where(i)
        try:
            row = rename_columns(source.row(i), self.columns)
            fmt = self.formats[s] or detect_format(row)
            if fmt is None:
                keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
                raise RowError(
                    f"unknown row format (fields: {keys}); expected messages, conversations, "
                    "instruction/input/output, query/response, prompt/completion or problem/solution"
                )
            prompt = row_to_prompt(
                row,
                fmt,
                id=None,
                source=where,
                position=position,
                system=self.system,
                dataset=self.names[s],
                id_suffix=self.id_suffix(position),
            )
            if not self.keep_columns:
                prompt.columns = {}
            return prompt
        except (RowError, ValueError) as e:
            return BadRow(source=where, reason=str(e), id=self.row_id(position), position=position)

    def iter_from(self, skip: set[int] | None = None, start: int = 0) -> Iterator[Prompt | BadRow]:
        """Prompts in order from ``start``, leaving out positions in ``skip``."""
        for pos in range(start, len(self)):
            if skip and pos in skip:
                continue
            yield self.read(pos)

    def _keep(self, lo: int, hi: int) -> None:
        self.src, self.idx, self.copy = self.src[lo:hi], self.idx[lo:hi], self.copy[lo:hi]


def rename_columns(row: Any, columns: dict[str, str]) -> Any:
    """A row with ``--columns`` renames applied (its other fields unchanged)."""
    if not columns or not isinstance(row, dict):
        return row
    return {columns.get(k, k): v for k, v in row.items()}


def _first_format(source, columns: dict[str, str] | None = None) -> str | None:
    for i in range(min(len(source), 50)):
        try:
            fmt = detect_format(rename_columns(source.row(i), columns or {}))
        except ValueError:
            continue
        if fmt:
            return fmt
    return None


def build_plan(
    datasets: list[str],
    *,
    seed: int = 42,
    shuffle: bool = True,
    data_range: list[int] | None = None,
    limit: int | None = None,
    system: str | None = None,
    columns: dict[str, str] | None = None,
    holdout: float = 0.0,
    keep_columns: bool = True,
) -> RowPlan:
    """Open every dataset and decide the run's row order; no row is parsed yet.

    ``holdout`` (swift's ``split_dataset_ratio``) leaves that share of the rows out: the last rows of
    the (shuffled) order, before ``data_range`` shards what remains."""
    rng = random.Random(seed)
    sources: list = []
    for text in datasets:
        spec = parse_dataset_spec(text)
        opened = open_sources(spec)
        if not any(len(s) for s in opened):
            raise DataError(f"--dataset {text}: no rows")
        sources.append((spec, opened))
    flat_sources = [s for _, opened in sources for s in opened]
    if isinstance(system, str) and "\n" not in system and Path(system).expanduser().is_file():
        system = Path(system).expanduser().read_text(encoding="utf-8")  # --system FILE, as swift reads it
    plan = RowPlan(
        flat_sources,
        [_first_format(s, columns) for s in flat_sources],
        [_occurrences(s.keys) for s in flat_sources],
        system,
        [spec.path for spec, opened in sources for _ in opened],
        columns,
        keep_columns,
    )
    base = 0
    for spec, opened in sources:
        # (source number, row index) for every row of this spec, in file order
        bounds = []
        for s in opened:
            bounds.append((base, len(s)))
            base += 1
        sizes = [n for _, n in bounds]
        total = sum(sizes)
        seen_copies: dict[int, int] = {}
        for flat in sample_indices(total, spec.n, rng):
            k, i = 0, flat
            while i >= sizes[k]:
                i -= sizes[k]
                k += 1
            copy = seen_copies.get(flat, 0)
            seen_copies[flat] = copy + 1
            plan.src.append(bounds[k][0])
            plan.idx.append(i)
            plan.copy.append(copy)
    if shuffle:
        order = array("Q", range(len(plan)))
        random.Random(seed).shuffle(order)
        plan.src = array("H", (plan.src[j] for j in order))
        plan.idx = array("Q", (plan.idx[j] for j in order))
        plan.copy = array("H", (plan.copy[j] for j in order))
    if holdout:
        plan._keep(0, len(plan) - round(len(plan) * holdout))
    if data_range:
        plan._keep(*shard_bounds(len(plan), data_range[0], data_range[1]))
    if limit is not None:
        plan._keep(0, limit)
    return plan
