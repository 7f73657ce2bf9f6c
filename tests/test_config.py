"""Options (config.py): flags, kebab-case, lists, JSON dicts, booleans, YAML with flag overrides, swift's
sampling arguments, abbreviations and training-only flags, choices and ranges, bad values.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.support import DATA
from tests.support.commands import run_winnow
from tests.support.files import read_jsonl
from winnow.config import SampleConfig, make_config, parse_args
from winnow.errors import ConfigError


def parse(*argv):
    return parse_args(SampleConfig, list(argv), "winnow sample", "")


def test_swift_style_flags():
    c = parse(
        "--model",
        "m",
        "--dataset",
        "a.jsonl#5",
        "b.jsonl",
        "--num-return-sequences",
        "5",
        "--engine_kwargs",
        '{"max_batch_sequences": 8}',
        "--dataset_shuffle",
        "false",
        "--stop_words",
        "</s>",
        "Observation:",
        "--data_range",
        "1",
        "3",
        "--temperature",
        "0.5",
        "--top_k",
        "none",
    )
    assert c.dataset == ["a.jsonl#5", "b.jsonl"]
    assert c.num_return_sequences == 5
    assert c.engine_kwargs == {"max_batch_sequences": 8}
    assert c.dataset_shuffle is False
    assert c.stop_words == ["</s>", "Observation:"]
    assert c.data_range == [1, 3]
    assert c.temperature == 0.5 and c.top_k is None
    assert c.sampler_engine == "transformers"  # pt is the transformers engine


def test_yaml_then_flags_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "model: m\ndataset: [a.jsonl]\nnum_return_sequences: 3\ntemperature: 0.2\n"
        "engine-kwargs: {max_batch_sequences: 4}\n"
    )
    c = parse("--config", str(cfg), "--temperature", "0.9")
    assert (c.model, c.dataset, c.num_return_sequences, c.temperature) == ("m", ["a.jsonl"], 3, 0.9)
    assert c.engine_kwargs == {"max_batch_sequences": 4}
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: m\ndataset: [a]\ntemprature: 1\n")
    with pytest.raises(ConfigError, match="temprature.*did you mean temperature"):
        parse("--config", str(bad))


def test_python_api_validates_like_the_cli():
    with pytest.raises(ConfigError, match="--dataset is required"):
        SampleConfig(model="m")
    with pytest.raises(ConfigError, match="output_file"):
        SampleConfig(model="m", dataset=["a"], output_file="dir/x.jsonl")
    with pytest.raises(ConfigError, match="data_range"):
        SampleConfig(model="m", dataset=["a"], data_range=[3, 3])
    with pytest.raises(ConfigError, match="bad value for num_return_sequences"):
        make_config(SampleConfig, {"model": "m", "dataset": ["a"], "num_return_sequences": "many"})


def test_adapters_without_a_base_model_are_one_clear_error(tmp_path):
    from winnow.pipeline import build_engine

    adapter = tmp_path / "adapter"  # no args.json naming the base model
    adapter.mkdir()
    config = SampleConfig(adapters=[str(adapter)], dataset=["a.jsonl"])
    assert config.apply_saved_args() == []
    with pytest.raises(ConfigError, match="--model is required"):
        build_engine(config)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--modle", "m"], "unrecognized arguments: --modle"),
        (["--model", "m", "--dataset", "a", "--num_return_sequences", "x"], "invalid int value"),
        (["--model", "m", "--dataset", "a", "--resume", "maybe"], "expected true or false"),
        (["--model", "m", "--dataset", "a", "--engine_kwargs", "{bad"], "expected a JSON object"),
        (["--model", "m", "--dataset", "a", "--sampler_engine", "tgi"], "--sampler_engine 'tgi': not one of"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(argv, needle):
    proc = run_winnow("sample", *argv)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]


@pytest.mark.parametrize(
    "values, needle",
    [
        ({"temperature": -1}, "--temperature -1: must be at least 0"),
        ({"top_p": 0}, "--top_p 0: must be greater than 0"),
        ({"num_return_sequences": 4, "n_best_to_keep": 9}, "--n_best_to_keep 9: more than the 4 samples"),
        ({"output_format": "jsonl"}, "--output_format 'jsonl': not one of dpo, grpo"),
        ({"prm_agg": "max"}, "--prm_agg 'max': not one of"),
        ({"torch_dtype": "int8"}, "--torch_dtype 'int8': not one of"),
        ({"sampler_type": "mcts_v0"}, "--sampler_type 'mcts_v0': not one of"),
        ({"easy_query_threshold": 1.5}, "--easy_query_threshold 1.5: must be at most 1"),
    ],
)
def test_choices_and_ranges_hold_for_python_yaml_and_cli(tmp_path, values, needle):
    from winnow.config import SampleConfig, make_config, parse_args

    base = {"model": "m", "dataset": ["d.jsonl"]}
    with pytest.raises(ConfigError, match=re.escape(needle)):
        SampleConfig(**base, **values)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in {**base, **values}.items()))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        parse_args(SampleConfig, ["--config", str(yaml_file)], "winnow sample", "")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        make_config(SampleConfig, {**base, **{k: str(v) for k, v in values.items()}})


def test_every_swift_sampling_argument_is_accepted():
    """All 120 fields of ms-swift 4.6.0's SamplingArguments (tests/data/swift_sampling_arguments_4.6.json)."""
    import dataclasses

    swift = json.loads((DATA / "swift_sampling_arguments_4.6.json").read_text())
    ours = {f.name for f in dataclasses.fields(SampleConfig)}
    assert [name for name in swift if name not in ours] == []


def test_training_only_flags_are_named_once_and_unsupported_ones_refused(tmp_path, tiny_model, sums_jsonl):
    proc = run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        str(sums_jsonl),
        "--num_return_sequences",
        "1",
        "--max_new_tokens",
        "2",
        "--packing",
        "true",
        "--lazy_tokenize",
        "true",
        "--output_dir",
        str(tmp_path),
        "--progress",
        "false",
        check=True,
    )
    notes = [line for line in proc.stderr.splitlines() if "without effect" in line]
    assert notes == [
        "winnow sample: note: --packing, --lazy_tokenize: accepted for swift compatibility, without effect on sampling"
    ]
    proc = run_winnow("sample", "--model", "m", "--dataset", "d", "--logprobs", "true")
    assert proc.returncode == 2 and "--logprobs: accepted for swift compatibility but not supported" in proc.stderr


def test_abbreviated_flags_a_swift_yaml_file_and_its_env(tmp_path, tiny_model, sums_jsonl):
    config = tmp_path / "sampling.yaml"
    config.write_text(f"""use_ray: false
model: {tiny_model}
dataset: {sums_jsonl}
num_return_sequences: 2
max_new_tokens: 3
load_args: false
override_exist_file: true
output_file: sampling.jsonl
output_dir: {tmp_path / "out"}
quant_bits: 4
ENV:
  WINNOW_TEST_FROM_YAML: "1"
device_groups:
  nproc_per_node: 4
""")
    proc = run_winnow("sample", str(config), "--num_ret", "1", "--prog", "false", check=True)
    assert len(read_jsonl(tmp_path / "out" / "sampling.jsonl")) == 4  # --num_ret 1 overrides the file's 2
    assert "--device_groups" in proc.stderr and "--quant_bits" not in proc.stderr.split("note:")[-1]
    ambiguous = run_winnow("sample", str(config), "--max", "3")
    assert ambiguous.returncode == 2 and "ambiguous option" in ambiguous.stderr
