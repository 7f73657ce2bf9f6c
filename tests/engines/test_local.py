"""What every local engine shares (engines/_local.py): finish reasons, stop strings, greedy copies,
failure isolation within a batch, and generation defaults from the model's generation_config.
"""

from __future__ import annotations

import json
import shutil

from tests.support.sampling import tiny_run
from winnow.engines import _local
from winnow.schema import Completion


def test_finish_reasons_map_to_winnow_names():
    assert _local.map_finish("stop") == "stop"
    assert _local.map_finish("length") == "length"
    assert _local.map_finish("repetition") == "length"
    for failed in ("abort", "error", None, "cancelled"):
        assert _local.map_finish(failed) == "error"


def test_cut_at_stop_takes_the_earliest_stop_string():
    assert _local.cut_at_stop("a b END c STOP", ["STOP", "END"]) == ("a b ", True)
    assert _local.cut_at_stop("no stop here", ["END", ""]) == ("no stop here", False)


def test_make_completion_cuts_stop_words_and_keeps_errors_as_values():
    c = _local.make_completion("x = 1 END more", "length", 7, 5, ["END"])
    assert (c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) == ("x = 1 ", "stop", 7, 5)
    bad = _local.make_completion("partial", "abort", 7, 2, error="out of KV cache")
    assert bad.finish_reason == "error" and bad.error == "out of KV cache" and bad.text == "" and bad.failed


def test_fill_copies_a_greedy_answer_and_pads_missing_samples():
    one = [Completion(text="4", finish_reason="stop", prompt_tokens=3, completion_tokens=2)]
    copies = _local.fill(one, 3)
    assert [c.text for c in copies] == ["4"] * 3 and len({id(c) for c in copies}) == 3
    short = _local.fill(one + [Completion(text="5")], 4)
    assert [c.finish_reason for c in short] == ["stop", "stop", "error", "error"]
    assert "2 of 4" in short[-1].error


def test_run_isolated_fails_only_the_item_that_breaks_a_batch():
    calls = []

    def call(batch):
        calls.append(list(batch))
        if "bad" in batch:
            raise ValueError("prompt too long")
        return [s.upper() for s in batch]

    out = _local.run_isolated(["a", "b", "bad", "c", "d"], call, lambda item, e: f"error: {item}: {e}")
    assert out == ["A", "B", "error: bad: prompt too long", "C", "D"]
    assert calls[0] == ["a", "b", "bad", "c", "d"]  # one call when nothing fails
    assert _local.run_isolated([], call, lambda item, e: None) == []


def test_run_isolated_treats_a_misaligned_answer_as_a_failure():
    out = _local.run_isolated([1, 2], lambda batch: [], lambda item, e: f"failed {item}")
    assert out == ["failed 1", "failed 2"]


def test_generation_defaults_come_from_the_models_generation_config(tmp_path, tiny_model, sums_jsonl):
    model = tmp_path / "greedy-model"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "temperature": 0.0}))
    _, records = tiny_run(tmp_path, model, sums_jsonl, num_return_sequences=3, max_new_tokens=6)
    assert all(len({c["text"] for c in r["completions"]}) == 1 for r in records)  # greedy: identical samples
    manifest = json.loads((tmp_path / "out" / "o.manifest.json").read_text())
    assert manifest["sampling"]["temperature"] == 0.0
    _, records = tiny_run(tmp_path, model, sums_jsonl, num_return_sequences=3, max_new_tokens=6, temperature=1.0)
    assert any(len({c["text"] for c in r["completions"]}) > 1 for r in records)  # the flag wins
