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
from winnow.errors import require
from winnow.schema import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, Completion, Prompt, SamplingParams


@dataclass
class _Work:
    """One prompt's share of a call: ``k`` samples of prompt number ``slot``."""

    slot: int
    ids: list[int]
    k: int


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
        max_length: int | None = None,
        max_batch_sequences: int = 256,
        max_batch_tokens: int = 262144,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        seed: int | None = None,
        **unused: Any,
    ):
        torch = require("torch", "hf", "the transformers engine")
        transformers = require("transformers", "hf", "the transformers engine")
        self.torch = torch
        self.model_path = hf.resolve_model_path(model)
        self.device = hf.resolve_device(device)
        self.template = hf.load_template(template)
        self.max_length = max_length
        self.max_batch_sequences = int(max_batch_sequences)
        self.max_batch_tokens = int(max_batch_tokens)
        self.tokenizer = hf.load_tokenizer(self.model_path, trust_remote_code=trust_remote_code)
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        dtype = hf.resolve_dtype(torch_dtype, self.device)
        try:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                self.model_path, **hf.model_kwargs(dtype, trust_remote_code, **extra)
            )
        except OSError as e:
            from winnow.errors import EngineError

            raise EngineError(f"cannot load model {model}: {e}") from None
        self.model.to(self.device).eval()
        if seed is not None:
            torch.manual_seed(seed)
        self.eos_ids = self._eos_ids()
        self._args = {"model": model, "torch_dtype": torch_dtype, "device": self.device,
                      "max_batch_sequences": self.max_batch_sequences, "max_batch_tokens": self.max_batch_tokens,
                      "max_length": max_length, **({"template": template} if template else {})}
        self.unused_kwargs = sorted(unused)
        # torch releases the GIL in its kernels; one thread owns the model so calls never interleave
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="winnow-generate")

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
        return hf.render_chat(self.tokenizer, prompt.messages, self.template)

    def generate_blocking(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """The synchronous body of :meth:`generate`."""
        return self._generate_blocking(prompts, params, self._encode)

    def generate_ids_blocking(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        """Like :meth:`generate_blocking` for prompts already tokenized (no chat template applied);
        the server's ``/v1/completions`` and its dynamic batches use it."""
        return self._generate_blocking(prompts, params, list)

    def _encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer(self.render(prompt), add_special_tokens=False)["input_ids"]

    def _generate_blocking(self, prompts: list, params: SamplingParams, encode) -> list[list[Completion]]:
        results: list[list[Completion]] = [[] for _ in prompts]
        work: list[_Work] = []
        for slot, prompt in enumerate(prompts):
            try:
                ids = encode(prompt)
            except Exception as e:  # a template error is this prompt's failure, not the batch's
                results[slot] = _errors(params.n, f"cannot render the prompt: {type(e).__name__}: {e}")
                continue
            if self.max_length is not None and len(ids) >= self.max_length:
                msg = f"prompt has {len(ids)} tokens; --max_length is {self.max_length}"
                results[slot] = _errors(params.n, msg, prompt_tokens=len(ids))
                continue
            per_call = max(1, min(params.n, self.max_batch_sequences))
            left = params.n
            while left > 0:  # more samples than one call holds: split them
                k = min(per_call, left)
                work.append(_Work(slot, ids, k))
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
            over_seqs = seqs + w.k > self.max_batch_sequences
            over_tokens = (seqs + w.k) * (longest + params.max_new_tokens) > self.max_batch_tokens
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
            results[w.slot].extend(_errors(w.k, f"{type(e).__name__}: {e}", prompt_tokens=len(w.ids)))
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
        max_new = params.max_new_tokens
        if self.max_length is not None:
            max_new = max(1, min(max_new, self.max_length - width))
        sample = params.temperature > 0
        gen: dict[str, Any] = {
            "max_new_tokens": max_new,
            "do_sample": sample,
            # greedy decoding gives k identical answers: compute one and copy it
            "num_return_sequences": k if sample else 1,
            "pad_token_id": pad,
            "eos_token_id": self.eos_ids,
            "repetition_penalty": params.repetition_penalty,
        }
        if sample:
            gen.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0)
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
        if not sample and k > 1:
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


def _errors(n: int, message: str, prompt_tokens: int = 0) -> list[Completion]:
    return [Completion(text="", finish_reason=FINISH_ERROR, error=message, prompt_tokens=prompt_tokens)
            for _ in range(n)]
