"""Build tiny chat models offline: a locally trained byte-level BPE tokenizer with a ChatML
template, and a Llama- or Qwen2-architecture causal LM with random (seeded) weights.

Used by the test fixtures and as the bundled default model before trained demo weights exist.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

CHATML = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = (
    "the of and to a in is that it for on with as was at by be this are from or have an they which one you "
    "all we can has there if more when will would who so no what up out about into than them only other new "
    "some could time two may then do first any now like over even most made after also did many before must "
    "step answer question sum product difference plus minus times divided equals result therefore compute "
    "value total problem solve explain first second third so we get add subtract multiply divide number"
).split()


def corpus(seed: int, lines: int = 20000) -> list[str]:
    """Synthetic text with arithmetic and chat markup, enough to train a small BPE vocabulary."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op = rng.choice("+-*")
        if i % 3 == 0:
            out.append(f"What is {a} {op} {b}? {a} {op} {b} = {eval(f'{a}{op}{b}')}. The answer is \\boxed{{{a}}}.")
        elif i % 3 == 1:
            out.append(" ".join(rng.choices(WORDS, k=rng.randint(5, 18))).capitalize() + rng.choice(".?!"))
        else:
            out.append(f"Step {rng.randint(1, 4)}: {a} {op} {b} = {eval(f'{a}{op}{b}')}\n\n")
    return out


def build_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 2048, seed: int = 0, extra_special=()):
    """Train a byte-level BPE tokenizer with the ChatML template and save it to ``out_dir``."""
    from tokenizers import pre_tokenizers

    return train_bpe(
        out_dir,
        corpus(seed),
        pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        vocab_size=vocab_size,
        extra_special=extra_special,
        chat_template=CHATML,
        max_length=4096,
    )


def train_bpe(
    out_dir: str | os.PathLike | None,
    texts,
    *,
    pre_tokenizer,
    vocab_size: int,
    extra_special,
    chat_template: str,
    max_length: int,
    normalizer=None,
):
    """A byte-level BPE tokenizer trained on ``texts`` (ChatML's special tokens first, ``<|im_end|>`` its
    end, ``<|endoftext|>`` its padding, on the left), saved to ``out_dir`` unless it is None."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    specials = SPECIAL + [t for t in extra_special if t not in SPECIAL]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=specials[1:],
        padding_side="left",
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = chat_template
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fast.save_pretrained(str(out_dir))
    return fast


def model_config(
    arch: str,
    tok,
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    inter: int,
    max_positions: int = 2048,
    **extra,
):
    """A Llama or Qwen2 config sized for ``tok``."""
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.convert_tokens_to_ids("<|endoftext|>")
    return cls(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        **extra,
    )


SIZES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128),
    # head_dim 32, the smallest head size vLLM's CPU attention takes (tiny's is 16)
    "tiny-h32": dict(hidden=64, layers=2, heads=2, kv_heads=1, inter=128),
    "small": dict(hidden=512, layers=8, heads=8, kv_heads=4, inter=1536),
}


def build_atomically(out_dir: str | os.PathLike, build) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``out_dir`` in one rename, so a reader never
    sees a half-written model (an interrupted build leaves the old one, or nothing)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        build(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_generation_config(cfg, path: str | os.PathLike, **sampling) -> None:
    """``generation_config.json`` for a model of config ``cfg``: its special tokens, sampling on (and
    ``sampling``'s defaults)."""
    from transformers import GenerationConfig

    GenerationConfig(
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        do_sample=True,
        **sampling,
    ).save_pretrained(str(path))


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    arch: str = "qwen2",
    size: str = "tiny",
    seed: int = 0,
    vocab_size: int = 2048,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """A random-weight causal LM with a trained tokenizer and chat template, saved atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        if tokenizer_dir:
            tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            tok.save_pretrained(str(tmp))
        else:
            tok = build_tokenizer(tmp, vocab_size=vocab_size, seed=seed)
        torch.manual_seed(seed)
        cfg = model_config(arch, tok, **SIZES[size])
        model = AutoModelForCausalLM.from_config(cfg)
        model.save_pretrained(str(tmp))
        save_generation_config(cfg, tmp)
        (tmp / "winnow_model.json").write_text(json.dumps({"arch": arch, "size": size, "seed": seed}))

    return build_atomically(out_dir, build)


# ----------------------------------------------------------------------------- the arithmetic demo world

CHATML_PLAIN = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


QWEN2_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_digit_tokenizer(
    out_dir: str | os.PathLike | None, texts, *, vocab_size: int = 384, extra_special=("<step>",)
):
    """A byte-level BPE tokenizer trained on ``texts`` with Qwen2's normalizer and pre-tokenizer (so
    ``Qwen2Tokenizer``, which transformers 5 builds for a qwen2 config, tokenizes identically; it keeps
    every digit its own token: arithmetic a tiny model can learn) and a ChatML template that adds no
    default system prompt."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    return train_bpe(
        out_dir,
        texts,
        normalizer=normalizers.NFC(),
        pre_tokenizer=pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        vocab_size=vocab_size,
        extra_special=extra_special,
        chat_template=CHATML_PLAIN,
        max_length=512,
    )
