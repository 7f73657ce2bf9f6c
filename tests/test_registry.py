"""The registry (registry.py): plugin files (seed, swift and TRL styles), entry points of an installed
package, model-based rewards, and unknown names.
"""

from __future__ import annotations

import os

import pytest

from tests.support import PLUGINS
from tests.support.commands import raw_output, run_winnow
from tests.support.files import read_jsonl
from winnow.config import SampleConfig
from winnow.errors import ConfigError
from winnow.rewards import build_scorer

PLUGIN = PLUGINS / "seed_prm.py"

ENTRY_POINT_MODULE = '''
from winnow.schema import Completion


class ShoutEngine:
    """Answers every prompt with its last message in capitals (an engine a package ships)."""

    name = "shout"

    def __init__(self, model, **kwargs):
        self.model = model

    async def generate(self, prompts, params):
        return [[Completion(text=p.messages[-1]["content"].upper(), finish_reason="stop", prompt_tokens=1,
                            completion_tokens=1) for _ in range(params.n)] for p in prompts]

    def batch_plan(self, n):
        return 16, 1

    def describe(self):
        return {"name": self.name, "model": self.model}

    async def aclose(self):
        pass


def loud(completions, **kwargs):
    """1.0 for an answer in capitals."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # TRL: text or messages
    return [1.0 if t.isupper() else 0.0 for t in texts]
'''


def test_seed_plugin_prm_and_model_rewards_in_one_run(tmp_path, tiny_model, tiny_prm, tiny_classifier_rm, math_jsonl):
    proc = run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        f"{math_jsonl}#2",
        "--num_return_sequences",
        "3",
        "--max_new_tokens",
        "6",
        "--external_plugins",
        str(PLUGIN),
        "--prm_model",
        "custom",
        "--reward_funcs",
        "async_const",
        "--reward_model",
        str(tiny_classifier_rm),
        str(tiny_prm),
        "--reward_weights",
        "1",
        "2",
        "0.5",
        "0.25",
        "--output_format",
        "raw",
        "--output_dir",
        str(tmp_path / "out"),
        "--output_file",
        "g.jsonl",
        "--progress",
        "false",
    )
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(tmp_path / "out" / "g.jsonl")
    assert len(records) == 2
    for rec in records:
        assert len(rec["completions"]) == 3
        for c in rec["completions"]:
            scores = c["scores"]
            assert set(scores) == {"custom", "async_const", "classifier", "prm-shepherd"}
            steps = [s for s in c["text"].split("\n\n") if s.strip()]
            assert len(scores["custom"].get("steps", [])) == len(steps)
            assert len(scores["prm-shepherd"].get("steps", [])) == len(steps)
            known = [
                (w, scores[k]["value"])
                for w, k in ((1, "custom"), (2, "async_const"), (0.5, "classifier"), (0.25, "prm-shepherd"))
            ]
            expected = sum(w * v for w, v in known if v is not None)
            assert abs(c["reward"] - expected) < 1e-6


def test_seed_orm_decides_what_is_kept(tmp_path, tiny_model, math_jsonl):
    proc = run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        f"{math_jsonl}#3",
        "--num_return_sequences",
        "3",
        "--max_new_tokens",
        "6",
        "--external_plugins",
        str(PLUGIN),
        "--orm_model",
        "contains",
        "--prm_model",
        "custom",
        "--include_reference",
        "true",
        "--keep_unpaired",
        "true",
        "--output_dir",
        str(tmp_path / "out"),
        "--output_file",
        "s.jsonl",
        "--progress",
        "false",
    )
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(tmp_path / "out" / "s.jsonl")
    # the random policy almost never writes the answer; the reference always contains it, so it passes and is kept
    assert records and all(r["id"] for r in records)
    assert any(
        r["messages"][-1]["content"] == str(int(r["messages"][0]["content"].split()[2]) * 2 + 1) for r in records
    )


def test_wrong_count_plugin_names_the_reward(tmp_path, tiny_model, math_jsonl):
    proc = run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        f"{math_jsonl}#1",
        "--num_return_sequences",
        "2",
        "--max_new_tokens",
        "4",
        "--external_plugins",
        str(PLUGIN),
        "--reward_funcs",
        "short_by_one",
        "--output_dir",
        str(tmp_path / "out"),
        "--progress",
        "false",
    )
    assert proc.returncode != 0
    assert "reward short_by_one returned 1 scores for 2 samples" in proc.stderr


def test_swift_plugin_file_loads_unchanged(tmp_path, tiny_model, math_jsonl):
    """A plugin importing from swift.plugin / swift.rewards works without ms-swift installed."""
    plugin = PLUGINS / "swift_style.py"
    listing = run_winnow("list", "rewards", "--external_plugins", str(plugin))
    proc = run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        f"{math_jsonl}#2",
        "--num_return_sequences",
        "2",
        "--max_new_tokens",
        "6",
        "--external_plugins",
        str(plugin),
        "--reward_funcs",
        "has_digit",
        "--prm_model",
        "step_len",
        "--output_format",
        "raw",
        "--output_dir",
        str(tmp_path),
        "--output_file",
        "s.jsonl",
        "--progress",
        "false",
    )
    assert proc.returncode == 0, proc.stderr
    for rec in read_jsonl(tmp_path / "s.jsonl"):
        for c in rec["completions"]:
            assert c["scores"]["has_digit"]["value"] == float(any(ch.isdigit() for ch in c["text"]))
            assert len(c["scores"]["step_len"]["steps"]) == len(c["text"].split("\n\n"))
    assert listing.returncode == 0, listing.stderr
    assert "has_digit" in listing.stdout and "swift_style.py" in listing.stdout


def test_an_installed_packages_engine_and_reward_come_from_its_entry_points(tmp_path):
    """A throwaway package installed the way pip leaves one (its module and a .dist-info with
    entry_points.txt on the path): its engine and reward are listed and used by name."""
    site = tmp_path / "site"
    (site / "winnow_shout").mkdir(parents=True)
    (site / "winnow_shout" / "__init__.py").write_text(ENTRY_POINT_MODULE)
    dist = site / "winnow_shout-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: winnow-shout\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[winnow.engine]\nshout = winnow_shout:ShoutEngine\n\n[winnow.reward]\nloud = winnow_shout:loud\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    listed = run_winnow("list", "engines", env=env)
    assert listed.returncode == 0 and "shout" in listed.stdout and "winnow-shout" in listed.stdout
    rewards = run_winnow("list", "rewards", env=env)
    assert "loud" in rewards.stdout
    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"query": "hello"}\n{"query": "again"}\n')
    out = tmp_path / "out"
    proc = run_winnow(
        "sample",
        "--sampler_engine",
        "shout",
        "--model",
        "any",
        "--dataset",
        str(dataset),
        "--num_return_sequences",
        "2",
        "--orm_model",
        "loud",
        *raw_output(out),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(out / "o.jsonl")
    assert sorted(c["text"] for r in records for c in r["completions"]) == ["AGAIN", "AGAIN", "HELLO", "HELLO"]
    assert all(c["scores"]["loud"]["value"] == 1.0 for r in records for c in r["completions"])
    assert "shout" not in run_winnow("list", "engines").stdout  # not installed: not there


def test_unknown_reward_names_the_known_ones(tmp_path):
    cfg = SampleConfig(model="m", dataset=["d.jsonl"], orm_model="mth")
    with pytest.raises(ConfigError, match="Unknown reward 'mth'. Known: .*math.*--external_plugins"):
        build_scorer(cfg)
