"""The transformers engine (alias ``pt``): ``model.generate``, batched, as one more local engine.

What every local engine does (rendering and encoding prompts within the context, failing a prompt as a
value, copying a greedy answer, the worker thread, describe/close) comes from :mod:`winnow.engines._local`;
this module only runs the model. Prompts are sorted by length and packed into calls up to a sequence and a
token budget; ``sort_by_length=False`` packs them in the order given, so that with ``shared_prefill=False`` a
seeded call samples what a plain loop of ``model.generate(..., num_return_sequences=N)`` over the same
prompts, ``max_batch_sequences`` samples at a time, does (a script's samples, reproduced). The model is
loaded from ``model``, or given already in memory (``loaded_model``: a model being trained, sampled with its
current weights). The N samples of a prompt share its prefill: the prompt is run through the model once and
its KV cache repeated N times for decoding (``shared_prefill``), instead of ``num_return_sequences``
prefilling every copy. A call that fails (out of memory, say) is split in half and retried; a single
prompt that still fails gets error completions, and the rest of the batch goes on.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from winnow.engines import _local, hf
from winnow.engines.prompts import Encoded, errors
from winnow.errors import ConfigError, EngineError, require
from winnow.schema import FINISH_LENGTH, FINISH_STOP, Completion, SamplingParams

# an answer without --max_new_tokens may run to the end of the context; packing plans for at most this
# much of it (a call that still runs out of memory is halved and retried)
PACKING_ANSWER_TOKENS = 4096


@dataclass
class _Work:
    """One prompt's share of a call: ``k`` samples of the encoded prompt ``item``."""

    item: Encoded
    k: int

    @property
    def ids(self) -> list[int]:
        return self.item.ids


class TransformersEngine(_local.LocalEngine):
    """Local HuggingFace causal LM, sampled with ``generate``."""

    name = "transformers"

    def __init__(
        self,
        model: str,
        *,
        torch_dtype: str | None = "auto",
        device: str = "auto",
        template: str | None = None,
        max_length: int | None = None,
        max_batch_sequences: int = 256,
        max_batch_tokens: int = 262144,
        shared_prefill: bool = True,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        device_map: Any = None,
        max_memory: dict | None = None,
        quantization: dict | None = None,
        adapters: list[str] | None = None,
        revision: str | None = None,
        seed: int | None = None,
        sort_by_length: bool = True,
        loaded_model: Any = None,
        **options: Any,
    ):
        """``loaded_model``: sample from this model, already in memory, instead of loading ``model``'s weights
        (``model`` still gives the tokenizer, chat template and context); it is used as it is, on its device
        and in its train/eval mode, so a model being trained is sampled with its current weights."""
        torch = require("torch", "hf", "the transformers engine")
        transformers = require("transformers", "hf", "the transformers engine")
        self.torch = torch
        prompt_options = {k: options.pop(k) for k in _local.PROMPT_OPTIONS if k in options}
        super().__init__(
            model,
            torch_dtype=torch_dtype,
            template=template,
            max_length=max_length,
            trust_remote_code=trust_remote_code,
            max_prompts_per_call=int(max_batch_sequences),
            revision=revision,
            **prompt_options,
        )
        if loaded_model is not None and (adapters or quantization or device_map):
            raise ConfigError("loaded_model is used as it is: load adapters or quantize it before handing it over")
        self.device = hf.resolve_device(device) if loaded_model is None else str(loaded_model.device)
        self.max_batch_sequences = int(max_batch_sequences)
        self.max_batch_tokens = int(max_batch_tokens)
        self.shared_prefill = bool(shared_prefill)
        self.sort_by_length = bool(sort_by_length)
        self.tokenizer = self.encoder.tokenizer
        self.adapters = [hf.resolve_model_path(a, "--adapters") for a in adapters or []]
        if loaded_model is not None:
            self.model = loaded_model
        else:
            extra: dict[str, Any] = {}
            if attn_implementation:
                extra["attn_implementation"] = attn_implementation
            if device_map:
                extra["device_map"] = device_map
                if max_memory:
                    extra["max_memory"] = max_memory
            if revision:
                extra["revision"] = revision
            if quantization:
                extra["quantization_config"] = hf.quantization_config(quantization, self.device)
            dtype = hf.resolve_dtype(torch_dtype, self.device)
            try:
                self.model = transformers.AutoModelForCausalLM.from_pretrained(
                    self.model_path, **hf.model_kwargs(dtype, trust_remote_code, **extra)
                )
            except OSError as e:
                raise EngineError(f"cannot load model {model}: {e}") from None
            if self.adapters:
                self.model = hf.apply_adapters(self.model, self.adapters)
            if not device_map:
                self.model.to(self.device)
            self.model.eval()
        if seed is not None:
            torch.manual_seed(seed)
        self.eos_ids = self._eos_ids()
        self._args.update(
            {
                "torch_dtype": torch_dtype,
                "device": self.device,
                "max_batch_sequences": self.max_batch_sequences,
                "max_batch_tokens": self.max_batch_tokens,
                "shared_prefill": self.shared_prefill,
                **({"sort_by_length": False} if not self.sort_by_length else {}),
                **({"loaded_model": True} if loaded_model is not None else {}),
                **({"adapters": list(adapters or [])} if adapters else {}),
                **({"attn_implementation": attn_implementation} if attn_implementation else {}),
                **({"device_map": device_map} if device_map else {}),
                **({"quantization": quantization} if quantization else {}),
            }
        )
        self.unused_kwargs = sorted(options)
        self._shared_prefill_failed = False
        # generate's argument for a ready KV cache: `cache` from transformers 5.2x, `past_key_values` before
        from transformers.generation import utils as generation_utils

        self._cache_kwarg = (
            "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"
        )

    def batch_plan(self, n: int) -> tuple[int, int]:
        return max(1, self.max_batch_sequences // max(1, n)), 2

    def close(self) -> None:
        pass  # the model goes with the engine

    def reseed(self, seed: int) -> None:
        """The next call draws from torch's generator seeded with ``seed``."""
        self.torch.manual_seed(seed)

    def stream_ids_blocking(self, prompt: list[int], params: SamplingParams, on_text) -> Completion:
        """One answer to a tokenized prompt, its text handed to ``on_text`` piece by piece as it is generated."""
        from transformers.generation.streamers import BaseStreamer

        tokenizer, stop = self.tokenizer, list(params.stop)
        hold = max((len(s) for s in stop if s), default=1) - 1  # a stop string may still be forming
        eos = set(self.eos_ids)

        class Pieces(BaseStreamer):
            def __init__(self) -> None:
                self.ids: list[int] = []
                self.sent = 0
                self.prompt_seen = False
                self.stopped = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate hands over the prompt first
                    self.prompt_seen = True
                    return
                self.ids += [t for t in value.reshape(-1).tolist() if t not in eos]
                self.flush(final=False)

            def flush(self, final: bool) -> None:
                if self.stopped:
                    return
                text = tokenizer.decode(self.ids, skip_special_tokens=True)
                cut, hit = _local.cut_at_stop(text, stop)
                end = len(cut) if hit or final else max(self.sent, len(cut) - hold)
                if hit:
                    self.stopped = True
                if text.endswith("\ufffd") and not final:  # half of a multi-byte character
                    end = min(end, len(text) - 1)
                if end > self.sent:
                    on_text(cut[self.sent : end])
                    self.sent = end

            def end(self) -> None:
                self.flush(final=True)

        item = self.encoder.encode_ids([prompt], params)[0]
        if not item:
            raise EngineError(f"the prompt of {len(prompt)} tokens does not fit the context ({self.context_length})")
        streamer = Pieces()
        params = _local.with_local_defaults(params)
        [[completion]] = self._generate([_Work(item[0], 1)], params, streamer=streamer)
        return completion

    # ------------------------------------------------------------------ one call of the local engine contract

    def call(self, items: list[Encoded], params: SamplingParams) -> list[list[Completion]]:
        """The completions of each encoded prompt (one for greedy decoding: copied by the caller); never
        raises: packed batches that fail are halved, a prompt that still fails gets error completions."""
        results: dict[int, list[Completion]] = {item.slot: [] for item in items}
        copies = 1 if _local.is_greedy(params) and params.num_beams <= 1 else params.n
        work: list[_Work] = []
        for item in items:
            left = copies
            while left > 0:  # more samples than one call holds: split them
                k = min(max(1, self.max_batch_sequences), left)
                work.append(_Work(item, k))
                left -= k
        if self.sort_by_length:
            work.sort(key=lambda w: len(w.ids), reverse=True)  # similar lengths together: less padding

        def failed(w: _Work, e: Exception) -> list[Completion]:
            if self.device.startswith("cuda"):
                self.torch.cuda.empty_cache()
            return errors(w.k, f"{type(e).__name__}: {e}", prompt_tokens=len(w.ids))

        for batch in self._pack(work, params):
            outputs = _local.run_isolated(batch, lambda b: self._generate(b, params), failed)
            for w, completions in zip(batch, outputs, strict=True):
                results[w.item.slot].extend(completions)
        return [results[item.slot] for item in items]

    def _pack(self, work: list[_Work], params: SamplingParams) -> list[list[_Work]]:
        batches: list[list[_Work]] = []
        current: list[_Work] = []
        seqs = 0
        for w in work:
            longest = max([len(x.ids) for x in current] + [len(w.ids)])
            answer = max([x.item.max_new_tokens for x in current] + [w.item.max_new_tokens])
            if params.max_new_tokens is None:
                answer = min(answer, PACKING_ANSWER_TOKENS)
            over_seqs = seqs + w.k > self.max_batch_sequences
            over_tokens = (seqs + w.k) * (longest + answer) > self.max_batch_tokens
            if current and (over_seqs or over_tokens or w.k != current[0].k):
                batches.append(current)
                current, seqs = [], 0
            current.append(w)
            seqs += w.k
        if current:
            batches.append(current)
        return batches

    def _generate(self, batch: list[_Work], params: SamplingParams, streamer: Any = None) -> list[list[Completion]]:
        torch = self.torch
        k = batch[0].k
        pad = self.tokenizer.pad_token_id
        width = max(len(w.ids) for w in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, w in enumerate(batch):  # left padding
            input_ids[row, width - len(w.ids) :] = torch.tensor(w.ids, dtype=torch.long)
            attention[row, width - len(w.ids) :] = 1
        max_new = max(w.item.max_new_tokens for w in batch)
        if self.context_length is not None:
            max_new = max(1, min(max_new, self.context_length - width))
        beams = max(1, params.num_beams)
        sample = not _local.is_greedy(params) and beams == 1
        gen: dict[str, Any] = {
            "max_new_tokens": max_new,
            "do_sample": sample,
            "pad_token_id": pad,
            "eos_token_id": self.eos_ids,
            "repetition_penalty": params.repetition_penalty or 1.0,
        }
        if beams > 1:  # beam search: the k best of max(beams, k) beams
            gen.update(num_beams=max(beams, k), num_return_sequences=k, temperature=None, top_p=None, top_k=None)
        elif sample:
            gen.update(temperature=params.temperature, top_p=params.top_p or 1.0, top_k=params.top_k or 0)
            if params.min_p:
                gen["min_p"] = params.min_p
        else:
            gen.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            gen.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if streamer is not None:
            gen["streamer"] = streamer
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        if params.response_format:  # structured output: constrained decoding (winnow.engines.constrained)
            from winnow.engines.constrained import logits_processor

            vocab = self.model.get_output_embeddings().weight.shape[0]
            gen["logits_processor"] = [logits_processor(self.tokenizer, vocab, self.eos_ids, params.response_format)]
        with torch.inference_mode():
            if sample and k > 1:
                out = self._sample_shared(input_ids, attention, k, gen)
            else:
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    **({} if beams > 1 else {"num_return_sequences": 1}),
                    **gen,
                )
        new = out[:, width:].tolist()
        eos = set(self.eos_ids)
        outputs: list[list[Completion]] = []
        for row, w in enumerate(batch):
            outputs.append(
                [self._completion(new[row * k + j], eos, pad, len(w.ids), max_new, params.stop) for j in range(k)]
            )
        return outputs

    def _sample_shared(self, input_ids: Any, attention: Any, k: int, gen: dict[str, Any]) -> Any:
        """k samples of every row, the rows' prompts prefilled once and their KV cache repeated k times;
        ``generate`` then starts from the prompts' last token (the same tokens and positions as a plain run)."""
        expanded_ids = input_ids.repeat_interleave(k, dim=0)
        expanded_mask = attention.repeat_interleave(k, dim=0)
        if self.shared_prefill and not self._shared_prefill_failed and input_ids.shape[1] > 1:
            try:
                positions = (attention.cumsum(-1) - 1).clamp(min=0)
                prefill = self.model(
                    input_ids=input_ids[:, :-1],
                    attention_mask=attention[:, :-1],
                    position_ids=positions[:, :-1],
                    use_cache=True,
                )
                cache = prefill.past_key_values
                cache.batch_repeat_interleave(k)
                return self.model.generate(
                    input_ids=expanded_ids,
                    attention_mask=expanded_mask,
                    **{self._cache_kwarg: cache},
                    num_return_sequences=1,
                    **gen,
                )
            except (AttributeError, NotImplementedError, TypeError, ValueError) as e:
                # a model whose cache cannot be shared this way: every prompt prefilled per sample, as before
                self._shared_prefill_failed = True
                print(
                    f"winnow: note: shared prefill is not available for this model ({type(e).__name__}: {e}); "
                    "each sample prefills its prompt",
                    file=sys.stderr,
                )
        return self.model.generate(input_ids=expanded_ids, attention_mask=expanded_mask, num_return_sequences=1, **gen)

    def _completion(
        self, tokens: list[int], eos: set[int], pad: int, prompt_tokens: int, max_new: int, stop: list[str]
    ) -> Completion:
        finish = FINISH_LENGTH
        cut = len(tokens)
        for i, t in enumerate(tokens):
            if t in eos:
                cut, finish = i, FINISH_STOP
                break
        body = tokens[:cut]
        while body and body[-1] == pad and pad not in eos:  # a row that finished before the others
            body.pop()
        ended_at_eos = cut < len(tokens)
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        text, stop_string = _local.first_stop(text, stop)
        if stop_string is not None:
            finish = FINISH_STOP
        if finish == FINISH_LENGTH and len(body) < max_new:
            finish = FINISH_STOP
        # the tokens generated: a row stopped by a stop string is padded (not by EOS) up to the longest row
        n_tokens = len(body) + (1 if ended_at_eos else 0)
        return Completion(
            text=text,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=n_tokens,
            token_ids=body,
            stop_string=stop_string,
        )

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        cfg = getattr(self.model, "generation_config", None)
        for value in (getattr(cfg, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.append(value)
            elif isinstance(value, (list, tuple)):
                ids.extend(int(v) for v in value)
        return sorted(set(ids))
