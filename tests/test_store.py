"""The output store: crash recovery from torn lines and lost writes, bounded resume reads."""

from __future__ import annotations

import json

import pytest

from winnow.errors import OutputExistsError
from winnow.store import OutputStore


def _store(tmp_path, **kw):
    return OutputStore(str(tmp_path), "o.jsonl", fingerprint="fp", **kw)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


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
    assert [e["id"] for e in _lines(tmp_path / "o.failed.jsonl")] == ["b"]  # "c" is being tried again
    again.write_failed(2, "c", "d.jsonl:3", "APITimeoutError after 5 retries", stage="generate", retry=True)
    again.close()
    assert [e["id"] for e in _lines(tmp_path / "o.failed.jsonl")] == ["b", "c"]  # logged once, not twice


def test_count_done_matches_probing_every_position(tmp_path):
    from winnow.store import ResumeState

    state = ResumeState(watermark=10, done={12, 15, 40}, redo={3, 15, 20})
    for total in (0, 5, 11, 13, 16, 41, 100):
        assert state.count_done(total) == sum(state.is_done(p) for p in range(total))
