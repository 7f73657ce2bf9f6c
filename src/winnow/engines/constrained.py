"""Constrained decoding for the transformers engine (and so ``winnow serve``): answers that match a JSON
schema, made so token by token with llguidance.

Why llguidance (``benchmarks/constrained_decoding.py`` measured it against xgrammar and outlines on
this project's CPU machine, torch 2.13 / transformers 5.25): one 8 MB wheel with no dependencies
(xgrammar pulls in triton, about 1 GB), the fastest of the three at 32k vocabulary, and it honours the
schema's bounds (``maximum``, ``maxLength``), which outlines' default backend ignored, so its answers
ran to the token limit.

A generate call gets one :class:`JsonLogitsProcessor`; each row of the call (every sample of every
prompt) has its own matcher, copied from one compiled grammar. The grammar is compact JSON (no
whitespace between tokens): a small model left free to emit whitespace may never stop.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from winnow.errors import ConfigError, require
from winnow.structured import schema_of


@functools.lru_cache(maxsize=8)
def _tokenizer(tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...]) -> Any:
    """llguidance's view of a HF tokenizer (about a second to build for a large vocabulary: built once)."""
    require("llguidance", "structured", "constrained decoding (--response_format on a local engine)")
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_ids))


@functools.lru_cache(maxsize=64)
def _matcher(tokenizer: Any, vocab_size: int, eos_ids: tuple[int, ...], schema_json: str) -> Any:
    """A fresh matcher of ``schema_json`` (copied for each row; never consumed itself)."""
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_json, defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(_tokenizer(tokenizer, vocab_size, eos_ids), grammar, log_level=0)
    if matcher.is_error():
        raise ConfigError(
            f"--response_format: the schema cannot be used for constrained decoding: {matcher.get_error()}"
        )
    return matcher


def logits_processor(tokenizer: Any, vocab_size: int, eos_ids: list[int], response_format: dict[str, Any]) -> Any:
    """A transformers logits processor that keeps every row of one ``generate`` call inside the schema of
    ``response_format`` (OpenAI's shape; see winnow.structured)."""
    schema = schema_of(response_format)
    if schema is None:
        raise ConfigError(
            f"response_format type {response_format.get('type')!r} cannot be decoded; use json_schema or json_object"
        )
    base = _matcher(tokenizer, vocab_size, tuple(eos_ids), json.dumps(schema, sort_keys=True))
    return _processor_class()(base, vocab_size, eos_ids)


@functools.cache
def _processor_class() -> type:
    import torch  # llguidance.torch is not imported: it sets up torch.compile, a second spent for nothing here
    from transformers import LogitsProcessor

    bits = torch.arange(32, dtype=torch.int32)

    class JsonLogitsProcessor(LogitsProcessor):
        """Masks, for each row, the tokens that would leave the grammar (after a row ends: all but EOS)."""

        def __init__(self, base: Any, vocab_size: int, eos_ids: list[int]):
            self.base = base
            self.vocab_size = vocab_size
            self.eos_ids = list(eos_ids)
            self.matchers: list[Any] | None = None
            self.mask: Any = None
            self.eos_only = torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)
            for eos in self.eos_ids:
                word = int(self.eos_only[eos // 32]) | (1 << (eos % 32))
                self.eos_only[eos // 32] = word - (1 << 32) if word >= 1 << 31 else word  # int32's sign bit

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            rows = input_ids.shape[0]
            if self.matchers is None:  # the first step: nothing generated yet
                self.matchers = [self.base.deep_copy() for _ in range(rows)]
                self.mask = torch.zeros((rows, (self.vocab_size + 31) // 32), dtype=torch.int32)
            else:
                for matcher, token in zip(self.matchers, input_ids[:, -1].tolist(), strict=True):
                    if not matcher.is_stopped() and not matcher.is_error():
                        matcher.consume_token(token)
            for row, matcher in enumerate(self.matchers):
                if matcher.is_stopped() or matcher.is_error():
                    # a finished row (transformers pads it from now on), or one the grammar lost: only EOS
                    self.mask[row] = self.eos_only
                else:
                    words = self.mask[row]
                    matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
            allowed = ((self.mask.unsqueeze(-1) >> bits) & 1).reshape(rows, -1)[:, : scores.shape[-1]].bool()
            if allowed.shape[-1] < scores.shape[-1]:  # logits wider than the vocabulary (padding): never allowed
                allowed = torch.nn.functional.pad(allowed, (0, scores.shape[-1] - allowed.shape[-1]))
            return scores.masked_fill(~allowed.to(scores.device), float("-inf"))

    return JsonLogitsProcessor
