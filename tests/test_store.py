"""The output store (store.py): crash recovery from torn lines and lost writes, bounded resume reads, an
existing output never overwritten, and a full disk.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from tests.support.client import client_args, sums
from tests.support.commands import run_winnow
from tests.support.files import read_jsonl
from winnow.errors import OutputExistsError
from winnow.store import OutputStore, Totals


def _store(tmp_path, **kw):
    return OutputStore(str(tmp_path), "o.jsonl", fingerprint="fp", **kw)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_full_disk_is_one_line_and_resumes_without_loss(tmp_path, fake_server):
    dataset = sums(tmp_path, 300)
    out = tmp_path / "out"
    args = client_args(fake_server, out, dataset)

    def small_files():  # files may not grow past 16 KB: writes fail as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16000, 16000))

    proc = subprocess.run(
        [sys.executable, "-m", "winnow", *args],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files,
        env=os.environ,
    )
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "cannot write" in errors[0] and "--resume true" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    manifest = json.loads((out / "o.manifest.json").read_text())
    assert manifest["status"] == "failed" and "cannot write" in manifest["error"]
    again = run_winnow(*args, "--resume", "true")
    assert again.returncode == 0, again.stderr
    records = read_jsonl(out / "o.jsonl")  # no torn line (it would not parse), none twice, none lost
    assert sorted(r["k"] for r in records) == list(range(300))
    assert not list(out.glob("*.tmp"))


def test_existing_output_is_never_silently_overwritten(tmp_path, tiny_model, math_jsonl):
    common = [
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        f"{math_jsonl}#2",
        "--num_return_sequences",
        "2",
        "--max_new_tokens",
        "4",
        "--output_file",
        "x.jsonl",
    ]
    run_winnow(*common, cwd=tmp_path, check=True)
    before = (tmp_path / "sample_output" / "x.jsonl").read_text()
    proc = run_winnow(*common, cwd=tmp_path)
    assert proc.returncode == 2
    assert "already exists" in proc.stderr and "--resume true" in proc.stderr
    assert (tmp_path / "sample_output" / "x.jsonl").read_text() == before
    run_winnow(*common, "--override_exist_file", "true", cwd=tmp_path, check=True)
    assert len(read_jsonl(tmp_path / "sample_output" / "x.jsonl")) == 4


def test_fresh_write_and_resume_state(tmp_path):
    s = _store(tmp_path)
    for pos in (0, 2, 1, 5):
        s.write_group(pos, [{"id": f"r{pos}", "k": 1}, {"id": f"r{pos}", "k": 2}], f"r{pos}")
    s.write_failed(3, "r3", "d.jsonl:4", "bad row", stage="data")
    s.close()
    again = _store(tmp_path, resume=True)
    assert again.resumed
    assert again.state.watermark == 4 and again.state.done == {5}
    assert [again.is_done(p) for p in range(7)] == [True, True, True, True, False, True, False]
    again.close()


def test_torn_and_unindexed_tail_is_cut(tmp_path):
    s = _store(tmp_path)
    s.write_group(0, [{"id": "a"}], "a")
    s.write_group(1, [{"id": "b"}], "b")
    s.close()
    out = tmp_path / "o.jsonl"
    with open(out, "ab") as f:  # a group written but not indexed, then a torn line
        f.write(b'{"id": "c"}\n{"id": "d", "messa')
    with open(tmp_path / ".o.index", "ab") as f:
        f.write(b'{"p": 9, "w"')  # a torn index line
    again = _store(tmp_path, resume=True)
    assert [r["id"] for r in _lines(out)] == ["a", "b"]
    assert again.state.watermark == 2 and not again.is_done(2)
    again.write_group(2, [{"id": "c"}], "c")
    again.close()
    assert [r["id"] for r in _lines(out)] == ["a", "b", "c"]
    assert _store(tmp_path, resume=True).state.watermark == 3


def test_index_ahead_of_lost_output_is_redone(tmp_path):
    s = _store(tmp_path)
    for pos in range(3):
        s.write_group(pos, [{"id": str(pos), "pad": "x" * 50}], str(pos))
    s.close()
    out = tmp_path / "o.jsonl"
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 10])  # power loss: the index survived, the output's end did not
    again = _store(tmp_path, resume=True)
    assert again.state.watermark == 2 and not again.is_done(2)
    assert len(_lines(out)) == 2


def test_resume_reads_only_the_index_tail(tmp_path, monkeypatch):
    s = _store(tmp_path, reorder_window=8)
    for pos in range(5000):
        s.write_group(pos, [{"id": str(pos)}], str(pos))
    s.close()
    read = []
    import winnow.store as store_mod

    real = store_mod._tail_lines

    def counting(path):
        for item in real(path):
            read.append(item)
            yield item

    monkeypatch.setattr(store_mod, "_tail_lines", counting)
    again = _store(tmp_path, resume=True)
    assert again.state.watermark == 5000
    assert len(read) <= 20  # about the reorder window, not the 5,000 groups written


def test_existing_output_needs_resume_or_override(tmp_path):
    s = _store(tmp_path)
    s.write_group(0, [{"id": "a"}], "a")
    s.close()
    with pytest.raises(OutputExistsError, match="--resume true"):
        _store(tmp_path)
    fresh = _store(tmp_path, override=True)
    assert fresh.state.watermark == 0
    fresh.close()
    assert (tmp_path / "o.jsonl").read_text() == ""


def test_resume_with_other_options_is_refused(tmp_path):
    s = _store(tmp_path)
    s.write_group(0, [{"id": "a"}], "a")
    s.write_manifest({"status": "finished"})
    s.close()
    with pytest.raises(Exception, match="other data or sampling options"):
        OutputStore(str(tmp_path), "o.jsonl", fingerprint="other", resume=True)


def test_resume_without_output_file_finds_the_matching_run(tmp_path):
    s = OutputStore(str(tmp_path), None, fingerprint="fp")
    s.write_group(0, [{"id": "a"}], "a")
    s.write_manifest({"status": "interrupted"})
    s.close()
    again = OutputStore(str(tmp_path), None, fingerprint="fp", resume=True)
    assert again.path == s.path and again.state.watermark == 1
    other = OutputStore(str(tmp_path), None, fingerprint="different", resume=True)
    assert other.path != s.path


def test_transient_failures_are_retried_on_resume_bad_rows_are_not(tmp_path):
    s = _store(tmp_path)
    s.write_group(0, [{"id": "a"}], "a")
    s.write_failed(1, "b", "d.jsonl:2", "invalid JSON", stage="data")
    s.write_failed(2, "c", "d.jsonl:3", "APITimeoutError after 5 retries", stage="generate", retry=True)
    s.write_group(3, [{"id": "d"}], "d")
    s.close()
    again = _store(tmp_path, resume=True)
    assert [again.is_done(p) for p in range(4)] == [True, True, False, True]
    # "c" is being tried again, and stays in the log until its row is written or logged again
    assert [e["id"] for e in _lines(tmp_path / "o.failed.jsonl")] == ["b", "c"]
    again.write_failed(2, "c", "d.jsonl:3", "APITimeoutError after 5 retries", stage="generate", retry=True)
    again.close()
    assert [e["id"] for e in _lines(tmp_path / "o.failed.jsonl")] == ["b", "c"]  # logged once, not twice
    third = _store(tmp_path, resume=True)
    third.write_group(2, [{"id": "c"}], "c")
    third.close()
    assert [e["id"] for e in _lines(tmp_path / "o.failed.jsonl")] == ["b"]  # written now: out of the log
    assert _store(tmp_path, resume=True).totals == Totals(groups=3, lines=3, filtered=0, failed=1, retry=0)


def test_a_retry_survives_a_resumed_run_that_is_killed_before_redoing_it(tmp_path):
    s = _store(tmp_path)
    for pos in range(3):
        s.write_failed(pos, f"r{pos}", f"d.jsonl:{pos + 1}", "HTTP 503", stage="generate", retry=True)
    s.close()
    killed = _store(tmp_path, resume=True)  # resumed, then killed (never closed) before any redo
    killed.write_group(0, [{"id": "r0"}], "r0")
    del killed
    again = _store(tmp_path, resume=True)
    assert [again.is_done(p) for p in range(3)] == [True, False, False]
    assert sorted(e["id"] for e in _lines(tmp_path / "o.failed.jsonl")) == ["r1", "r2"]
    assert again.totals.rows == 3 and again.totals.failed == 2 and again.totals.groups == 1


def test_counts_add_up_after_any_sequence_of_kills(tmp_path):
    """Random runs, each killed at a random write (before or after its index line), then resumed:
    every settled row is in exactly one place (the output, the filtered count or the failed log), and
    rows waiting for a retry are in the failed log."""
    import random

    rng = random.Random(7)
    rows = 40

    class Killed(Exception):
        pass

    for trial in range(30):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        fresh = True
        for _run in range(6):
            s = OutputStore(str(folder), "o.jsonl", fingerprint="fp", resume=not fresh, reorder_window=4)
            fresh = False
            budget = rng.randint(0, 12)
            real_index = s._write_index

            def index_or_die(entry, real_index=real_index):
                nonlocal budget
                budget -= 1
                if budget < 0 and "p" in entry:
                    raise Killed  # the data line is written, its index line is not
                real_index(entry)

            s._write_index = index_or_die
            try:
                for pos in range(rows):
                    if not s.is_done(pos) and s.can_start(pos):
                        kind = rng.choice("wwfxb")
                        if kind in "wf":
                            s.write_group(pos, [{"id": pos}] * (kind == "w"), str(pos))
                        else:
                            s.write_failed(pos, str(pos), "d", "why", stage="generate", retry=kind == "x")
                s._write_index = real_index
                s.close()
            except Killed:
                pass  # killed: nothing is closed
        check = OutputStore(str(folder), "o.jsonl", fingerprint="fp", resume=True, reorder_window=4)
        written = [r["id"] for r in _lines(folder / "o.jsonl")]
        failed = (
            [e["position"] for e in _lines(folder / "o.failed.jsonl")] if (folder / "o.failed.jsonl").exists() else []
        )
        assert len(written) == len(set(written)) and len(failed) == len(set(failed))
        assert not set(written) & set(failed)
        settled = [p for p in range(rows) if check.state.finished(p)]
        t = check.totals
        assert t.groups == len(written) and t.failed == len(failed) and t.rows == len(settled)
        assert set(written) | set(failed) <= set(settled)
        assert check.state.redo <= set(failed)
        retrying = {e["position"] for e in _lines(folder / "o.failed.jsonl") if e.get("retry")} if failed else set()
        assert retrying == check.state.redo and t.retry == len(retrying)
        check.close()


def test_count_done_matches_probing_every_position(tmp_path):
    from winnow.store import ResumeState

    state = ResumeState(watermark=10, done={12, 15, 40}, redo={3, 15, 20})
    for total in (0, 5, 11, 13, 16, 41, 100):
        assert state.count_done(total) == sum(state.is_done(p) for p in range(total))
