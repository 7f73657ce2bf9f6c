"""From a Prompt to the token ids a local engine runs, the same way for every local engine.

A :class:`PromptEncoder` renders the conversation with the chat template (a swift template name, a
Jinja template, or the tokenizer's own; its variables such as ``enable_thinking``; the answer's
``response_prefix``), tokenizes it, and checks it against the context: a prompt too long fails as
that row's error before any model work (proved too long from its character count alone when it is
huge, so an enormous row never reaches the tokenizer), or loses its oldest tokens with
``truncation_strategy="left"``. Each prompt gets its token budget: ``max_new_tokens``, or the rest
of the context when the run sets none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from winnow.engines import hf
from winnow.errors import ConfigError
from winnow.schema import FINISH_ERROR, Completion, Prompt, SamplingParams

# the answer budget when the run sets no --max_new_tokens and the model states no context length
FALLBACK_MAX_NEW_TOKENS = 2048


@dataclass
class Encoded:
    """One prompt ready for a backend: its position in the call, its rendered text and token ids, and
    its token budget."""

    slot: int
    text: str
    ids: list[int]
    max_new_tokens: int


def errors(n: int, message: str, prompt_tokens: int = 0) -> list[Completion]:
    """``n`` failed completions carrying ``message``."""
    return [
        Completion(text="", finish_reason=FINISH_ERROR, error=message, prompt_tokens=prompt_tokens) for _ in range(n)
    ]


class PromptEncoder:
    """Renders chat prompts to token ids with the model's tokenizer and chat template, within the context."""

    def __init__(
        self,
        model_path: str,
        *,
        template: str | None = None,
        template_kwargs: dict | None = None,
        use_chat_template: bool | None = None,
        max_length: int | None = None,
        truncation_strategy: str | None = None,
        trust_remote_code: bool = False,
        tokenizer: Any = None,
        response_prefix: str | None = None,
    ):
        self.tokenizer = (
            tokenizer if tokenizer is not None else hf.load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        )
        self.template = hf.load_template(template)
        self.template_kwargs = dict(template_kwargs or {})
        self.use_chat_template = use_chat_template is not False
        self.response_prefix = response_prefix or None
        self.context = hf.context_length(model_path, self.tokenizer)
        # the limit on prompt + answer: --max_length, else the model's context
        self.max_length = max_length or self.context
        if truncation_strategy not in (None, "delete", "left"):
            raise ConfigError(f"--truncation_strategy {truncation_strategy!r}: use delete or left")
        self.truncate_left = truncation_strategy == "left"
        self.longest_token = hf.longest_token_chars(self.tokenizer)

    def describe(self) -> dict[str, Any]:
        """What the manifest records of how prompts are made."""
        return {
            "max_length": self.max_length,
            "context_length": self.context,
            **({"template_kwargs": self.template_kwargs} if self.template_kwargs else {}),
            **({"use_chat_template": False} if not self.use_chat_template else {}),
            **({"truncation_strategy": "left"} if self.truncate_left else {}),
            **({"response_prefix": self.response_prefix} if self.response_prefix else {}),
        }

    def render(self, prompt: Prompt) -> str:
        """The prompt text under the chat template."""
        start = (self.response_prefix or "") + (prompt.prefix or "")  # the answer so far, continued
        if not self.use_chat_template:
            return hf.plain_prompt(prompt.messages, start)
        return hf.render_chat(
            self.tokenizer,
            prompt.messages,
            self.template,
            template_kwargs=self.template_kwargs,
            response_prefix=start,
            tools=prompt.tools,
        )

    def budget(self, prompt_tokens: int, params: SamplingParams) -> int:
        """The answer's token budget: ``max_new_tokens`` within the context, or the rest of the context."""
        room = self.max_length - prompt_tokens if self.max_length is not None else None
        if params.max_new_tokens is None:
            return max(1, room) if room is not None else FALLBACK_MAX_NEW_TOKENS
        return max(1, min(params.max_new_tokens, room)) if room is not None else params.max_new_tokens

    def fit(self, ids: list[int], params: SamplingParams) -> tuple[list[int], str | None]:
        """The ids that fit the context (cut from the left when asked), or why the prompt cannot run."""
        if self.max_length is None or len(ids) < self.max_length:
            return ids, None
        if self.truncate_left:
            keep = self.max_length - min(params.max_new_tokens or self.max_length // 4, self.max_length // 2)
            return ids[-keep:], None
        return ids, (
            f"prompt has {len(ids)} tokens; the limit is {self.max_length} (--max_length, or the model's "
            "context); --truncation_strategy left cuts its oldest tokens instead"
        )

    def encode(self, prompts: list[Prompt], params: SamplingParams) -> tuple[list[Encoded], list[list[Completion]]]:
        """The prompts a backend should run, and results pre-filled with errors for those it should not."""
        results: list[list[Completion]] = [[] for _ in prompts]
        work: list[Encoded] = []
        for slot, prompt in enumerate(prompts):
            try:
                text = self.render(prompt)
                if not self.truncate_left and hf.certainly_too_long(text, self.max_length, self.longest_token):
                    results[slot] = errors(
                        params.n,
                        f"prompt has {len(text)} characters, more than the "
                        f"{self.max_length}-token limit can hold (--max_length)",
                    )
                    continue
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            except Exception as e:  # a template error is this prompt's failure, not the batch's
                results[slot] = errors(params.n, f"cannot render the prompt: {type(e).__name__}: {e}")
                continue
            self._add(work, results, slot, text, list(ids), params)
        return work, results

    def encode_ids(
        self, prompts: list[list[int]], params: SamplingParams
    ) -> tuple[list[Encoded], list[list[Completion]]]:
        """Like :meth:`encode` for prompts already tokenized (no template): the server's raw completions."""
        results: list[list[Completion]] = [[] for _ in prompts]
        work: list[Encoded] = []
        for slot, ids in enumerate(prompts):
            self._add(work, results, slot, "", list(ids), params)
        return work, results

    def _add(
        self,
        work: list[Encoded],
        results: list[list[Completion]],
        slot: int,
        text: str,
        ids: list[int],
        params: SamplingParams,
    ) -> None:
        ids, error = self.fit(ids, params)
        if error is not None:
            results[slot] = errors(params.n, error, prompt_tokens=len(ids))
            return
        work.append(Encoded(slot, text, ids, self.budget(len(ids), params)))
