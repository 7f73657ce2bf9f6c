"""Model loading helpers (engines/hf.py): LoRA adapters, and the tokenizer bounds the server uses."""

from __future__ import annotations

import json

from tests.support.commands import run_winnow
from tests.support.files import read_jsonl
from tests.support.sampling import tiny_run


def test_lora_adapters_are_applied(tmp_path, tiny_model, sums_jsonl):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)  # an adapter that really changes the model
    lora.save_pretrained(str(tmp_path / "adapter"))
    greedy = {"temperature": 0.0, "max_new_tokens": 8}
    _, plain = tiny_run(tmp_path, tiny_model, sums_jsonl, **greedy)
    summary, adapted = tiny_run(tmp_path, tiny_model, sums_jsonl, adapters=[str(tmp_path / "adapter")], **greedy)
    assert [r["completions"][0]["text"] for r in plain] != [r["completions"][0]["text"] for r in adapted]
    manifest = json.loads((tmp_path / "out" / "o.manifest.json").read_text())
    assert manifest["engine"]["adapters"] == [str(tmp_path / "adapter")]
    # swift's training output holds args.json: --adapters alone finds the base model (--load_args); its
    # template (qwen: the tokenizer's own here) gives the same prompts
    (tmp_path / "adapter" / "args.json").write_text(json.dumps({"model": str(tiny_model), "template": "qwen"}))
    proc = run_winnow(
        "sample",
        "--adapters",
        str(tmp_path / "adapter"),
        "--dataset",
        str(sums_jsonl),
        "--num_return_sequences",
        "1",
        "--temperature",
        "0",
        "--max_new_tokens",
        "8",
        "--output_dir",
        str(tmp_path / "o2"),
        "--output_file",
        "o.jsonl",
        "--output_format",
        "raw",
        "--progress",
        "false",
        check=True,
    )
    assert f"model={tiny_model}" in proc.stderr and "template=qwen" in proc.stderr
    assert [r["completions"][0]["text"] for r in read_jsonl(tmp_path / "o2" / "o.jsonl")] == [
        r["completions"][0]["text"] for r in adapted
    ]


def test_certainly_too_long_is_sound_for_the_tiny_tokenizer(tiny_model):
    from winnow.engines import hf

    tok = hf.load_tokenizer(str(tiny_model))
    chars = hf.longest_token_chars(tok)
    assert json.loads(tok.backend_tokenizer.normalizer.__getstate__())["type"] == "NFC"  # Qwen2's tokenizer
    # its longest token is <|endoftext|>; NFC may fold up to 4 characters of non-ASCII text into one
    assert chars == hf.TokenChars(ascii=len("<|endoftext|>"), other=4 * len("<|endoftext|>"))
    texts = ["hello world " * 50, "<|im_start|>" * 40, "aaaa" * 200, "数学" * 300, "e\u0301" * 300, " " * 700, "x"]
    for text in texts:
        tokens = len(tok(text, add_special_tokens=False)["input_ids"])
        for limit in (1, 10, 50, 100, 500):
            if hf.certainly_too_long(text, limit, chars):
                assert tokens > limit, (text[:20], limit, tokens)
    assert hf.certainly_too_long("x" * (100 * 13 + 1), 100, chars)
    assert not hf.certainly_too_long("x" * (100 * 13), 100, chars)
    assert not hf.certainly_too_long("é" * (100 * 13 + 1), 100, chars)  # non-ASCII: 52 characters a token
    assert not hf.certainly_too_long("x" * 10**6, 1, None)


def test_longest_token_chars_knows_which_tokenizers_it_cannot_bound():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from winnow.engines import hf

    def fast(model, normalizer=None, pre_tokenizer=None):
        tok = Tokenizer(model)
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizer
        return PreTrainedTokenizerFast(tokenizer_object=tok)

    vocab = {"a": 0, "b": 1, "ab": 2, "abab": 3, "[UNK]": 4}
    bpe = models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "ab")])
    assert hf.longest_token_chars(fast(bpe, pre_tokenizer=pre_tokenizers.ByteLevel())) == hf.TokenChars(5, 5)
    # NFC may fold up to 4 characters of non-ASCII text into one before the tokens are found
    assert hf.longest_token_chars(
        fast(models.BPE(vocab=vocab, merges=[("a", "b"), ("ab", "ab")]), normalizers.NFC())
    ) == hf.TokenChars(5, 20)
    lowered = normalizers.Sequence([normalizers.Replace("  ", " "), normalizers.Lowercase()])
    assert hf.longest_token_chars(fast(models.BPE(vocab=vocab, merges=[]), lowered)) == hf.TokenChars(10, 10)
    # a long word is one [UNK] for WordPiece; stripping accents and dropping whitespace shrink text without bound
    assert hf.longest_token_chars(fast(models.WordPiece(vocab=vocab, unk_token="[UNK]"))) is None
    assert hf.longest_token_chars(fast(models.BPE(vocab=vocab, merges=[]), normalizers.StripAccents())) is None
    assert hf.longest_token_chars(fast(models.BPE(vocab=vocab, merges=[]), None, pre_tokenizers.Whitespace())) is None
    assert hf.longest_token_chars(fast(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]", fuse_unk=True))) is None
