"""Drop-in for swift sample: swift's flags, templates, YAML files, cache files and Python entry, on tiny models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import winnow
from tests.support import DATA
from tests.support.commands import run_winnow
from tests.support.fakeserver import FakeServer
from tests.support.files import read_jsonl, write_jsonl
from winnow.config import SampleConfig
from winnow.errors import ConfigError


@pytest.fixture
def sums_jsonl(tmp_path):
    return write_jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"What is {i} + {i}?"},
                    {"role": "assistant", "content": str(2 * i)},
                ]
            }
            for i in range(4)
        ],
    )


def tiny_run(tmp_path, tiny_model, sums_jsonl, **options):
    options = {
        "model": str(tiny_model),
        "dataset": [str(sums_jsonl)],
        "num_return_sequences": 2,
        "max_new_tokens": 4,
        "output_dir": str(tmp_path / "out"),
        "output_file": "o.jsonl",
        "override_exist_file": True,
        "progress": False,
        "output_format": "raw",
        **options,
    }
    summary = winnow.sample(**options)
    return summary, read_jsonl(tmp_path / "out" / "o.jsonl")


# ----------------------------------------------------------------------------- templates


def test_swift_template_names_render_what_swift_renders():
    """tests/data/swift_templates_4.6.json: prompts ms-swift 4.6.0 rendered (swift.template.get_template(...)
    .encode, decoded) for a 3-turn conversation, with and without a system message."""
    from transformers import AutoTokenizer

    from winnow import templates
    from winnow.demo import ASSETS

    tok = AutoTokenizer.from_pretrained(str(ASSETS / "demo-policy"))
    expected = json.loads((DATA / "swift_templates_4.6.json").read_text())
    turns = [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    for key, want in expected.items():
        name, system = key.split("|")
        messages = ([{"role": "system", "content": system}] if system != "None" else []) + turns
        got = tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=templates.jinja(name)
        )
        assert got == want, key
    with pytest.raises(ConfigError, match="not a template winnow knows; known names: chatml, qwen"):
        templates.jinja("qwen9")


def test_enable_thinking_and_response_prefix_reach_the_prompt(tiny_model):
    from winnow.engines.prompts import PromptEncoder
    from winnow.schema import Prompt

    prompt = Prompt(id="x", messages=[{"role": "user", "content": "hi"}])
    plain = PromptEncoder(str(tiny_model), template="qwen3").render(prompt)
    thinking = PromptEncoder(str(tiny_model), template="qwen3", template_kwargs={"enable_thinking": True}).render(
        prompt
    )
    prefixed = PromptEncoder(str(tiny_model), template="qwen", response_prefix="Sure: ").render(prompt)
    assert plain.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert thinking.endswith("<|im_start|>assistant\n")
    assert prefixed.endswith("<|im_start|>assistant\nSure: ")


def test_response_prefix_starts_every_answer(tmp_path, tiny_model, sums_jsonl):
    _, records = tiny_run(tmp_path, tiny_model, sums_jsonl, response_prefix="Step 1:")
    assert all(c["text"].startswith("Step 1:") for r in records for c in r["completions"])


# ----------------------------------------------------------------------------- model loading


def test_lora_adapters_are_applied(tmp_path, tiny_model, sums_jsonl):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)  # an adapter that really changes the model
    lora.save_pretrained(str(tmp_path / "adapter"))
    greedy = {"temperature": 0.0, "max_new_tokens": 8}
    _, plain = tiny_run(tmp_path, tiny_model, sums_jsonl, **greedy)
    summary, adapted = tiny_run(tmp_path, tiny_model, sums_jsonl, adapters=[str(tmp_path / "adapter")], **greedy)
    assert [r["completions"][0]["text"] for r in plain] != [r["completions"][0]["text"] for r in adapted]
    manifest = json.loads((tmp_path / "out" / "o.manifest.json").read_text())
    assert manifest["engine"]["adapters"] == [str(tmp_path / "adapter")]
    # swift's training output holds args.json: --adapters alone finds the base model (--load_args); its
    # template (qwen: the tokenizer's own here) gives the same prompts
    (tmp_path / "adapter" / "args.json").write_text(json.dumps({"model": str(tiny_model), "template": "qwen"}))
    proc = run_winnow(
        "sample",
        "--adapters",
        str(tmp_path / "adapter"),
        "--dataset",
        str(sums_jsonl),
        "--num_return_sequences",
        "1",
        "--temperature",
        "0",
        "--max_new_tokens",
        "8",
        "--output_dir",
        str(tmp_path / "o2"),
        "--output_file",
        "o.jsonl",
        "--output_format",
        "raw",
        "--progress",
        "false",
        check=True,
    )
    assert f"model={tiny_model}" in proc.stderr and "template=qwen" in proc.stderr
    assert [r["completions"][0]["text"] for r in read_jsonl(tmp_path / "o2" / "o.jsonl")] == [
        r["completions"][0]["text"] for r in adapted
    ]


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


def test_unset_max_new_tokens_runs_to_the_context_and_long_prompts_fail_alone(tmp_path, tiny_model):
    small = tmp_path / "small-context"
    shutil.copytree(tiny_model, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    data = write_jsonl(tmp_path / "d.jsonl", [{"query": "hi"}, {"query": "word " * 5000}])
    summary, records = tiny_run(tmp_path, small, data, max_new_tokens=None)
    [record] = records
    assert all(c["prompt_tokens"] + c["completion_tokens"] <= 64 for c in record["completions"])
    [failed] = read_jsonl(tmp_path / "out" / "o.failed.jsonl")
    assert "characters, more than the 64-token limit" in failed["reason"]  # refused before tokenizing
    _, records = tiny_run(tmp_path, small, data, max_new_tokens=8, truncation_strategy="left")
    assert len(records) == 2  # the long prompt's oldest tokens were cut instead


def test_beam_search_gives_the_n_best_beams(tmp_path, tiny_model, sums_jsonl):
    _, records = tiny_run(tmp_path, tiny_model, sums_jsonl, num_beams=4, num_return_sequences=2, max_new_tokens=6)
    assert all(len(r["completions"]) == 2 for r in records)
    with pytest.raises(ConfigError, match="beam search is done by the transformers engine only"):
        tiny_run(
            tmp_path,
            tiny_model,
            sums_jsonl,
            num_beams=4,
            sampler_engine="client",
            engine_kwargs={"base_url": "http://127.0.0.1:9/v1"},
        )


# ----------------------------------------------------------------------------- data options


def test_columns_data_seed_split_ratio_and_system_file(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction_text": f"Say {i}", "n": i} for i in range(10)])
    system = tmp_path / "system.txt"
    system.write_text("Answer in one word.")
    _, records = tiny_run(
        tmp_path,
        tiny_model,
        data,
        columns={"instruction_text": "query"},
        split_dataset_ratio=0.3,
        system=str(system),
        data_seed=7,
    )
    assert len(records) == 7  # 30% held out
    assert all(r["messages"][0] == {"role": "system", "content": "Answer in one word."} for r in records)
    again = {
        r["n"]
        for r in tiny_run(
            tmp_path, tiny_model, data, columns={"instruction_text": "query"}, split_dataset_ratio=0.3, data_seed=8
        )[1]
    }
    assert again != {r["n"] for r in records}  # another data seed holds out other rows


# ----------------------------------------------------------------------------- flags, YAML, Python entry


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


def test_sampling_main_runs_at_a_scripts_top_level(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    (tmp_path / "c.jsonl").write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "What is 1 + 1?"},
                    {"role": "assistant", "content": "\\boxed{2}"},
                ]
            }
        )
        + "\n"
    )
    script = tmp_path / "run.py"  # no `if __name__ == "__main__":` guard, a plain string dataset
    script.write_text(
        "from winnow import SamplingArguments, sampling_main\n"
        "sampling_main(SamplingArguments(sampler_engine='no', cache_files=['c.jsonl'], "
        "dataset='d.jsonl', orm_model='math', num_return_sequences=1, output_file='o.jsonl', "
        "progress=False))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    [record] = read_jsonl(tmp_path / "sample_output" / "o.jsonl")
    assert record["messages"][-1]["content"] == "\\boxed{2}"


# ----------------------------------------------------------------------------- cache files, both ways


def test_swift_cache_files_match_by_swifts_id_or_by_content_and_a_missing_one_is_sampled(
    tmp_path, tiny_model, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]}],
    )
    # a line as swift writes it: the row (messages + dataset) and swift's md5 id (from ms-swift 4.6.0)
    swift_line = {
        "messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "\\boxed{2}"}],
        "dataset": "d.jsonl",
        "id": "5a316c01dd42f2d7294e29e057e83c71",
    }
    write_jsonl(tmp_path / "swift_stage1.jsonl", [swift_line])
    proc = run_winnow(
        "sample",
        "--sampler_engine",
        "no",
        "--cache_files",
        "swift_stage1.jsonl",
        "--dataset",
        "./d.jsonl",
        "--num_return_sequences",
        "1",
        "--orm_model",
        "math",
        "--output_file",
        "s2.jsonl",
        "--progress",
        "false",
        check=True,
    )  # another spelling of the dataset: matched by content
    assert len(read_jsonl(tmp_path / "sample_output" / "s2.jsonl")) == 1, proc.stderr
    # winnow's own stage-1 lines carry swift's id, so swift's cache reader finds them
    run_winnow(
        "sample",
        "--model",
        str(tiny_model),
        "--dataset",
        "d.jsonl",
        "--num_return_sequences",
        "2",
        "--max_new_tokens",
        "3",
        "--cache_files",
        "missing.jsonl",
        "--output_file",
        "s1.jsonl",
        "--progress",
        "false",
        check=True,
    )
    stage1 = read_jsonl(tmp_path / "sample_output" / "s1.jsonl")
    assert [r["id"] for r in stage1] == ["5a316c01dd42f2d7294e29e057e83c71"] * 2


# ----------------------------------------------------------------------------- the seed's commands


def test_the_seed_commands_give_the_line_counts_swifts_document_states(tmp_path):
    """../shared/reference/swift-sample.md, with the demo world's local models and data for the hub ids."""
    common = [
        "sample",
        "--model",
        "demo-policy",
        "--sampler_engine",
        "pt",
        "--num_return_sequences",
        "5",
        "--dataset",
        "demo-arith#5",
        "--output_dir",
        str(tmp_path),
        "--progress",
        "false",
    ]
    run_winnow(*common, "--output_file", "plain.jsonl", check=True)
    plain = read_jsonl(tmp_path / "plain.jsonl")
    assert len(plain) == 25 and all(r["messages"][-1]["role"] == "assistant" and r["id"] for r in plain)
    run_winnow(
        *common,
        "--n_best_to_keep",
        "2",
        "--prm_model",
        "demo-prm",
        "--orm_model",
        "math",
        "--output_file",
        "scored.jsonl",
        check=True,
    )
    scored = read_jsonl(tmp_path / "scored.jsonl")
    assert 0 < len(scored) <= 10 and all("rejected_response" in r for r in scored)


def test_the_seed_distill_command_keeps_long_reasoning_answers(tmp_path):

    # answers of 3,000 words: past the 2,048-token cap winnow used to send (0 of 5 lines were written)
    data = write_jsonl(
        tmp_path / "math.jsonl",
        [{"problem": f"[[words=3000]] What is {i} + {i}?", "solution": str(2 * i)} for i in range(5)],
    )
    with FakeServer().running() as server:
        proc = run_winnow(
            "sample",
            "--sampler_type",
            "distill",
            "--sampler_engine",
            "client",
            "--model",
            "deepseek-r1",
            "--stream",
            "true",
            "--dataset",
            f"{data}#5",
            "--num_return_sequences",
            "1",
            "--temperature",
            "0.6",
            "--top_p",
            "0.95",
            "--engine_kwargs",
            json.dumps({"base_url": server.url}),
            "--output_dir",
            str(tmp_path),
            "--output_file",
            "distill.jsonl",
            env={"OPENAI_API_KEY": "sk-test"},
            check=True,
        )
    records = read_jsonl(tmp_path / "distill.jsonl")
    assert len(records) == 5, proc.stderr
    assert all(
        r["messages"][-1]["content"].startswith("<think>")
        and "</think>\n\n<answer>" in r["messages"][-1]["content"]
        and len(r["messages"][-1]["content"].split()) > 3000
        for r in records
    )
