"""Build tiny reward models offline (random, seeded weights) for the tests.

- :func:`build_tiny_classifier_rm`: an ``AutoModelForSequenceClassification`` with one label.
- :func:`build_tiny_prm`: a process reward model in each supported style: ``math_shepherd`` (a
  causal LM with a ``<step>`` tag and '+'/'-' tokens, described by a ``winnow_prm`` hint in
  config.json), ``qwen_prm`` (Qwen2.5-Math-PRM layout: base model weights under ``model.``, a
  ``score`` Linear-ReLU-Linear 2-class head, ``<extra_0>`` in the tokenizer, architecture
  ``Qwen2ForProcessRewardModel``) and ``token_classification``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from winnow.demo.build import SIZES, build_atomically, model_config

PRM_TAGS = {"math_shepherd": "<step>", "qwen_prm": "<extra_0>", "token_classification": None}


def _tokenizer(tokenizer_dir, extra: list[str]):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    missing = [t for t in extra if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    return tok


def build_tiny_classifier_rm(
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    *,
    arch: str = "qwen2",
    seed: int = 0,
    size: str = "tiny",
) -> Path:
    """A one-label sequence-classification reward model (random weights) with the given tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification

    def build(tmp: Path) -> None:
        tok = _tokenizer(tokenizer_dir, [])
        tok.save_pretrained(str(tmp))
        torch.manual_seed(seed)
        cfg = model_config(arch, tok, **SIZES[size], num_labels=1)
        AutoModelForSequenceClassification.from_config(cfg).save_pretrained(str(tmp))

    return build_atomically(out_dir, build)


def build_tiny_prm(
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    *,
    style: str = "math_shepherd",
    seed: int = 0,
    size: str = "tiny",
) -> Path:
    """A process reward model of ``style`` (math_shepherd, qwen_prm, token_classification)."""
    import torch
    import transformers

    if style not in PRM_TAGS:
        raise ValueError(f"unknown PRM style {style!r}; use one of {', '.join(PRM_TAGS)}")
    tag = PRM_TAGS[style]

    def build(tmp: Path) -> None:
        tok = _tokenizer(tokenizer_dir, [tag] if tag else [])
        tok.save_pretrained(str(tmp))
        torch.manual_seed(seed)
        if style == "math_shepherd":
            cfg = model_config("qwen2", tok, **SIZES[size])
            transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp))
            hint = {"style": "math_shepherd", "step_tag": tag, "good_token": "+", "bad_token": "-"}
            _add_to_config(tmp, {"winnow_prm": hint})
        elif style == "token_classification":
            cfg = model_config("qwen2", tok, **SIZES[size], num_labels=2)
            transformers.AutoModelForTokenClassification.from_config(cfg).save_pretrained(str(tmp))
        else:
            _save_qwen_prm(tmp, model_config("qwen2", tok, **SIZES[size], num_labels=2))

    return build_atomically(out_dir, build)


def _save_qwen_prm(tmp: Path, cfg) -> None:
    """The Qwen2.5-Math-PRM checkpoint layout, without its remote code."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Model

    base = Qwen2Model(cfg)
    hidden = cfg.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))
    tensors = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()}
    tensors.update({f"score.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg.architectures = ["Qwen2ForProcessRewardModel"]
    cfg.save_pretrained(str(tmp))


def _add_to_config(model_dir: Path, extra: dict) -> None:
    path = model_dir / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(extra)
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
