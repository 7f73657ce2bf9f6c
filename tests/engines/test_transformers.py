"""The transformers engine (engines/transformers.py) on tiny real models: stop words and finish reasons,
Llama and Qwen2 architectures, template files, beam search, shared prefill, prompts kept in call order, and a
model handed over in memory.
"""

from __future__ import annotations

import pytest

import winnow
from tests.support.files import read_jsonl
from tests.support.sampling import tiny_run
from winnow.errors import ConfigError
from winnow.schema import Prompt, SamplingParams


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


def test_stop_words_and_finish_reasons(tiny_model):
    from winnow.engines import generate_sync
    from winnow.engines.transformers import TransformersEngine
    from winnow.schema import Prompt, SamplingParams

    engine = TransformersEngine(str(tiny_model), seed=0, max_batch_sequences=4)
    prompts = [Prompt(id=str(i), messages=[{"role": "user", "content": "hello " * (i + 1)}]) for i in range(3)]
    out = generate_sync(engine, prompts, SamplingParams(n=5, max_new_tokens=6))
    assert [len(c) for c in out] == [5, 5, 5]  # split over calls of at most 4 sequences, still 5 each
    for cs in out:
        for c in cs:
            assert c.finish_reason in ("stop", "length")
            assert c.prompt_tokens > 0 and 0 < c.completion_tokens <= 6
            if c.finish_reason == "length":
                assert c.completion_tokens == 6
    # a stop word cuts the text before it
    words = [w for c in out[0] for w in c.text.split() if len(w) > 1]
    if words:
        stop = words[0]
        cut = generate_sync(engine, prompts[:1], SamplingParams(n=3, max_new_tokens=6, stop=[stop], temperature=0))
        assert all(stop not in c.text for c in cut[0])
    # too long for max_length: that prompt fails, the others do not
    engine.encoder.max_length = 60
    mixed = [Prompt(id="long", messages=[{"role": "user", "content": "word " * 200}]), prompts[0]]
    out = generate_sync(engine, mixed, SamplingParams(n=2, max_new_tokens=4))
    assert all(c.finish_reason == "error" and "max_length" in c.error for c in out[0])
    assert all(c.finish_reason != "error" for c in out[1])


def test_llama_architecture_and_template_file(tmp_path, tiny_llama, math_jsonl):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    summary = winnow.sample(
        model=str(tiny_llama),
        dataset=[f"{math_jsonl}#2"],
        num_return_sequences=2,
        max_new_tokens=4,
        template=str(template),
        system="Be brief.",
        output_dir=str(tmp_path),
        output_file="l.jsonl",
        progress=False,
    )
    assert summary.records_written == 4
    records = read_jsonl(tmp_path / "l.jsonl")
    assert records[0]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_samples_share_their_prompts_prefill_and_come_out_the_same(tiny_model):
    """The N samples of a prompt decode from one prefill (the model sees each prompt once, not N times), and
    with the same seed they are the samples a plain per-sample prefill gives."""
    import torch

    from winnow.engines import generate_sync
    from winnow.engines.transformers import TransformersEngine
    from winnow.schema import Prompt, SamplingParams

    prompts = [
        Prompt(id=str(i), messages=[{"role": "user", "content": f"Count to {i} and say why."}]) for i in range(3)
    ]
    texts, first_batches = {}, {}
    for shared in (True, False):
        engine = TransformersEngine(str(tiny_model), shared_prefill=shared)
        seen: list[tuple[int, int]] = []
        hook = engine.model.register_forward_hook(
            lambda module, args, kwargs, out, seen=seen: (
                seen.append(tuple(kwargs["input_ids"].shape)) if kwargs.get("input_ids") is not None else None
            ),
            with_kwargs=True,
        )
        torch.manual_seed(7)
        out = generate_sync(engine, prompts, SamplingParams(n=4, max_new_tokens=12, temperature=1.0))
        hook.remove()
        texts[shared] = [[c.text for c in cs] for cs in out]
        first_batches[shared] = seen[0][0]
    assert first_batches == {True: 3, False: 12}  # one prefill per prompt, against one per sample
    assert texts[True] == texts[False]


# ----------------------------------------------------------------------------- call order, a model in memory

ORDER_PARAMS = SamplingParams(n=3, max_new_tokens=8, temperature=1.0)


def _prompts() -> list[Prompt]:
    # longer and longer: sorting by length would run them in the reverse order
    return [Prompt(id=str(i), messages=[{"role": "user", "content": "count " * (i + 1)}]) for i in range(5)]


def _texts(engine, seed: int) -> list[list[str]]:
    engine.reseed(seed)
    return [[c.text for c in group] for group in engine.generate_blocking(_prompts(), ORDER_PARAMS)]


def _plain_generate_loop(model, tokenizer, seed: int, per_call: int) -> list[list[str]]:
    """What a script sampling with ``model.generate`` directly gets: prompts in order, ``per_call`` at a time."""
    import torch

    torch.manual_seed(seed)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    texts = [tokenizer.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True) for p in _prompts()]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    out = []
    for start in range(0, len(rows), per_call):
        chunk = rows[start : start + per_call]
        width = max(len(r) for r in chunk)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in chunk])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk])
        with torch.inference_mode():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=ORDER_PARAMS.max_new_tokens,
                num_return_sequences=ORDER_PARAMS.n,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        decoded = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        out += [decoded[j * ORDER_PARAMS.n : (j + 1) * ORDER_PARAMS.n] for j in range(len(chunk))]
    return out


def test_prompts_kept_in_call_order_sample_what_a_plain_generate_loop_does(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from winnow.engines.transformers import TransformersEngine

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    plain = _plain_generate_loop(model, tokenizer, seed=3, per_call=2)
    # 6 sequences per call: 2 prompts of 3 samples, as the plain loop does
    options = dict(max_batch_sequences=6, shared_prefill=False)
    in_order = TransformersEngine(str(tiny_model), sort_by_length=False, **options)
    assert _texts(in_order, seed=3) == plain
    assert in_order.describe()["sort_by_length"] is False
    # sorted by length (the default) the rows draw other random numbers: the option is what makes them agree
    assert _texts(TransformersEngine(str(tiny_model), **options), seed=3) != plain


def test_a_model_in_memory_is_sampled_with_its_current_weights(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from winnow.engines.transformers import TransformersEngine
    from winnow.errors import ConfigError

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    model.train()  # a model being trained: the engine leaves its mode alone
    engine = TransformersEngine(str(tiny_model), loaded_model=model)
    assert engine.model is model and model.training and engine.describe()["loaded_model"] is True
    from_disk = TransformersEngine(str(tiny_model))
    assert _texts(engine, seed=5) == _texts(from_disk, seed=5)
    with torch.no_grad():  # a training step, as far as the engine can tell
        model.model.embed_tokens.weight.mul_(-3.0)
    assert _texts(engine, seed=5) != _texts(from_disk, seed=5)
    with pytest.raises(ConfigError, match="loaded_model"):
        TransformersEngine(str(tiny_model), loaded_model=model, adapters=["lora"])
