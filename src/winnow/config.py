"""Every option once, typed and documented; the CLI, YAML and Python API are derived from here.

Flags follow ms-swift's conventions: snake_case names (kebab-case accepted too), lists as
space-separated values, dicts as JSON, booleans as ``true``/``false``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from winnow.engines.hf import TORCH_DTYPES
from winnow.errors import ConfigError
from winnow.registry import REGISTRY


def opt(
    default: Any = None,
    help: str = "",
    *,
    choices: tuple | None = None,
    factory=None,
    cli: bool = True,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    positional: bool = False,
    swift: str | None = None,
    registry: str | None = None,
    extra_choices: tuple = (),
    fingerprint: bool = False,
):
    """A config field with its help text, choices and range recorded once, for --help, YAML, docs and
    the checks every entry point (CLI, YAML, Python) goes through.

    ``swift`` marks a field that exists for ms-swift compatibility only: ``"noop"`` (a training or
    preprocessing setting with no effect on sampling: accepted, and a run that sets it says so in
    one warning line) or ``"unsupported"`` (it would change the samples and winnow does not do it:
    any value but the default is an error naming it). ``registry`` names the registry kind whose names
    (plus ``extra_choices``) are the choices: plugins add to them. ``fingerprint`` marks an option that decides
    which rows a position holds or what is written for it: a resumed run must share it."""
    meta = {
        "help": help,
        "choices": choices,
        "cli": cli,
        "ge": ge,
        "gt": gt,
        "le": le,
        "positional": positional,
        "swift": swift,
        "registry": registry,
        "extra_choices": extra_choices,
        "fingerprint": fingerprint,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def fingerprint_fields(cls) -> list[str]:
    """The options a resumed run must share with the run it continues (declared with ``fingerprint=True``)."""
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("fingerprint")]


def check_fields(config) -> None:
    """Every field's declared choices and range, checked; the error names the flag and what it takes.
    A list option given one string from Python (``dataset="d.jsonl"``, as swift takes it) becomes a list."""
    hints = _field_types(type(config))
    for f in dataclasses.fields(config):
        if isinstance(getattr(config, f.name), (str, tuple)) and typing.get_origin(_unwrap(hints[f.name])[0]) is list:
            value = getattr(config, f.name)
            setattr(config, f.name, [value] if isinstance(value, str) else list(value))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        meta = f.metadata
        for item in value if isinstance(value, list) else [value]:
            if item is None or isinstance(item, bool):
                continue
            flag = (
                f"--{f.name} {item!r}"
                if isinstance(item, str)
                else f"--{f.name} {item:g}"
                if isinstance(item, float)
                else f"--{f.name} {item}"
            )
            choices = meta.get("choices")
            if meta.get("registry"):
                choices = (*REGISTRY.names(meta["registry"]), *meta.get("extra_choices", ()))
                if item not in choices and getattr(config, "external_plugins", None):
                    continue  # a plugin file may register it; checked when the run resolves the name
            if choices and item not in choices:
                raise ConfigError(f"{flag}: not one of {', '.join(map(str, choices))}")
            if not isinstance(item, (int, float)):
                continue
            if meta.get("ge") is not None and item < meta["ge"]:
                raise ConfigError(f"{flag}: must be at least {meta['ge']:g}")
            if meta.get("gt") is not None and item <= meta["gt"]:
                raise ConfigError(f"{flag}: must be greater than {meta['gt']:g}")
            if meta.get("le") is not None and item > meta["le"]:
                raise ConfigError(f"{flag}: must be at most {meta['le']:g}")


@dataclass
class SampleConfig:
    """Options of ``winnow sample`` (the same names as ``swift sample``)."""

    # --- model and engine
    model: str | None = opt(
        None, "Model: a local directory, a hub id, or (client engine) a served model name.", fingerprint=True
    )
    model_type: str | None = opt(None, "Accepted for swift compatibility; the model's own config decides.")
    model_revision: str | None = opt(None, "Hub revision (branch, tag or commit) of --model.")
    use_hf: bool = opt(
        False,
        "Hub ids are read from the Hugging Face hub (true) or ModelScope (false, swift's "
        "default; USE_HF=1 also selects Hugging Face).",
    )
    hub_token: str | None = opt(None, "Token for private hub models and datasets.")
    adapters: list[str] = opt(
        None,
        "LoRA adapters (dirs or hub ids) applied to --model (transformers: merged at load; vllm: LoRA requests).",
        factory=list,
        fingerprint=True,
    )
    load_args: bool = opt(
        True,
        "When --model or an adapter is a swift training output with args.json, take the "
        "base model, template and system from it (unless given).",
    )
    template: str | None = opt(
        None,
        "Chat template: a swift template name (qwen, chatml, llama3, deepseek, ...), a Jinja string, or a file "
        "holding one. Default: the tokenizer's template.",
    )
    system: str | None = opt(
        None,
        "System prompt (text, or a file holding it): replaces the dataset's system message "
        "or comes first, as in swift.",
        fingerprint=True,
    )
    enable_thinking: bool | None = opt(
        None, "Passed to the chat template as enable_thinking (Qwen3 and friends), and to APIs as chat_template_kwargs."
    )
    chat_template_kwargs: dict = opt(
        None, "More variables for the chat template as JSON, e.g. '{\"enable_thinking\": false}'.", factory=dict
    )
    response_prefix: str | None = opt(
        None,
        "Text the answer starts with (the model continues it; it is part of the written answer). Local engines only.",
        fingerprint=True,
    )
    use_chat_template: bool | None = opt(None, "false: prompts are the conversation's text without a chat template.")
    attn_impl: str | None = opt(
        None, "Attention implementation of the transformers engine (sdpa, eager, flash_attention_2, ...)."
    )
    device_map: str | None = opt(
        None, "transformers device_map (auto, balanced, a JSON map) for models over several GPUs."
    )
    max_memory: dict = opt(None, "transformers max_memory per device as JSON, with --device_map.", factory=dict)
    max_model_len: int | None = opt(
        None, "Context length of the engine (vLLM's max_model_len); also the default --max_length.", ge=1
    )
    quant_method: str | None = opt(
        None, "Quantize --model at load (transformers): bnb or hqq.", choices=("bnb", "hqq", "eetq", "quanto", "fp8")
    )
    quant_bits: str | None = opt(
        None, "Bits of --quant_method (bnb: 4 or 8).", choices=("1", "2", "3", "4", "8", "float8")
    )
    bnb_4bit_compute_dtype: str | None = opt(
        None, "bitsandbytes 4-bit compute dtype.", choices=("float16", "bfloat16", "float32")
    )
    bnb_4bit_quant_type: str = opt("nf4", "bitsandbytes 4-bit quant type.", choices=("fp4", "nf4"))
    bnb_4bit_use_double_quant: bool = opt(True, "bitsandbytes double quantization.")
    bnb_4bit_quant_storage: str | None = opt(None, "bitsandbytes 4-bit storage dtype.")
    hqq_axis: int | None = opt(None, "HQQ quantization axis.")
    sampler_type: str = opt(
        "sample",
        "Strategy: sample (N samples per prompt), distill (API distillation, "
        "reasoning kept), or a search strategy; `winnow list strategies`.",
        registry="strategy",
        fingerprint=True,
    )
    sampler_engine: str = opt(
        "pt",
        "Inference engine (pt is transformers; no = score cached samples only); `winnow list engines`.",
        registry="engine",
        extra_choices=("no",),
    )
    engine_kwargs: dict = opt(
        None, "Extra engine options as JSON, e.g. '{\"max_batch_sequences\": 256}'.", factory=dict
    )
    torch_dtype: str = opt("auto", "Model dtype: auto, float32, bfloat16, float16.", choices=TORCH_DTYPES)
    max_length: int | None = opt(
        None,
        "Longest prompt+completion in tokens; longer prompts are failed rows. Default: the model's context length.",
        ge=1,
    )
    truncation_strategy: str | None = opt(
        None,
        "A prompt over --max_length: delete (the row fails, the default) or left (its oldest tokens are cut).",
        choices=("delete", "left"),
    )
    device: str = opt("auto", "Device for local engines: auto (CUDA if present, else CPU), cpu, cuda, cuda:1.")

    # --- data
    dataset: list[str] = opt(
        None, "Datasets: path_or_id[:subset][#N], several separated by spaces.", factory=list, fingerprint=True
    )
    dataset_shuffle: bool = opt(True, "Shuffle the rows (seeded by --data_seed) before sampling.", fingerprint=True)
    seed: int = opt(42, "Random seed of generation.", ge=0, le=2**63 - 1, fingerprint=True)
    data_seed: int = opt(42, "Random seed of the data order and of #N sampling.", ge=0, le=2**63 - 1, fingerprint=True)
    data_range: list[int] = opt(
        None, "Shard 'i n': process the i-th of n exact contiguous shards.", factory=list, fingerprint=True
    )
    strict: bool = opt(False, "Stop before generating anything if any row is bad (default: log and skip it).")
    columns: dict = opt(
        None, 'Rename dataset columns first, as JSON: \'{"instruction": "query"}\'.', factory=dict, fingerprint=True
    )
    split_dataset_ratio: float = opt(
        0.0,
        "Hold out this share of the rows (seeded) and sample the rest. (swift 4.6's sampler ignores it.)",
        ge=0,
        le=1,
        fingerprint=True,
    )
    remove_unused_columns: bool | None = opt(
        None,
        "true: write only the standard fields, as swift does; default: "
        "a row's other columns travel into every output line.",
        fingerprint=True,
    )
    streaming: bool = opt(False, "Accepted: winnow always reads datasets lazily.")

    # --- sampling
    num_return_sequences: int = opt(64, "Samples per prompt.", ge=1, fingerprint=True)
    max_new_tokens: int | None = opt(
        None,
        "Most tokens to generate per sample; unset: the rest of the model's context "
        "(the client engine sends no limit).",
        ge=1,
    )
    temperature: float | None = opt(
        None, "Sampling temperature (0 = greedy); unset: the model's generation_config.json, else 1.0.", ge=0
    )
    top_p: float | None = opt(
        None, "Nucleus sampling probability; unset: the model's generation_config.json, else 1.0.", gt=0, le=1
    )
    top_k: int | None = opt(
        None, "Top-k sampling (0 = off); unset: the model's generation_config.json, else off.", ge=0
    )
    repetition_penalty: float | None = opt(
        None, "Repetition penalty (1.0 = off); unset: the model's generation_config.json, else off.", gt=0
    )
    num_beams: int = opt(1, "Beam search (transformers engine): the N best of this many beams, no sampling.", ge=1)
    stop_words: list[str] = opt(None, "Stop generation at any of these strings.", factory=list)
    num_sampling_batch_size: int | None = opt(
        None, "Prompts per engine call (default: the engine's own budget).", ge=1, fingerprint=True
    )
    num_sampling_batches: int | None = opt(None, "Stop after this many batches of prompts.", ge=1, fingerprint=True)

    # --- output
    output_dir: str = opt("sample_output", "Directory for the output and its manifest.")
    output_file: str | None = opt(None, "Output file name (no directory, .jsonl). Default: a timestamp.")
    override_exist_file: bool = opt(False, "Overwrite an existing output file.")
    resume: bool = opt(False, "Continue an interrupted run: skip groups already written.")
    output_parquet: bool = opt(
        False,
        "Also write the output as Parquet (<name>.parquet, one schema for every run: "
        "scores as a list of {name, value, steps}) when the run finishes.",
    )
    output_format: str = opt(
        "swift",
        "Record format: swift (messages, id, rejected_response), sft (messages), "
        "prompt_completion (TRL's prompt/completion SFT form), dpo (TRL's prompt/"
        "chosen/rejected), raw (every sample with its scores), grpo (prompts a GRPO "
        "trainer loads, with the group's statistics).",
        registry="format",
        fingerprint=True,
    )

    # --- rewards and selection
    orm_model: str | None = opt(
        None, "Outcome reward: a built-in name (math, accuracy, ...), a plugin name or a model.", fingerprint=True
    )
    prm_model: str | None = opt(None, "Process reward: a model dir/hub id, or a plugin name.", fingerprint=True)
    reward_funcs: list[str] = opt(
        None, "More rewards by name, combined with --reward_weights.", factory=list, fingerprint=True
    )
    reward_weights: list[float] = opt(
        None, "Weights of the rewards, in order [orm, prm, reward_funcs...].", factory=list, fingerprint=True
    )
    reward_kwargs: dict = opt(
        None, 'Options for rewards as JSON: {"reward_name": {...}} .', factory=dict, fingerprint=True
    )
    reward_model: list[str] = opt(None, "Classifier reward models (dirs or hub ids).", factory=list, fingerprint=True)
    external_plugins: list[str] = opt(
        None, "Python files defining orms/prms/reward functions.", factory=list, fingerprint=True
    )
    n_best_to_keep: int | None = opt(
        None,
        "Samples kept per prompt (default: 5, as swift, or N if fewer); at most --num_return_sequences.",
        ge=1,
        fingerprint=True,
    )
    selection: str = opt(
        "winnow",
        "winnow: swift's records with swift's bugs fixed (docs/rewards.md); swift: ms-swift "
        "4.6's selection, line for line.",
        choices=("winnow", "swift"),
        fingerprint=True,
    )
    prm_threshold: float | None = opt(
        0.0,
        "With a PRM: samples whose PRM score is at or below this are not kept (as swift; none: no threshold).",
        fingerprint=True,
    )
    prm_agg: str = opt(
        "min", "How step scores become one PRM score.", choices=("min", "last", "prod", "mean"), fingerprint=True
    )
    easy_query_threshold: float | None = opt(
        None, "Drop prompts whose ORM pass rate is above this.", ge=0, le=1, fingerprint=True
    )
    hard_query_threshold: float | None = opt(
        None, "Drop prompts whose ORM pass rate is below this.", ge=0, le=1, fingerprint=True
    )
    num_rejected: int = opt(1, "Rejected responses paired with each kept sample.", ge=1, fingerprint=True)
    min_margin: float = opt(0.0, "Smallest score gap between a chosen and a rejected sample.", ge=0, fingerprint=True)
    include_reference: bool = opt(False, "Let the dataset's reference answer be a candidate.", fingerprint=True)
    keep_unpaired: bool = opt(
        True,
        "Write kept samples that have no rejected partner (no sample scores below them) "
        "without rejected_response; false drops them (counted).",
        fingerprint=True,
    )
    keep_truncated: bool = opt(
        True,
        "Keep answers cut at the token limit (their finish_reason says length; the "
        "summary counts them); false fails them.",
        fingerprint=True,
    )
    cache_files: list[str] = opt(
        None, "Stage-1 outputs to score instead of (or before) sampling.", factory=list, fingerprint=True
    )

    # --- API client
    stream: bool = opt(False, "Stream API responses.")
    # a plain str with an "auto" default: "none" is one of the choices, not the absence of a value
    reasoning_format: str = opt(
        "auto",
        "Where a reasoning model's reasoning goes: message (reasoning_content on the assistant message, what "
        "chat templates read; the default for sample), think_answer (<think>...</think><answer>...</answer>, the "
        "default for distill, as swift), think (<think>...</think> then the answer), separate (a 'reasoning' "
        "column), none (dropped).",
        choices=("auto", "message", "think_answer", "think", "separate", "none"),
        fingerprint=True,
    )
    max_concurrency: int = opt(64, "API requests in flight.", ge=1)
    rpm: int | None = opt(None, "Most API requests per minute.", ge=1)
    tpm: int | None = opt(None, "Most API tokens per minute.", ge=1)
    request_timeout: float = opt(600.0, "Seconds before one API request times out.", gt=0)
    max_retries: int = opt(5, "Retries of one API request (429, 5xx, timeouts, connection errors).", ge=0)
    price_per_mtok_in: float | None = opt(None, "Price per million prompt tokens, for the cost report.", ge=0)
    price_per_mtok_out: float | None = opt(None, "Price per million completion tokens, for the cost report.", ge=0)

    # --- provider batch API and structured output (docs/client.md)
    batch_api: bool = opt(
        False,
        "Client engine: send the requests through the provider's Batch API (/v1/files, "
        "/v1/batches): half the price, far higher limits, answers within hours; resumable.",
    )
    batch_max_requests: int = opt(50000, "Most requests in one provider batch.", ge=1)
    batch_max_bytes: int = opt(200 * 1024 * 1024, "Largest batch input file in bytes.", ge=1)
    batch_poll_s: float = opt(
        30.0, "Seconds between the first status polls of a batch (then backing off to 10 minutes).", gt=0
    )
    batch_completion_window: str = opt(
        "24h", "The batch's completion_window (OpenAI takes 24h; some providers longer)."
    )
    batch_discount: float = opt(
        0.5,
        "With --batch_api: the share taken off --price_per_mtok_in/out for the cost report (0.5: half price).",
        ge=0,
        le=1,
    )
    response_format: str | None = opt(
        None,
        "Structured output: a JSON schema (file or inline JSON), OpenAI's "
        "response_format object, or a pydantic model (file.py:Model). Sent to "
        "APIs, constrained decoding on local engines; every answer is checked.",
    )
    # --- multi-turn
    multi_turn_scheduler: str | None = opt(
        None,
        "Sample trajectories, not single answers: between turns this scheduler runs tools, steps an environment "
        "or decides the trajectory is finished (tools, gym, or a plugin's, ms-swift's MultiTurnScheduler "
        "subclasses included); `winnow list schedulers`.",
        registry="scheduler",
    )
    max_turns: int = opt(10, "Most model turns per trajectory (with --multi_turn_scheduler).", ge=1)
    tools: list[str] = opt(
        None,
        "Tools the model may call (the tools scheduler): python (sandboxed), calculator, or "
        "a plugin's; `winnow list tools`. The row's own tools are offered too.",
        factory=list,
        registry="tool",
    )
    gym_env: str | None = opt(
        None,
        "Environment of the gym scheduler (math_retry, or a plugin's); a row's env_config "
        "may name its own. `winnow list environments`.",
        registry="environment",
    )
    multi_turn_kwargs: dict = opt(
        None,
        "Options of the scheduler as JSON, e.g. '{\"timeout_s\": 5}' for tools, "
        "'{\"env_config\": {...}}' for gym (docs/multiturn.md).",
        factory=dict,
    )
    # --- search (--sampler_type beam, dvts or mcts; docs/search.md). N is --num_return_sequences.
    search_width: int = opt(
        4,
        "Search: M. Beam search keeps the N/M best partial answers and samples M next steps "
        "from each; DVTS grows N/M independent subtrees, each keeping its best of M next "
        "steps; MCTS samples M children when it expands a node. (search-and-learn's "
        "beam_width.)",
        ge=1,
    )
    search_max_steps: int = opt(
        40,
        "Search: most steps of an answer; the last one is generated to the end of the "
        "answer. (search-and-learn's num_iterations.)",
        ge=1,
    )
    step_separator: str | None = opt(
        None,
        "Search: where a step ends (\\n and \\t are read as newline and tab); "
        "unset: the PRM's own step separator (demo-prm: a line), else a blank "
        "line.",
    )
    search_lookahead: int = opt(
        0,
        "Beam search and DVTS: value a candidate step by the PRM after this many more "
        "greedy steps (search-and-learn's lookahead; each costs a step per candidate).",
        ge=0,
    )
    search_prm_agg: str = opt(
        "last",
        "Search: how the PRM's step scores of a partial answer become the value the "
        "search ranks by (search-and-learn's agg_strategy); the final answers' "
        "scores use --prm_agg.",
        choices=("last", "min", "prod", "mean"),
    )
    search_filter_duplicates: bool = opt(
        False,
        "Search: a step that repeats a partial answer the search holds "
        "already is dropped (it is not valued, kept or expanded), so the "
        "group's answers are distinct. (search-and-learn's "
        "filter_duplicates.)",
    )
    mcts_iterations: int | None = opt(
        None,
        "MCTS: simulations per prompt (each selects a leaf by UCT, expands it "
        "with M next steps and backs their PRM values up); unset: N.",
        ge=1,
    )
    mcts_exploration: float = opt(
        1.414,
        "MCTS: c of UCT, Q + c * sqrt(ln N(parent) / N(child)) (sqrt 2, as "
        "Kocsis and Szepesvari; PRM values lie in 0..1).",
        ge=0,
    )
    mcts_rollout_depth: int = opt(
        0,
        "MCTS: value a new node by the PRM after sampling this many more steps from "
        "it (0: the node itself; --search_max_steps or more: to the end of the answer, "
        "which also yields a finished answer).",
        ge=0,
    )
    search_kwargs: dict = opt(None, "Search: options for a plugin strategy, as JSON.", factory=dict)

    # --- swift compatibility: settings of swift's SamplingArguments that do not apply to sampling
    custom_register_path: list[str] = opt(
        None,
        "swift registration files (custom models, templates, datasets): loaded like --external_plugins.",
        factory=list,
    )
    logprobs: bool = opt(False, "Not supported yet: per-token log-probabilities.", swift="unsupported")
    top_logprobs: int | None = opt(None, "Not supported yet.", swift="unsupported")
    structured_outputs_regex: str | None = opt(
        None, "Not supported yet: regex-constrained decoding.", swift="unsupported"
    )
    interleave_prob: list[float] = opt(
        None, "Not supported: datasets are concatenated.", factory=list, swift="unsupported"
    )
    stopping_strategy: str = opt("first_exhausted", "Only with --interleave_prob.", swift="noop")
    ray_exp_name: str | None = opt(None, "swift's Ray experiment name.", swift="noop")
    device_groups: Any = opt(None, "swift's Ray device groups (winnow places Ray replicas itself).", swift="noop")
    task_type: str | None = opt(None, "swift model task type (sampling is causal_lm).", swift="noop")
    experts_impl: str | None = opt(None, "swift MoE setting.", swift="noop")
    new_special_tokens: list[str] = opt(None, "swift training setting.", factory=list, swift="noop")
    num_labels: int | None = opt(None, "swift training setting.", swift="noop")
    problem_type: str | None = opt(None, "swift training setting.", swift="noop")
    rope_scaling: str | None = opt(None, "swift model setting.", swift="noop")
    local_repo_path: str | None = opt(None, "swift model setting.", swift="noop")
    init_strategy: str | None = opt(None, "swift training setting.", swift="noop")
    max_pixels: int | None = opt(None, "swift multimodal setting (winnow samples text).", swift="noop")
    agent_template: str | None = opt(None, "swift agent template.", swift="noop")
    norm_bbox: str | None = opt(None, "swift grounding setting.", swift="noop")
    padding_side: str = opt("right", "swift training setting (sampling always pads left).", swift="noop")
    padding_free: bool = opt(False, "swift training setting.", swift="noop")
    loss_scale: str = opt("default", "swift training setting.", swift="noop")
    sequence_parallel_size: int = opt(1, "swift training setting.", swift="noop")
    is_binary_loss_scale: bool | None = opt(None, "swift training setting.", swift="noop")
    template_backend: str = opt("swift", "swift template backend (winnow renders HF chat templates).", swift="noop")
    preserve_thinking: bool | None = opt(None, "swift training setting.", swift="noop")
    add_non_thinking_prefix: bool = opt(True, "swift training setting.", swift="noop")
    disable_ignore_empty_think: bool = opt(False, "swift training setting.", swift="noop")
    val_dataset: list[str] = opt(
        None, "swift training setting (sampling has no validation set).", factory=list, swift="noop"
    )
    cached_dataset: list[str] = opt(None, "swift preprocessing cache.", factory=list, swift="noop")
    cached_val_dataset: list[str] = opt(None, "swift preprocessing cache.", factory=list, swift="noop")
    dataset_num_proc: int = opt(1, "swift preprocessing workers (winnow reads lazily).", swift="noop")
    load_from_cache_file: bool = opt(False, "swift preprocessing cache.", swift="noop")
    val_dataset_shuffle: bool = opt(False, "swift training setting.", swift="noop")
    shuffle_buffer_size: int = opt(1000, "swift streaming setting.", swift="noop")
    download_mode: str = opt("reuse_dataset_if_exists", "swift download setting.", swift="noop")
    disable_auto_column_mapping: bool = opt(False, "swift preprocessing setting.", swift="noop")
    model_name: list[str] = opt(None, "swift self-cognition setting.", factory=list, swift="noop")
    model_author: list[str] = opt(None, "swift self-cognition setting.", factory=list, swift="noop")
    custom_dataset_info: list[str] = opt(None, "swift dataset registry files.", factory=list, swift="noop")
    decision_drop_instructions: float = opt(0.0, "swift decision-task setting.", swift="noop")
    decision_subsample_options: int = opt(0, "swift decision-task setting.", swift="noop")
    decision_state_as_text: float = opt(0.0, "swift decision-task setting.", swift="noop")
    decision_shuffle_fields: bool = opt(False, "swift decision-task setting.", swift="noop")
    tuner_backend: str = opt("peft", "swift training setting.", swift="noop")
    tuner_type: str = opt("lora", "swift training setting.", swift="noop")
    use_swift_lora: bool = opt(False, "swift training setting.", swift="noop")
    model_kwargs: dict = opt(None, "swift model-specific settings.", factory=dict, swift="noop")
    enable_npu_model_patch: bool = opt(True, "swift NPU setting.", swift="noop")
    load_data_args: bool = opt(False, "swift training setting.", swift="noop")
    packing: bool = opt(False, "swift training setting.", swift="noop")
    packing_length: int | None = opt(None, "swift training setting.", swift="noop")
    packing_num_proc: int = opt(1, "swift training setting.", swift="noop")
    packing_strategy: str = opt("binpack", "swift training setting.", swift="noop")
    lazy_tokenize: bool | None = opt(None, "swift training setting.", swift="noop")
    ddp_timeout: int = opt(18000000, "swift distributed setting.", swift="noop")
    ddp_backend: str | None = opt(None, "swift distributed setting.", swift="noop")
    ignore_args_error: bool = opt(False, "swift setting.", swift="noop")

    # --- Ray: engine (and reward-model) replicas as Ray actors, the run's driver unchanged (docs/ray.md)
    ray: bool = opt(False, "Run the engine as --num_workers replicas on a Ray cluster (pip install 'winnow[ray]').")
    use_ray: bool = opt(False, "swift's name for --ray.")
    ray_address: str | None = opt(
        None,
        "Ray cluster to join: auto (the one `ray start` runs on this machine), HOST:6379, or ray://HOST:10001 "
        "(Ray Client). Unset: RAY_ADDRESS, else a new local Ray on this machine.",
    )
    num_workers: int = opt(1, "Engine replicas on Ray (--ray true); each loads the model once.", ge=1)
    ray_num_gpus_per_worker: float = opt(
        0.0, "GPUs each engine replica holds (4 for vLLM with tensor_parallel_size 4 in --engine_kwargs).", ge=0
    )
    ray_num_cpus_per_worker: float = opt(1.0, "CPUs each engine replica holds.", ge=0)
    ray_resources_per_worker: dict = opt(
        None,
        "Custom Ray resources each engine replica needs, as JSON: '{\"policy\": 1}' puts replicas on nodes "
        "started with --resources '{\"policy\": 8}'.",
        factory=dict,
    )
    ray_scheduling: str = opt(
        "spread", "Where replicas go: spread over the nodes, or pack onto as few as fit.", choices=("spread", "pack")
    )
    ray_max_restarts: int = opt(
        3,
        "Times Ray restarts a dead replica (-1: no limit); the calls it had in flight "
        "are redone on the other replicas either way.",
        ge=-1,
    )
    ray_runtime_env: dict = opt(
        None, "Ray runtime_env of every replica as JSON (env_vars, pip, py_modules, working_dir...).", factory=dict
    )
    ray_wait_s: float = opt(
        600.0,
        "Longest wait with no replica alive (all starting, or all restarting) before "
        "the run stops with an error; what was written is kept.",
        gt=0,
    )
    ray_reward_workers: int = opt(
        0,
        "Replicas of each reward model (--reward_model, --prm_model, --orm_model "
        "directories) on Ray; 0: reward models run in the driver.",
        ge=0,
    )
    ray_num_gpus_per_reward_worker: float = opt(0.0, "GPUs each reward-model replica holds.", ge=0)
    ray_num_cpus_per_reward_worker: float = opt(1.0, "CPUs each reward-model replica holds.", ge=0)
    ray_resources_per_reward_worker: dict = opt(
        None,
        "Custom Ray resources each reward-model replica needs, as JSON: '{\"prm\": 1}' keeps the reward "
        "models on their own nodes.",
        factory=dict,
    )

    # --- misc
    progress: bool = opt(True, "Show a progress bar.")
    debug: bool = opt(False, "Show tracebacks on errors.")

    def __post_init__(self) -> None:
        check_fields(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("swift") == "unsupported" and getattr(self, f.name) not in (None, False, [], {}):
                raise ConfigError(
                    f"--{f.name}: accepted for swift compatibility but not supported by winnow sample yet; drop it"
                )
        self.sampler_engine = REGISTRY.canonical("engine", self.sampler_engine)
        if self.n_best_to_keep is not None and self.n_best_to_keep > self.num_return_sequences:
            raise ConfigError(
                f"--n_best_to_keep {self.n_best_to_keep}: more than the {self.num_return_sequences} "
                "samples per prompt (--num_return_sequences); keep at most that many"
            )
        if self.output_file is not None:
            if "/" in self.output_file or "\\" in self.output_file:
                raise ConfigError(
                    f"--output_file takes a file name without a directory, got {self.output_file!r}; "
                    "put the directory in --output_dir"
                )
            if not self.output_file.endswith(".jsonl"):
                raise ConfigError(f"--output_file must end with .jsonl, got {self.output_file!r}")
        if self.data_range and (len(self.data_range) != 2 or not 0 <= self.data_range[0] < self.data_range[1]):
            raise ConfigError(f"--data_range takes 'i n' with 0 <= i < n, got {self.data_range}")
        if self.sampler_engine != "no" and not self.model and not self.adapters:
            raise ConfigError("--model is required (a local directory, a hub id, or a served model name)")
        if not self.dataset:
            raise ConfigError("--dataset is required, e.g. --dataset data.jsonl#100")
        if self.reasoning_format in (None, "auto"):
            self.reasoning_format = "think_answer" if self.sampler_type == "distill" else "message"
        self.ray = self.ray or self.use_ray
        if not self.ray and (self.num_workers > 1 or self.ray_reward_workers):
            flag = "--num_workers" if self.num_workers > 1 else "--ray_reward_workers"
            raise ConfigError(f"{flag} runs replicas on Ray: add --ray true (pip install 'winnow[ray]')")

    @property
    def engine(self) -> str:
        """The canonical engine name (``pt`` is ``transformers``)."""
        return self.sampler_engine

    @property
    def multi_turn(self) -> bool:
        """Whether every sample is a trajectory (a scheduler, tools or a gym environment is set)."""
        return bool(self.multi_turn_scheduler or self.tools or self.gym_env)

    def apply_saved_args(self) -> list[str]:
        """``--load_args``: when --model or an adapter is a swift training output, take the base model, template,
        system and length settings its ``args.json`` recorded, for the options this run does not set.
        Returns what it took, for the run to say."""
        import json as json_module

        if not self.load_args:
            return []
        taken: list[str] = []
        for folder in [*self.adapters, *([self.model] if self.model else [])]:
            saved_file = Path(folder).expanduser() / "args.json"
            if not saved_file.is_file():
                continue
            try:
                saved = json_module.loads(saved_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise ConfigError(f"{saved_file}: not valid JSON; fix it or pass --load_args false") from None
            if (
                self.adapters
                and folder in self.adapters
                and saved.get("model")
                and (self.model is None or self.model in self.adapters)
            ):
                self.model = str(saved["model"])
                taken.append(f"model={self.model}")
            from winnow.templates import TEMPLATES

            for key in ("model_type", "model_revision", "system", "max_length", "template"):
                value = saved.get(key)
                if value is None or getattr(self, key) is not None or (key == "template" and value not in TEMPLATES):
                    continue
                setattr(self, key, value)
                taken.append(f"{key}={value}")
            break
        return taken

    def without_effect(self) -> list[str]:
        """The swift-only options this run sets that have no effect on sampling (a run names them once)."""
        out = []
        for f in dataclasses.fields(self):
            if f.metadata.get("swift") == "noop":
                if f.default is not dataclasses.MISSING:
                    default = f.default
                else:
                    assert f.default_factory is not dataclasses.MISSING  # every option has a default
                    default = f.default_factory()
                if getattr(self, f.name) != default:
                    out.append(f"--{f.name}")
        return out


@dataclass
class ServeConfig:
    """Options of ``winnow serve`` (alias ``winnow deploy``)."""

    model: str | None = opt(None, "Model to serve: a local directory or a hub id (a policy or a reward model).")
    model_revision: str | None = opt(None, "Hub revision (branch, tag or commit) of --model.")
    use_hf: bool = opt(
        False,
        "Hub ids are read from the Hugging Face hub (true) or ModelScope (false, swift's "
        "default; USE_HF=1 also selects Hugging Face).",
    )
    hub_token: str | None = opt(None, "Token for a private hub model.")
    engine: str = opt(
        "transformers",
        "Engine for a policy model (a local one: transformers, vllm, sglang, lmdeploy).",
        registry="engine",
    )
    host: str = opt("127.0.0.1", "Address to bind (loopback unless told otherwise).")
    port: int = opt(8000, "Port to bind (0 picks a free one).", ge=0, le=65535)
    api_key: str | None = opt(None, "Require this bearer key on every request.")
    served_model_name: str | None = opt(None, "Model name clients use (default: the directory name).")
    torch_dtype: str = opt("auto", "Model dtype.", choices=TORCH_DTYPES)
    device: str = opt("auto", "Device: auto, cpu, cuda.")
    engine_kwargs: dict = opt(None, "Extra engine options as JSON.", factory=dict)
    max_batch_size: int = opt(64, "Most requests batched into one engine call.", ge=1)
    max_wait_ms: float = opt(10.0, "Longest wait to fill a batch, in milliseconds.", ge=0)
    max_queue: int = opt(256, "Queued requests before the server answers 503.", ge=1)
    dynamic_batching: bool = opt(True, "Batch concurrent requests into one engine call.")
    template: str | None = opt(None, "Chat template (Jinja string or file).")
    max_new_tokens: int | None = opt(
        None, "max_tokens of requests that set none; unset: the rest of the context.", ge=1
    )
    seed: int = opt(
        42,
        "Seed of the server's random stream; a request's own seed gets an engine call of its own.",
        ge=0,
        le=2**63 - 1,
    )
    # --- limits against hostile or broken clients (docs/serve.md, "Limits")
    max_request_bytes: int = opt(
        32 * 1024 * 1024, "Largest request body in bytes; a larger one is answered 413 before it is read.", ge=1
    )
    max_messages: int = opt(2048, "Most messages in one conversation, and content parts in one message.", ge=1)
    max_prompts: int = opt(
        256, "Most prompts in one /v1/completions request and conversations in one /v1/rewards request.", ge=1
    )
    max_stop: int = opt(16, "Most stop strings in one request.", ge=1)
    max_stop_chars: int = opt(256, "Longest stop string, in characters.", ge=1)
    max_connections: int = opt(
        1024,
        "Most open client connections; beyond it the oldest connection that has not "
        "sent a whole request head is closed, or the new one refused with 503.",
        ge=1,
    )
    timeout_headers: float = opt(10.0, "Seconds a connection has to send a whole request head (408 after).", gt=0)
    timeout_body: float = opt(
        60.0, "Seconds a request has to send its whole body once its head is in (408 after).", gt=0
    )
    timeout_keep_alive: float = opt(5.0, "Seconds an idle keep-alive connection stays open.", gt=0)
    debug: bool = opt(False, "Show tracebacks on errors.")

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.model:
            raise ConfigError("--model is required")
        self.engine = REGISTRY.canonical("engine", self.engine)


@dataclass
class ReportConfig:
    """Options of ``winnow report``: the test-time scaling table and plots from outputs."""

    outputs: list[str] = opt(
        None,
        "Outputs to report on: raw JSONL (or Parquet) from `winnow sample --output_format raw`, any strategy, "
        "or a Qwen2.5-Math evaluation JSONL. Several: one strategy or run each.",
        factory=list,
        positional=True,
    )
    output_dir: str | None = opt(
        None, "Where report.png, report.html and report.json go; unset: beside the first output."
    )
    label: list[str] = opt(
        None, "A label per output; unset: model, sampler and N from its manifest, else the file name.", factory=list
    )
    orm: str | None = opt(None, "Score key of the correctness verdict, value > 0 passes; unset: the manifest's ORM.")
    rewards: list[str] = opt(
        None,
        "Score keys to rank (best-of-k) and weight votes by; unset: every PRM, RM and "
        "function reward of the manifest, or every non-ORM score.",
        factory=list,
    )
    verdict: str = opt(
        "orm",
        "Correctness from the ORM score (orm), or from winnow's math verifier against each "
        "record's reference, run now (math).",
        choices=("orm", "math"),
    )
    answer_match: str = opt(
        "math",
        "How votes group final answers: math (math-verify equivalence) or exact (the same answer text).",
        choices=("math", "exact"),
    )
    ties: str = opt(
        "first",
        "A tied vote or tied best score goes to the sample seen first (first), or counts as "
        "the mean of the tied ones (average).",
        choices=("first", "average"),
    )
    max_k: int | None = opt(None, "Largest k in the table; unset: the most samples a problem has.", ge=1)
    draws: int = opt(
        200,
        "Majority votes: every k-subset of a problem's samples when there are at most this many, "
        "else this many seeded random ones.",
        ge=1,
    )
    bootstrap: int = opt(1000, "Bootstrap resamples of the problems for the 95% intervals (0: no intervals).", ge=0)
    seed: int = opt(0, "Seed of the subset draws and the bootstrap.")
    input_format: str = opt(
        "auto",
        "Input format: raw, qwen_eval (Qwen2.5-Math eval JSONL) or auto (by the first line).",
        choices=("auto", "raw", "qwen_eval"),
    )
    plots: bool = opt(True, "Write report.png and report.html (needs matplotlib: pip install 'winnow[report]').")
    debug: bool = opt(False, "Show tracebacks on errors.")

    def __post_init__(self) -> None:
        if not self.outputs:
            raise ConfigError("give at least one output: winnow report OUTPUT.jsonl [MORE.jsonl ...]")
        check_fields(self)
        if self.label and len(self.label) != len(self.outputs):
            raise ConfigError(
                f"--label takes one label per output: {len(self.outputs)} outputs, {len(self.label)} labels"
            )


# ----------------------------------------------------------------------------- CLI / YAML derivation


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("true", "1", "yes", "y", "on"):
        return True
    if low in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _parse_none_or(kind):
    def parse(text: str):
        if str(text).lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _converter(tp: Any) -> tuple[Any, dict]:
    """(argparse type, extra add_argument kwargs) for a field type."""
    inner, optional = _unwrap(tp)
    origin = typing.get_origin(inner)
    if origin is list:
        (item,) = typing.get_args(inner)
        return item, {"nargs": "*"}
    if inner is dict or origin is dict:
        return _parse_json_dict, {}
    if inner is bool:
        return _parse_bool, {"metavar": "true|false"}
    if typing.get_origin(inner) is Literal:
        return str, {}
    kind = inner if inner in (int, float, str) else str
    return (_parse_none_or(kind) if optional else kind), {}


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser whose options are ``cls``'s fields; unset flags stay absent."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=True,  # unambiguous abbreviations, as swift's argument parser allows
    )
    parser.add_argument("--config", help="YAML file of options; flags given here override it.")
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        kind, extra = _converter(hints[f.name])
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=kind, help=f.metadata.get("help", "").replace("%", "%%"), **extra)
            continue
        names = [f"--{f.name}"]
        if "_" in f.name:
            names.append(f"--{f.name.replace('_', '-')}")
        default = f.default if f.default is not dataclasses.MISSING else "[]" if f.default_factory is list else "{}"
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += f" Choices: {', '.join(f.metadata['choices'])}."
        help_text = f"{help_text} (default: {default})".replace("%", "%%")  # argparse formats help with %
        parser.add_argument(*names, dest=f.name, type=kind, help=help_text, **extra)
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    """Options from a YAML (or JSON) file, keys normalised to snake_case. As in swift, an ``ENV`` mapping
    sets environment variables that are not set already."""
    import os

    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}  # JSON is YAML too
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: not valid YAML or JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value")
    env = data.pop("ENV", None)
    if isinstance(env, dict):
        for key, value in env.items():
            os.environ.setdefault(str(key), str(value))
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def make_config(cls, values: dict[str, Any], source: str = "options"):
    """Build ``cls`` from a dict, naming any unknown key and any value of the wrong type."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown and str(values.get("ignore_args_error")).lower() in ("true", "1"):
        import sys

        print(f"winnow: warning: ignored unknown options (--ignore_args_error): {', '.join(unknown)}", file=sys.stderr)
        values = {k: v for k, v in values.items() if k in known}
        unknown = []
    if unknown:
        import difflib

        hints = [difflib.get_close_matches(k, known, n=1) for k in unknown]
        pairs = zip(unknown, hints, strict=True)
        detail = ", ".join(f"{k}" + (f" (did you mean {h[0]}?)" if h else "") for k, h in pairs)
        raise ConfigError(f"unknown option in {source}: {detail}")
    hints_t = _field_types(cls)
    coerced = {}
    for key, value in values.items():
        coerced[key] = _coerce(key, value, hints_t[key], source)
    try:
        return cls(**coerced)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Values from YAML/Python arrive typed already; strings from elsewhere are parsed like flags."""
    inner, optional = _unwrap(tp)
    if value is None:
        return None
    origin = typing.get_origin(inner)
    try:
        if origin is list:
            (item,) = typing.get_args(inner)
            items = value if isinstance(value, (list, tuple)) else str(value).split()
            return [item(v) if item in (int, float) else str(v) for v in items]
        if inner is dict:
            return _parse_json_dict(value) if isinstance(value, str) else dict(value)
        if inner is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if inner in (int, float):
            if isinstance(value, bool):
                raise ValueError("a boolean")
            return inner(value)
        if inner is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `quant_bits: 4` as a number
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise ConfigError(f"{source}: bad value for {key}: {value!r} ({e})") from None
    return value


def parse_args(cls, argv: list[str], prog: str, description: str, parser: argparse.ArgumentParser | None = None):
    """Parse CLI flags (plus an optional ``--config`` YAML they override) into ``cls``."""
    parser = parser or build_parser(cls, prog, description)
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_path = ns.pop("config", None)
    if config_path:
        values.update(load_yaml(config_path))
    values.update(ns)
    return make_config(cls, values, source=config_path or "command line")


def to_dict(config) -> dict[str, Any]:
    """A config as a JSON-able dict, secrets masked (for manifests)."""
    from winnow.redact import Redactor

    return Redactor.for_values(config).value(dataclasses.asdict(config))
