#!/usr/bin/env python
"""Constrained JSON decoding on the transformers engine: llguidance (winnow's choice) against xgrammar and
outlines, on this machine's CPU, with torch and transformers as installed.

Workload: a tiny random-weight Qwen2 model on a 32k-token BPE vocabulary (trained here on the Python
standard library's source, so the vocabulary is as large as a real model's without a download),
8 prompts x 4 samples, up to 96 new tokens, temperature 1, one ``generate`` call with the library's
logits processor. The schema bounds every field (``maximum``, ``enum``, ``maxLength``), so a library
that honours it ends every answer well within the limit. Printed per library: import, tokenizer
setup and schema compile times, the generate call (second run, warm), answers valid against the
schema (jsonschema), and one answer.

    .venv/bin/python benchmarks/constrained_decoding.py [--vocab 32000]

xgrammar and outlines are optional here (pip install xgrammar / outlines to compare); a library
that is not installed is reported as such.
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "integer", "minimum": 0, "maximum": 999},
        "confidence": {"enum": ["low", "high"]},
        "note": {"type": "string", "maxLength": 20},
    },
    "required": ["answer", "confidence", "note"],
    "additionalProperties": False,
}
LIBRARIES = ("none", "llguidance", "xgrammar", "outlines")


def build_model(folder: Path, vocab: int) -> Path:
    """A tiny random model on a ``vocab``-token BPE trained on the standard library's source."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from winnow.demo.build import CHATML, SPECIAL, build_tiny_model

    def lines():
        for file in glob.glob(sys.base_prefix + "/lib/python3*/**/*.py", recursive=True):
            try:
                yield from Path(file).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError):
                continue

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        lines(),
        trainers.BpeTrainer(
            vocab_size=vocab,
            special_tokens=SPECIAL,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL[1:],
        padding_side="left",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(folder / "tokenizer"))
    return build_tiny_model(folder / "model", tokenizer_dir=folder / "tokenizer")


def measure(library: str, model_dir: str) -> dict:
    """One library's figures (run in a process of its own, so import times are honest)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    eos = [model.generation_config.eos_token_id]
    texts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"What is {i} + {i + 3}?"}], tokenize=False, add_generation_prompt=True
        )
        for i in range(8)
    ]
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    out: dict = {"library": library, "vocab": vocab}
    start = time.perf_counter()
    if library == "none":

        def make():
            return []
    elif library == "llguidance":
        from winnow.engines import constrained
        from winnow.structured import load_response_format

        out["import_s"] = time.perf_counter() - start
        start = time.perf_counter()
        constrained._tokenizer(tok, vocab, tuple(eos))
        out["tokenizer_s"] = time.perf_counter() - start
        rf = load_response_format(SCHEMA)
        start = time.perf_counter()
        constrained.logits_processor(tok, vocab, eos, rf)
        out["compile_s"] = time.perf_counter() - start

        def make():
            return [constrained.logits_processor(tok, vocab, eos, rf)]
    elif library == "xgrammar":
        import xgrammar
        import xgrammar.contrib.hf

        out["import_s"] = time.perf_counter() - start
        start = time.perf_counter()
        compiler = xgrammar.GrammarCompiler(
            xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=eos)
        )
        out["tokenizer_s"] = time.perf_counter() - start
        start = time.perf_counter()
        grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        out["compile_s"] = time.perf_counter() - start

        def make():
            return [xgrammar.contrib.hf.LogitsProcessor(grammar)]
    else:
        import outlines
        from outlines.backends import get_json_schema_logits_processor

        out["import_s"] = time.perf_counter() - start
        start = time.perf_counter()
        wrapped = outlines.from_transformers(model, tok)
        out["tokenizer_s"] = time.perf_counter() - start
        start = time.perf_counter()
        processor = get_json_schema_logits_processor(
            "outlines_core", wrapped, json.dumps(SCHEMA), whitespace_pattern=""
        )
        out["compile_s"] = time.perf_counter() - start

        def make():
            processor.reset()
            return [processor]

    def generate() -> list[str]:
        torch.manual_seed(0)
        with torch.inference_mode():
            ids = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                num_return_sequences=4,
                max_new_tokens=96,
                logits_processor=make(),
                pad_token_id=tok.pad_token_id,
                eos_token_id=eos,
            )
        return [tok.decode(row[enc.input_ids.shape[1] :], skip_special_tokens=True) for row in ids]

    generate()  # warm up
    start = time.perf_counter()
    answers = generate()
    out["generate_s"] = time.perf_counter() - start
    import jsonschema

    valid = 0
    for text in answers:
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    out["valid"] = f"{valid}/{len(answers)}"
    out["example"] = answers[0][:70]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one library in this process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.model)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(Path(tmp), args.vocab)
        for library in LIBRARIES:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", library, "--model", str(model)], capture_output=True, text=True
            )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            if lines:
                print(lines[-1])
            else:
                reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
                print(json.dumps({"library": library, "not measured": reason[:200]}))


if __name__ == "__main__":
    main()
