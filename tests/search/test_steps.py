"""The step machinery the strategies share (search/steps.py): duplicate partial answers, stop strings."""

from __future__ import annotations

import asyncio

from tests.support.search import SEP, ScriptedEngine, context, prompts
from winnow.schema import Prompt, SamplingParams
from winnow.search.beam import BeamSearch


def test_filter_duplicates_drops_repeated_partial_answers():
    def script(prefix, n, call):
        return ["x"] * n if not prefix else ["y$"] * n

    engine = ScriptedEngine(script)
    groups = asyncio.run(
        BeamSearch(step_separator=SEP, n=4, search_width=2, search_filter_duplicates=True).run(
            prompts(1), context(engine, {}, 4)
        )
    )
    ends = [n.get("end") for n in groups[0].trace["nodes"]]
    assert ends.count("duplicate") == 3 + 1  # 3 copies of "x", then 1 of "x\ny"
    assert [c.text for c in groups[0].completions] == ["x\ny"]
    assert groups[0].compute["prm_evaluations"] == 2  # duplicates are not valued


def test_engines_say_which_stop_string_ended_a_step():
    from winnow.engines import _local, generate_sync, get_engine
    from winnow.engines.openai import _stop_string

    engine = get_engine("transformers", "demo-policy", device="cpu", seed=1)
    problem = [{"role": "user", "content": "Compute (17 + 25) * 2 - 8."}]
    (steps,) = generate_sync(
        engine, [Prompt(id="a", messages=problem)], SamplingParams(n=4, max_new_tokens=40, temperature=1.0, stop=[SEP])
    )
    for c in steps:  # a first step: it stopped at the separator, which is cut from the text
        assert c.stop_string == SEP and SEP not in c.text and c.text.startswith("17 + 25 = ")
        # the tokens generated, up to and including the separator: not the padding of a batch that ran longer
        assert c.completion_tokens == len(engine.tokenizer(c.text + SEP, add_special_tokens=False)["input_ids"])
    done = Prompt(id="b", messages=problem, prefix="17 + 25 = 42\n42 * 2 = 84\n84 - 8 = 76\n")
    (last,) = generate_sync(engine, [done], SamplingParams(n=1, max_new_tokens=40, temperature=0.0, stop=[SEP]))
    assert last[0].text == "The answer is \\boxed{76}." and last[0].stop_string is None  # the answer ended
    # vLLM and SGLang trim the stop string and say which it was; LMDeploy's text runs past it
    assert _local.make_completion("x = 1", "stop", 3, 4, [SEP], stop_reason=SEP).stop_string == SEP
    assert _local.make_completion("x = 1", "stop", 3, 4, [SEP], stop_reason=None).stop_string is None
    assert _local.make_completion("x = 1\ny", "stop", 3, 4, [SEP]).text == "x = 1"
    assert _local.make_completion("x = 1\ny", "length", 3, 4, [SEP]).stop_string == SEP
    assert _stop_string({"stop_reason": SEP}) == SEP and _stop_string({"matched_stop": SEP}) == SEP
    assert _stop_string({"matched_stop": 2}) is None and _stop_string({"finish_reason": "stop"}) is None
    asyncio.run(engine.aclose())
