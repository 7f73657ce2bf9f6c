"""The transformers engine's call order and a model handed over in memory, on a tiny real model."""

from __future__ import annotations

import pytest

from winnow.schema import Prompt, SamplingParams

PARAMS = SamplingParams(n=3, max_new_tokens=8, temperature=1.0)


def _prompts() -> list[Prompt]:
    # longer and longer: sorting by length would run them in the reverse order
    return [Prompt(id=str(i), messages=[{"role": "user", "content": "count " * (i + 1)}]) for i in range(5)]


def _texts(engine, seed: int) -> list[list[str]]:
    engine.reseed(seed)
    return [[c.text for c in group] for group in engine.generate_blocking(_prompts(), PARAMS)]


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
                max_new_tokens=PARAMS.max_new_tokens,
                num_return_sequences=PARAMS.n,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        decoded = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        out += [decoded[j * PARAMS.n : (j + 1) * PARAMS.n] for j in range(len(chunk))]
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
