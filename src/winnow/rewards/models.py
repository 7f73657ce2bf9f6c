"""Reward models on transformers: classifier RMs (one label) and process reward models (PRMs).

``detect_reward_model(path)`` says what a checkpoint is ("classifier", "prm" or None for an
ordinary causal LM); ``load_reward_model(path)`` loads it as a :class:`RewardModel` whose blocking,
batched ``score_conversations`` turns conversations (ending with the assistant turn to score) into
Scores. The server imports this module too; torch and transformers are imported only inside.

PRMs are step-level: the assistant turn is split into steps (``"\\n\\n"`` by default), the model
family's step marker is put after each step, and one score is read at each marker:

- ``qwen_prm`` (Qwen2.5-Math-PRM): chat-rendered, ``<extra_0>`` after each step, a 2-class head
  on the base model; the score is softmax[1]. Loaded as ``AutoModel`` + the checkpoint's ``score``
  head, so no remote code is needed.
- ``math_shepherd``: a causal LM; ``question + " " + "\\n".join(step + " " + tag)``; at each tag the
  probability of the good token against the bad one (softmax over the two logits).
- ``token_classification``: ``AutoModelForTokenClassification`` over the chat-rendered
  conversation; read at the marker (if one is set) or at each step's last token; 2 labels use
  softmax[1], 1 label a sigmoid.

The style comes from an explicit ``"winnow_prm": {...}`` hint in config.json, from keyword
arguments, or from the architecture (``*ProcessRewardModel``, ``*ForTokenClassification``) and
name (``math-shepherd``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from winnow.errors import RewardError, require
from winnow.schema import Score

PRM_STYLES = ("qwen_prm", "math_shepherd", "token_classification")
QWEN_PRM_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
AGGREGATIONS = ("min", "last", "prod", "mean")


def aggregate_steps(steps: list[float] | None, how: str = "min") -> float | None:
    """One value from per-step scores; None when there are no steps."""
    if not steps:
        return None
    if how == "min":
        return min(steps)
    if how == "last":
        return steps[-1]
    if how == "prod":
        return math.prod(steps)
    if how == "mean":
        return sum(steps) / len(steps)
    raise RewardError(f"--prm_agg {how!r}: use one of {', '.join(AGGREGATIONS)}")


def split_steps(text: str, sep: str = "\n\n") -> list[str]:
    """The non-empty steps of a completion."""
    return [s.strip() for s in text.split(sep) if s.strip()]


class RewardModel(Protocol):
    """A loaded reward model: ``kind`` is "classifier" or "prm"."""

    kind: str
    name: str

    def score_conversations(self, conversations: list[list[dict]]) -> list[Score]: ...

    def describe(self) -> dict[str, Any]: ...


# ----------------------------------------------------------------------------- detection


def read_model_config(path: str) -> dict[str, Any]:
    """config.json of a local directory, or of a hub id via transformers (its cache when offline)."""
    local = Path(path) / "config.json"
    if local.is_file():
        return json.loads(local.read_text(encoding="utf-8"))
    try:
        transformers = require("transformers", "hf", "reward models")
        return transformers.AutoConfig.from_pretrained(path).to_dict()
    except Exception:  # not loadable here: the caller decides what that means
        return {}


@dataclass
class PRMFormat:
    """How a PRM family wants its input and where its step scores are read."""

    style: str
    step_tag: str | None = None
    good_token: str | None = None
    bad_token: str | None = None
    step_sep: str = "\n\n"
    chat: bool = True
    system: str | None = None


def prm_format(config: dict[str, Any], path: str = "", **overrides: Any) -> PRMFormat | None:
    """The PRM format of a checkpoint (hint, then architecture, then name), or None if not a PRM."""
    hint = dict(config.get("winnow_prm") or {})
    hint.update({k: v for k, v in overrides.items() if v is not None})
    archs = [str(a) for a in config.get("architectures") or []]
    style = hint.get("style")
    if style is None:
        if any("ProcessRewardModel" in a for a in archs):
            style = "qwen_prm"
        elif any(a.endswith("ForTokenClassification") for a in archs):
            style = "token_classification"
        elif "shepherd" in path.lower():
            style = "math_shepherd"
    if style is None:
        return None
    if style not in PRM_STYLES:
        raise RewardError(f"PRM style {style!r} is not one of {', '.join(PRM_STYLES)}")
    by_style: dict[str, dict[str, Any]] = {
        "qwen_prm": {"step_tag": "<extra_0>", "chat": True, "system": QWEN_PRM_SYSTEM},
        # the published Math-Shepherd checkpoint's tag and labels
        "math_shepherd": {"step_tag": "ки", "good_token": "+", "bad_token": "-", "chat": False},
        "token_classification": {"step_tag": None, "chat": True},
    }
    defaults = by_style[style]
    fields = {**defaults, **{k: v for k, v in hint.items() if k in PRMFormat.__dataclass_fields__}}
    if "format" in hint:
        fields["chat"] = hint["format"] == "chat"
    fields["style"] = style
    return PRMFormat(**fields)


def detect_reward_model(path: str) -> str | None:
    """ "classifier", "prm", or None for an ordinary causal LM (a policy)."""
    from winnow.engines.hf import resolve_model_path

    resolved = resolve_model_path(path, "reward model")
    config = read_model_config(resolved)
    if prm_format(config, path) is not None:
        return "prm"
    archs = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith("ForSequenceClassification") or a.endswith("RewardModel") for a in archs):
        return "classifier"
    return None


# ----------------------------------------------------------------------------- loading


def load_reward_model(path: str, **kwargs: Any) -> RewardModel:
    """Load a classifier RM or a PRM; ``kind=`` and PRM options (``style``, ``step_tag``, ...) override
    detection. Other options: device, torch_dtype, batch_size, prm_agg, max_length, template."""
    from winnow.engines.hf import resolve_model_path

    resolved = resolve_model_path(path, "reward model")
    config = read_model_config(resolved)
    kind = kwargs.pop("kind", None)
    prm_keys = ("style", "step_tag", "good_token", "bad_token", "step_sep", "chat", "system", "format")
    prm_opts = {k: kwargs.pop(k) for k in prm_keys if k in kwargs}
    fmt = prm_format(config, path, **prm_opts)
    if kind is None:
        kind = "prm" if fmt is not None else detect_reward_model(path)
    if kind == "prm":
        if fmt is None:
            raise RewardError(
                f"{path}: cannot tell which PRM family this is; set it with "
                '--reward_kwargs \'{"prm": {"style": "math_shepherd"}}\' '
                f"(one of {', '.join(PRM_STYLES)})"
            )
        return ProcessRewardModel(path, resolved, fmt, **kwargs)
    if kind == "classifier":
        return ClassifierRewardModel(path, resolved, **kwargs)
    raise RewardError(
        f"{path} is an ordinary causal LM, not a reward model (no sequence-classification head, "
        "no PRM architecture); for a Math-Shepherd-style PRM set its style with "
        '--reward_kwargs \'{"prm": {"style": "math_shepherd"}}\''
    )


class _HFModel:
    """Shared loading and batching for the transformers reward models."""

    def __init__(
        self,
        name: str,
        resolved: str,
        *,
        device: str = "auto",
        torch_dtype: str | None = "auto",
        batch_size: int = 8,
        max_length: int | None = None,
        template: str | None = None,
        trust_remote_code: bool = False,
        **unused: Any,
    ):
        from winnow.engines import hf

        self.torch = require("torch", "hf", "reward models")
        self.transformers = require("transformers", "hf", "reward models")
        self.name = name
        self.path = resolved
        self.device = hf.resolve_device(device)
        self.dtype = hf.resolve_dtype(torch_dtype, self.device)
        self.batch_size = max(1, int(batch_size))
        self.max_length = max_length
        self.template = hf.load_template(template)
        self.trust_remote_code = trust_remote_code
        self.tokenizer = hf.load_tokenizer(resolved, padding_side="right", trust_remote_code=trust_remote_code)
        self.unused_kwargs = sorted(unused)

    def _from_pretrained(self, auto_cls, **extra: Any):
        from winnow.engines import hf

        try:
            model = auto_cls.from_pretrained(self.path, **hf.model_kwargs(self.dtype, self.trust_remote_code, **extra))
        except (OSError, ValueError) as e:
            raise RewardError(f"cannot load reward model {self.name}: {e}") from None
        return model.to(self.device).eval()

    def render(self, messages: list[dict]) -> str:
        from winnow.engines.hf import render_chat

        return render_chat(self.tokenizer, messages, self.template, add_generation_prompt=False)

    def _batches(self, items: list[Any], lengths: list[int]):
        """Indices in batches of similar length (less padding)."""
        order = sorted(range(len(items)), key=lambda i: lengths[i], reverse=True)
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]

    def _pad(self, rows: list[list[int]]):
        torch = self.torch
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # right padding: positions read stay where they were
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)


class ClassifierRewardModel(_HFModel):
    """A sequence-classification reward model with one label: one scalar per conversation."""

    kind = "classifier"

    def __init__(self, name: str, resolved: str, **kwargs: Any):
        super().__init__(name, resolved, **kwargs)
        self.model = self._from_pretrained(self.transformers.AutoModelForSequenceClassification)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        labels = int(getattr(self.model.config, "num_labels", 1))
        if labels != 1:
            raise RewardError(f"{name}: a classifier reward model needs one label, this one has {labels}")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.name, "batch_size": self.batch_size, "device": self.device}

    def score_conversations(self, conversations: list[list[dict]]) -> list[Score]:
        """One scalar per conversation (the last assistant turn is what is judged)."""
        encoded = [self.tokenizer(self.render(c), add_special_tokens=False)["input_ids"] for c in conversations]
        if self.max_length:
            encoded = [ids[-self.max_length :] for ids in encoded]  # keep the answer, drop the oldest context
        out: list[Score | None] = [None] * len(conversations)
        for batch in self._batches(encoded, [len(e) for e in encoded]):
            ids, mask = self._pad([encoded[i] for i in batch])
            with self.torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()[:, 0].tolist()
            for i, value in zip(batch, logits, strict=True):
                out[i] = Score(value=float(value), tokens=len(encoded[i]))
        return out  # type: ignore[return-value]


class ProcessRewardModel(_HFModel):
    """A process reward model: one score per step, aggregated into the value."""

    kind = "prm"

    def __init__(self, name: str, resolved: str, fmt: PRMFormat, *, prm_agg: str = "min", **kwargs: Any):
        super().__init__(name, resolved, **kwargs)
        self.fmt = fmt
        self.agg = prm_agg
        aggregate_steps([1.0], prm_agg)  # validates the name now, not at the first batch
        self.head = None
        if fmt.step_tag is not None and fmt.step_tag not in self.tokenizer.get_vocab() and fmt.style == "qwen_prm":
            raise RewardError(f"{name}: the tokenizer has no {fmt.step_tag!r} token; is this a Qwen2.5-Math-PRM?")
        if fmt.style == "math_shepherd":
            self.model = self._from_pretrained(self.transformers.AutoModelForCausalLM)
            self.candidates = [self._token_id(fmt.good_token, "good_token"), self._token_id(fmt.bad_token, "bad_token")]
        elif fmt.style == "token_classification":
            self.model = self._from_pretrained(self.transformers.AutoModelForTokenClassification)
        else:
            self.model = self._from_pretrained(self.transformers.AutoModel)
            self.head = self._load_qwen_head()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "model": self.name,
            "format": asdict(self.fmt),
            "prm_agg": self.agg,
            "batch_size": self.batch_size,
            "device": self.device,
        }

    def _token_id(self, token: str | None, what: str) -> int:
        if not token:
            raise RewardError(f"{self.name}: a math_shepherd PRM needs {what} (e.g. '+' / '-')")
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if not ids:
            raise RewardError(f"{self.name}: {what} {token!r} encodes to no token")
        return ids[-1]

    def _load_qwen_head(self) -> Any:
        """The ``score`` head of a Qwen2.5-Math-PRM checkpoint (Linear-ReLU-Linear, 2 classes)."""
        torch = self.torch
        weights = _read_tensors(Path(self.path), "score.")
        if not weights:
            raise RewardError(f"{self.name}: no 'score.*' head weights in the checkpoint; not a Qwen2.5-Math-PRM")
        linears = sorted({int(k.split(".")[1]) for k in weights if k.count(".") == 2})
        layers: list[Any] = []
        if linears:
            for n, idx in enumerate(linears):
                w = weights[f"score.{idx}.weight"]
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=f"score.{idx}.bias" in weights)
                lin.weight.data.copy_(w)
                if lin.bias is not None:
                    lin.bias.data.copy_(weights[f"score.{idx}.bias"])
                layers.append(lin)
                if n < len(linears) - 1:
                    layers.append(torch.nn.ReLU())
        else:
            w = weights["score.weight"]
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias="score.bias" in weights)
            lin.weight.data.copy_(w)
            if lin.bias is not None:
                lin.bias.data.copy_(weights["score.bias"])
            layers.append(lin)
        dtype = next(self.model.parameters()).dtype
        return torch.nn.Sequential(*layers).to(self.device, dtype).eval()

    # -------------------------------------------------------------- input

    def _tagged(self, steps: list[str]) -> tuple[str, list[tuple[int, int]]]:
        """The assistant text with markers, and the (start, end) character span to read for each step."""
        fmt = self.fmt
        tag = fmt.step_tag
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        pos = 0
        for k, step in enumerate(steps):
            if fmt.style == "math_shepherd":
                piece = f"{step} {tag}" + ("\n" if k < len(steps) - 1 else "")
                at = pos + len(step) + 1
                spans.append((at, at + len(tag or "")))
            elif tag:
                piece = step + tag
                spans.append((pos + len(step), pos + len(step) + len(tag)))
            else:
                piece = step + (fmt.step_sep if k < len(steps) - 1 else "")
                spans.append((pos, pos + len(step)))
            parts.append(piece)
            pos += len(piece)
        return "".join(parts), spans

    def _encode(self, conversation: list[dict]) -> tuple[list[int], list[int]]:
        """Token ids of one conversation and the positions to read, one per step."""
        if not conversation or conversation[-1].get("role") != "assistant":
            raise RewardError("a conversation to score must end with the assistant turn")
        steps = split_steps(str(conversation[-1].get("content") or ""), self.fmt.step_sep)
        if not steps:
            return [], []
        content, spans = self._tagged(steps)
        head = conversation[:-1]
        if self.fmt.chat:
            if self.fmt.system and not (head and head[0].get("role") == "system"):
                head = [{"role": "system", "content": self.fmt.system}, *head]
            rendered = self.render([*head, {"role": "assistant", "content": content}])
            start = rendered.rfind(content)
            if start < 0:
                raise RewardError(f"{self.name}: the chat template changed the assistant text; cannot place steps")
        else:
            question = next((m["content"] for m in reversed(head) if m.get("role") == "user"), "")
            rendered = f"{question} {content}"
            start = len(question) + 1
        enc = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        positions = []
        for s, e in spans:
            # the token that covers the span's last character (the marker, or the step's end)
            target = start + e - 1
            idx = next((t for t, (a, b) in enumerate(offsets) if a <= target < b), None)
            if idx is None:
                idx = next((t for t, (a, b) in enumerate(offsets) if b > start + s), len(ids) - 1)
            positions.append(idx)
        if self.max_length and len(ids) > self.max_length:
            cut = len(ids) - self.max_length  # left-truncate: keep the steps
            ids = ids[cut:]
            positions = [p - cut for p in positions if p >= cut]
        return ids, positions

    # -------------------------------------------------------------- scoring

    def score_conversations(self, conversations: list[list[dict]]) -> list[Score]:
        """Per-step scores for each conversation's last assistant turn, and their aggregate."""
        torch = self.torch
        encoded = [self._encode(c) for c in conversations]
        out: list[Score] = [Score(value=None, steps=[]) for _ in conversations]
        todo = [i for i, (ids, pos) in enumerate(encoded) if ids and pos]
        for batch in self._batches(todo, [len(encoded[i][0]) for i in todo]):
            rows = [todo[b] for b in batch]
            ids, mask = self._pad([encoded[i][0] for i in rows])
            with torch.inference_mode():
                probs = self._step_probs(ids, mask)
            for r, i in enumerate(rows):
                steps = [float(probs[r, p]) for p in encoded[i][1]]
                out[i] = Score(value=aggregate_steps(steps, self.agg), steps=steps, tokens=len(encoded[i][0]))
        return out

    def _step_probs(self, ids, mask):
        """(batch, seq) probability that the step ending at each position is good."""
        torch = self.torch
        if self.fmt.style == "math_shepherd":
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()[:, :, self.candidates]
            return torch.softmax(logits, dim=-1)[:, :, 0].cpu()
        if self.fmt.style == "token_classification":
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
        else:
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = self.head(hidden).float()
        if logits.shape[-1] == 1:
            return torch.sigmoid(logits[:, :, 0]).cpu()
        return torch.softmax(logits, dim=-1)[:, :, 1].cpu()


def _read_tensors(path: Path, prefix: str) -> dict[str, Any]:
    """The tensors whose names start with ``prefix`` from a local or cached safetensors checkpoint."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files and not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(str(path), allow_patterns=["*.safetensors", "*.json"]))
            files = sorted(local.glob("*.safetensors"))
        except Exception as e:  # offline, no cache, ...
            raise RewardError(f"{path}: cannot read the checkpoint's head weights ({e})") from None
    out: dict[str, Any] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 - safe_open is not a dict
                if key.startswith(prefix):
                    out[key] = st.get_tensor(key)
    return out
