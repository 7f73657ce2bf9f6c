"""The SGLang engine (engines/sglang.py): parameter and result mapping, and its glue against a stand-in
shaped like SGLang's documented API (the real library runs in test_engines.py where it is installed).
"""

from __future__ import annotations

import asyncio
import threading
import types

import pytest

from tests.support.engines import (
    TOO_LONG,
    numbered_prompt,
)
from winnow.engines import check_aligned, generate_sync
from winnow.schema import SamplingParams


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
    out = generate_sync(engine, [numbered_prompt(0), numbered_prompt(1)], params)
    assert sgl.requests == [4]  # 2 prompts x 2 copies in one call
    assert [[c.text for c in cs] for cs in out] == [["r0 ", "r1 "], ["r2 ", "r3 "]]  # copies in order; stop cut
    assert all(c.finish_reason == "stop" and c.completion_tokens == 2 for cs in out for c in cs)

    prompts = [numbered_prompt(0), numbered_prompt(1, words=40), numbered_prompt(2)]
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
