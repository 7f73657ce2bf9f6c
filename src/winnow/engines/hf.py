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
    """``--template``: a swift template name, a file holding a Jinja chat template, or the Jinja text."""
    from winnow import templates

    return templates.resolve(template)


def render_chat(tokenizer, messages: list[dict], template: str | None = None, add_generation_prompt: bool = True,
                template_kwargs: dict | None = None, response_prefix: str | None = None,
                tools: list[dict] | None = None) -> str:
    """The prompt text for ``messages`` under the tokenizer's (or the given) chat template; ``template_kwargs``
    are the template's variables (``enable_thinking``...), ``response_prefix`` the text the answer starts with,
    ``tools`` the functions the model may call (templates that support tools list them)."""
    chat_template = template or getattr(tokenizer, "chat_template", None)
    if not chat_template:
        raise EngineError("the tokenizer has no chat template; pass one with --template NAME_FILE_OR_JINJA")
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template,
        **({"tools": tools} if tools else {}), **(template_kwargs or {}))
    return text + (response_prefix or "")


def plain_prompt(messages: list[dict], response_prefix: str | None = None) -> str:
    """``--use_chat_template false``: the conversation's text, turns separated by blank lines."""
    return "\n\n".join(str(m.get("content") or "") for m in messages) + (response_prefix or "")


def read_json(path: Path) -> dict:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx",
                "max_seq_len", "model_max_length")


def context_length(model_path: str, tokenizer: Any = None) -> int | None:
    """The model's context length in tokens, from its config (or its tokenizer's model_max_length); None
    when neither says."""
    config = read_json(Path(model_path) / "config.json")
    sources = [config, config.get("text_config") or {}]
    for source in sources:
        for key in CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and 0 < value < 10**8:
                return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**8 else None


GENERATION_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def generation_defaults(model_path: str) -> dict[str, Any]:
    """The sampling settings the model's ``generation_config.json`` gives (the ones a run takes when the
    user sets none, as transformers and vLLM do)."""
    config = read_json(Path(model_path) / "generation_config.json")
    return {k: config[k] for k in GENERATION_KEYS if isinstance(config.get(k), (int, float))
            and not isinstance(config.get(k), bool)}


def longest_token_chars(tokenizer: Any) -> int:
    """The longest token of the vocabulary, in characters: a text of ``c`` characters is at least
    ``c / longest`` tokens, which proves a prompt too long without tokenizing it."""
    try:
        vocab = tokenizer.get_vocab()
    except Exception:  # a tokenizer without a vocabulary listing: no bound
        return 1 << 30
    longest = max((len(t) for t in vocab), default=1)
    return max(1, longest)


def certainly_too_long(text: str, limit_tokens: int | None, longest: int) -> bool:
    """Whether ``text`` has more than ``limit_tokens`` tokens for sure, without tokenizing it."""
    return limit_tokens is not None and len(text) > limit_tokens * longest


def quantization_config(options: dict[str, Any], device: str) -> Any:
    """A transformers quantization config from swift's flags (``method`` bnb or hqq, ``bits``, bnb_4bit_*)."""
    transformers = require("transformers", "hf", "quantized models")
    method, bits = options.get("method"), str(options.get("bits") or "")
    if method == "bnb":
        require("bitsandbytes", "quant", "--quant_method bnb")
        if bits not in ("4", "8"):
            raise ConfigError(f"--quant_method bnb takes --quant_bits 4 or 8, got {bits or 'none'}")
        if bits == "8":
            return transformers.BitsAndBytesConfig(load_in_8bit=True)
        compute = options.get("bnb_4bit_compute_dtype")
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=options.get("bnb_4bit_quant_type") or "nf4",
            bnb_4bit_use_double_quant=bool(options.get("bnb_4bit_use_double_quant", True)),
            bnb_4bit_compute_dtype=resolve_dtype(compute, device) if compute else None,
            bnb_4bit_quant_storage=options.get("bnb_4bit_quant_storage"))
    if method == "hqq":
        require("hqq", "quant", "--quant_method hqq")
        if not bits:
            raise ConfigError("--quant_method hqq needs --quant_bits")
        return transformers.HqqConfig(nbits=int(bits), axis=options.get("hqq_axis") or 0)
    raise ConfigError(f"--quant_method {method}: winnow quantizes at load with bnb or hqq only; for {method}, load a "
                      "model quantized already")


def apply_adapters(model: Any, adapters: list[str]) -> Any:
    """``model`` with each LoRA adapter merged in, in order (the merged model samples at full speed)."""
    peft = require("peft", "hf", "--adapters")
    for path in adapters:
        try:
            model = peft.PeftModel.from_pretrained(model, path).merge_and_unload()
        except (OSError, ValueError) as e:
            raise EngineError(f"--adapters {path}: cannot apply it to the model: {e}") from None
    return model


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
                 "sglang", "lmdeploy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out
