"""The transformers engine (alias ``pt``): ``model.generate`` with native multi-sample, batched.

Prompts are sorted by length and packed into calls up to a sequence and a token budget, each call
using ``num_return_sequences`` for the N samples of every prompt. A call that fails (out of
memory, say) is split in half and retried; a single prompt that still fails gets error
completions, and the rest of the batch goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass
from typing import Any

from winnow.engines import hf
from winnow.engines.prompts import Encoded, PromptEncoder, errors
from winnow.errors import require
from winnow.schema import FINISH_LENGTH, FINISH_STOP, Completion, Prompt, SamplingParams

PACKING_ANSWER_TOKENS = 4096


@dataclass
class _Work:
    """One prompt's share of a call: ``k`` samples of prompt number ``slot``, within its token budget."""

    slot: int
    ids: list[int]
    k: int
    budget: int


class TransformersEngine:
    """Local HuggingFace causal LM, sampled with ``generate``."""

    name = "transformers"

    def __init__(
        self,
        model: str,
        *,
        torch_dtype: str | None = "auto",
        device: str = "auto",
        template: str | None = None,
        template_kwargs: dict | None = None,
        use_chat_template: bool | None = None,
        response_prefix: str | None = None,
        max_length: int | None = None,
        truncation_strategy: str | None = None,
        max_batch_sequences: int = 256,
        max_batch_tokens: int = 262144,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        device_map: Any = None,
        max_memory: dict | None = None,
        quantization: dict | None = None,
        adapters: list[str] | None = None,
        revision: str | None = None,
        seed: int | None = None,
        **unused: Any,
    ):
        torch = require("torch", "hf", "the transformers engine")
        transformers = require("transformers", "hf", "the transformers engine")
        self.torch = torch
        self.model_path = hf.resolve_model_path(model)
        self.device = hf.resolve_device(device)
        self.max_batch_sequences = int(max_batch_sequences)
        self.max_batch_tokens = int(max_batch_tokens)
        self.encoder = PromptEncoder(self.model_path, template=template, template_kwargs=template_kwargs,
                                     use_chat_template=use_chat_template, max_length=max_length,
                                     truncation_strategy=truncation_strategy, trust_remote_code=trust_remote_code,
                                     response_prefix=response_prefix)
        self.tokenizer = self.encoder.tokenizer
        self.template = self.encoder.template
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
            from winnow.errors import EngineError

            raise EngineError(f"cannot load model {model}: {e}") from None
        self.adapters = [hf.resolve_model_path(a) for a in adapters or []]
        if self.adapters:
            self.model = hf.apply_adapters(self.model, self.adapters)
        if not device_map:
            self.model.to(self.device)
        self.model.eval()
        if seed is not None:
            torch.manual_seed(seed)
        self.eos_ids = self._eos_ids()
        self._args = {"model": model, "torch_dtype": torch_dtype, "device": self.device,
                      "max_batch_sequences": self.max_batch_sequences, "max_batch_tokens": self.max_batch_tokens,
                      **self.encoder.describe(), **({"template": template} if template else {}),
                      **({"adapters": list(adapters or [])} if adapters else {}),
                      **({"attn_implementation": attn_implementation} if attn_implementation else {}),
                      **({"device_map": device_map} if device_map else {}),
                      **({"quantization": quantization} if quantization else {})}
        self.unused_kwargs = sorted(unused)
        # torch releases the GIL in its kernels; one thread owns the model so calls never interleave
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="winnow-generate")

    @property
    def max_length(self) -> int | None:
        """The limit on prompt + answer (``--max_length``, else the model's context)."""
        return self.encoder.max_length

    def generation_defaults(self) -> dict[str, Any]:
        """The sampling settings of the model's generation_config.json."""
        return hf.generation_defaults(self.model_path)

    # ------------------------------------------------------------------ protocol

    def batch_plan(self, n: int) -> tuple[int, int]:
        return max(1, self.max_batch_sequences // max(1, n)), 2

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self._args}

    async def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.generate_blocking, prompts, params)

    async def aclose(self) -> None:
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ work

    def render(self, prompt: Prompt) -> str:
        return self.encoder.render(prompt)

    def generate_blocking(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """The synchronous body of :meth:`generate`."""
        return self._run_encoded(*self.encoder.encode(prompts, params), params)

    def generate_ids_blocking(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Like :meth:`generate_blocking` for prompts already tokenized (no chat template applied);
        the server's ``/v1/completions`` and its dynamic batches use it."""
        return self._run_encoded(*self.encoder.encode_ids(prompts, params), params)

    def _run_encoded(self, encoded: list[Encoded], results: list[list[Completion]],
                     params: SamplingParams) -> list[list[Completion]]:
        work: list[_Work] = []
        for item in encoded:
            per_call = max(1, min(params.n, self.max_batch_sequences))
            left = params.n
            while left > 0:  # more samples than one call holds: split them
                k = min(per_call, left)
                work.append(_Work(item.slot, item.ids, k, item.max_new_tokens))
                left -= k
        work.sort(key=lambda w: len(w.ids), reverse=True)  # similar lengths together: less padding
        for batch in self._pack(work, params):
            self._run(batch, params, results)
        return results

    def _pack(self, work: list[_Work], params: SamplingParams) -> list[list[_Work]]:
        batches: list[list[_Work]] = []
        current: list[_Work] = []
        seqs = 0
        for w in work:
            longest = max([len(x.ids) for x in current] + [len(w.ids)])
            # an answer without --max_new_tokens may run to the end of the context; packing plans for at most
            # PACKING_ANSWER_TOKENS of it (a call that still runs out of memory is halved and retried)
            answer = min(max([x.budget for x in current] + [w.budget]), PACKING_ANSWER_TOKENS) \
                if params.max_new_tokens is None else max([x.budget for x in current] + [w.budget])
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

    def _run(self, batch: list[_Work], params: SamplingParams, results: list[list[Completion]]) -> None:
        try:
            outputs = self._call(batch, params)
        except Exception as e:
            if len(batch) > 1:  # out of memory and the like: halve and retry
                if self.device.startswith("cuda"):
                    self.torch.cuda.empty_cache()
                mid = len(batch) // 2
                self._run(batch[:mid], params, results)
                self._run(batch[mid:], params, results)
                return
            w = batch[0]
            results[w.slot].extend(errors(w.k, f"{type(e).__name__}: {e}", prompt_tokens=len(w.ids)))
            return
        for w, completions in zip(batch, outputs, strict=True):
            results[w.slot].extend(completions)

    def _call(self, batch: list[_Work], params: SamplingParams) -> list[list[Completion]]:
        torch = self.torch
        k = batch[0].k
        pad = self.tokenizer.pad_token_id
        width = max(len(w.ids) for w in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, w in enumerate(batch):  # left padding
            input_ids[row, width - len(w.ids):] = torch.tensor(w.ids, dtype=torch.long)
            attention[row, width - len(w.ids):] = 1
        max_new = max(w.budget for w in batch)
        if self.max_length is not None:
            max_new = max(1, min(max_new, self.max_length - width))
        temperature = 1.0 if params.temperature is None else params.temperature
        beams = max(1, params.num_beams)
        sample = temperature > 0 and beams == 1
        gen: dict[str, Any] = {
            "max_new_tokens": max_new,
            "do_sample": sample,
            # greedy decoding gives k identical answers: compute one and copy it; beam search gives the k best
            "num_return_sequences": k if sample or beams > 1 else 1,
            "pad_token_id": pad,
            "eos_token_id": self.eos_ids,
            "repetition_penalty": params.repetition_penalty or 1.0,
        }
        if beams > 1:
            gen.update(num_beams=max(beams, k), temperature=None, top_p=None, top_k=None)
        elif sample:
            gen.update(temperature=temperature, top_p=params.top_p or 1.0, top_k=params.top_k or 0)
            if params.min_p:
                gen["min_p"] = params.min_p
        else:
            gen.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            gen.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device), **gen
            )
        new = out[:, width:].tolist()
        if not sample and beams == 1 and k > 1:
            new = [row for row in new for _ in range(k)]
        eos = set(self.eos_ids)
        outputs: list[list[Completion]] = []
        for row, w in enumerate(batch):
            completions = []
            for j in range(k):
                tokens = new[row * k + j]
                completions.append(self._completion(tokens, eos, pad, len(w.ids), max_new, params.stop))
            outputs.append(completions)
        return outputs

    def _completion(self, tokens: list[int], eos: set[int], pad: int, prompt_tokens: int, max_new: int,
                    stop: list[str]) -> Completion:
        finish = FINISH_LENGTH
        cut = len(tokens)
        for i, t in enumerate(tokens):
            if t in eos:
                cut, finish = i, FINISH_STOP
                break
        body = tokens[:cut]
        while body and body[-1] == pad and pad not in eos:  # a row that finished before the others
            body.pop()
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        if stop:
            hits = [(text.find(s), s) for s in stop if s and s in text]
            if hits:
                at, _ = min(hits)
                text, finish = text[:at], FINISH_STOP
        if finish == FINISH_LENGTH and len(body) < max_new:
            finish = FINISH_STOP
        n_tokens = cut + (1 if finish == FINISH_STOP and cut < len(tokens) else 0)
        return Completion(text=text, finish_reason=finish, prompt_tokens=prompt_tokens,
                          completion_tokens=n_tokens)

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        cfg = getattr(self.model, "generation_config", None)
        for value in (getattr(cfg, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.append(value)
            elif isinstance(value, (list, tuple)):
                ids.extend(int(v) for v in value)
        return sorted(set(ids))



