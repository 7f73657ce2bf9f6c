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

from winnow.errors import ConfigError

ENGINE_ALIASES = {"pt": "transformers", "hf": "transformers", "openai": "client"}
ENGINES = ("pt", "transformers", "vllm", "sglang", "lmdeploy", "client", "no")
OUTPUT_FORMATS = ("swift", "sft", "dpo", "raw", "grpo")


def opt(default: Any = None, help: str = "", *, choices: tuple | None = None, factory=None, cli: bool = True,
        ge: float | None = None, gt: float | None = None, le: float | None = None, positional: bool = False):
    """A config field with its help text, choices and range recorded once, for --help, YAML, docs and
    the checks every entry point (CLI, YAML, Python) goes through."""
    meta = {"help": help, "choices": choices, "cli": cli, "ge": ge, "gt": gt, "le": le, "positional": positional}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def check_fields(config) -> None:
    """Every field's declared choices and range, checked; the error names the flag and what it takes."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        meta = f.metadata
        for item in (value if isinstance(value, list) else [value]):
            if item is None or isinstance(item, bool):
                continue
            flag = f"--{f.name} {item!r}" if isinstance(item, str) else \
                f"--{f.name} {item:g}" if isinstance(item, float) else f"--{f.name} {item}"
            if meta.get("choices") and item not in meta["choices"]:
                raise ConfigError(f"{flag}: not one of {', '.join(map(str, meta['choices']))}")
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
    model: str | None = opt(None, "Model: a local directory, a hub id, or (client engine) a served model name.")
    model_type: str | None = opt(None, "Accepted for swift compatibility; the model's own config decides.")
    template: str | None = opt(
        None, "Chat template: a Jinja string or a file holding one. Default: the tokenizer's template."
    )
    system: str | None = opt(None, "System prompt added to conversations that have none.")
    sampler_type: Literal["sample", "distill"] = opt(
        "sample", "sample: N samples per prompt; distill: API distillation.", choices=("sample", "distill")
    )
    sampler_engine: str = opt("pt", "Inference engine (pt is transformers; no = score cached samples only).",
                              choices=(*ENGINES, *(a for a in ENGINE_ALIASES if a not in ENGINES)))
    engine_kwargs: dict = opt(None, "Extra engine options as JSON, e.g. '{\"max_batch_sequences\": 256}'.",
                              factory=dict)
    torch_dtype: str = opt("auto", "Model dtype: auto, float32, bfloat16, float16.",
                           choices=("auto", "float32", "bfloat16", "float16"))
    max_length: int | None = opt(None, "Longest prompt+completion in tokens; longer prompts are failed rows.", ge=1)
    device: str = opt("auto", "Device for local engines: auto (CUDA if present, else CPU), cpu, cuda, cuda:1.")

    # --- data
    dataset: list[str] = opt(None, "Datasets: path_or_id[:subset][#N], several separated by spaces.", factory=list)
    dataset_shuffle: bool = opt(True, "Shuffle the rows (seeded) before sampling.")
    seed: int = opt(42, "Random seed for data order and generation.", ge=0, le=2**63 - 1)
    data_range: list[int] = opt(None, "Shard 'i n': process the i-th of n exact contiguous shards.", factory=list)
    strict: bool = opt(False, "Stop before generating anything if any row is bad (default: log and skip it).")

    # --- sampling
    num_return_sequences: int = opt(64, "Samples per prompt.", ge=1)
    max_new_tokens: int = opt(2048, "Most tokens to generate per sample.", ge=1)
    temperature: float = opt(1.0, "Sampling temperature (0 = greedy).", ge=0)
    top_p: float = opt(1.0, "Nucleus sampling probability.", gt=0, le=1)
    top_k: int | None = opt(None, "Top-k sampling (unset or 0 = off).", ge=0)
    repetition_penalty: float = opt(1.0, "Repetition penalty (1.0 = off).", gt=0)
    stop_words: list[str] = opt(None, "Stop generation at any of these strings.", factory=list)
    num_sampling_batch_size: int | None = opt(
        None, "Prompts per engine call (default: the engine's own budget).", ge=1
    )
    num_sampling_batches: int | None = opt(None, "Stop after this many batches of prompts.", ge=1)

    # --- output
    output_dir: str = opt("sample_output", "Directory for the output and its manifest.")
    output_file: str | None = opt(None, "Output file name (no directory, .jsonl). Default: a timestamp.")
    override_exist_file: bool = opt(False, "Overwrite an existing output file.")
    resume: bool = opt(False, "Continue an interrupted run: skip groups already written.")
    output_format: str = opt("swift", "Record format: swift, sft, dpo, raw, grpo.", choices=OUTPUT_FORMATS)

    # --- rewards and selection
    orm_model: str | None = opt(
        None, "Outcome reward: a built-in name (math, accuracy, ...), a plugin name or a model."
    )
    prm_model: str | None = opt(None, "Process reward: a model dir/hub id, or a plugin name.")
    reward_funcs: list[str] = opt(None, "More rewards by name, combined with --reward_weights.", factory=list)
    reward_weights: list[float] = opt(None, "Weights of the rewards, in order [orm, prm, reward_funcs...].",
                                      factory=list)
    reward_kwargs: dict = opt(None, "Options for rewards as JSON: {\"reward_name\": {...}} .", factory=dict)
    reward_model: list[str] = opt(None, "Classifier reward models (dirs or hub ids).", factory=list)
    external_plugins: list[str] = opt(None, "Python files defining orms/prms/reward functions.", factory=list)
    n_best_to_keep: int | None = opt(None, "Samples kept per prompt (default: 5, as swift, or N if fewer); at most "
                                      "--num_return_sequences.", ge=1)
    prm_threshold: float | None = opt(None, "Samples whose PRM score is at or below this are not kept.")
    prm_agg: str = opt("min", "How step scores become one PRM score.", choices=("min", "last", "prod", "mean"))
    easy_query_threshold: float | None = opt(None, "Drop prompts whose ORM pass rate is above this.", ge=0, le=1)
    hard_query_threshold: float | None = opt(None, "Drop prompts whose ORM pass rate is below this.", ge=0, le=1)
    num_rejected: int = opt(1, "Rejected responses paired with each kept sample.", ge=1)
    min_margin: float = opt(0.0, "Smallest score gap between a chosen and a rejected sample.", ge=0)
    include_reference: bool = opt(False, "Let the dataset's reference answer be a candidate.")
    keep_unpaired: bool = opt(False, "Keep samples that have no rejected partner (without rejected_response).")
    cache_files: list[str] = opt(None, "Stage-1 outputs to score instead of (or before) sampling.", factory=list)

    # --- API client
    stream: bool = opt(False, "Stream API responses.")
    # a plain str with an "auto" default: "none" is one of the choices, not the absence of a value
    reasoning_format: str = opt(
        "auto", "Where reasoning goes: think_answer (the default for distill), separate (a 'reasoning' field; "
        "the default for sample), none (dropped).",
        choices=("auto", "think_answer", "separate", "none"),
    )
    max_concurrency: int = opt(64, "API requests in flight.", ge=1)
    rpm: int | None = opt(None, "Most API requests per minute.", ge=1)
    tpm: int | None = opt(None, "Most API tokens per minute.", ge=1)
    request_timeout: float = opt(600.0, "Seconds before one API request times out.", gt=0)
    max_retries: int = opt(5, "Retries of one API request (429, 5xx, timeouts, connection errors).", ge=0)
    price_per_mtok_in: float | None = opt(None, "Price per million prompt tokens, for the cost report.", ge=0)
    price_per_mtok_out: float | None = opt(None, "Price per million completion tokens, for the cost report.", ge=0)

    # --- Ray: engine (and reward-model) replicas as Ray actors, the run's driver unchanged (docs/ray.md)
    ray: bool = opt(False, "Run the engine as --num_workers replicas on a Ray cluster (pip install 'winnow[ray]').")
    use_ray: bool = opt(False, "swift's name for --ray.")
    ray_address: str | None = opt(
        None, "Ray cluster to join: auto (the one `ray start` runs on this machine), HOST:6379, or ray://HOST:10001 "
        "(Ray Client). Unset: RAY_ADDRESS, else a new local Ray on this machine.")
    num_workers: int = opt(1, "Engine replicas on Ray (--ray true); each loads the model once.", ge=1)
    ray_num_gpus_per_worker: float = opt(
        0.0, "GPUs each engine replica holds (4 for vLLM with tensor_parallel_size 4 in --engine_kwargs).", ge=0)
    ray_num_cpus_per_worker: float = opt(1.0, "CPUs each engine replica holds.", ge=0)
    ray_resources_per_worker: dict = opt(
        None, "Custom Ray resources each engine replica needs, as JSON: '{\"policy\": 1}' puts replicas on nodes "
        "started with --resources '{\"policy\": 8}'.", factory=dict)
    ray_scheduling: str = opt("spread", "Where replicas go: spread over the nodes, or pack onto as few as fit.",
                              choices=("spread", "pack"))
    ray_max_restarts: int = opt(3, "Times Ray restarts a dead replica (-1: no limit); the calls it had in flight "
                                   "are redone on the other replicas either way.", ge=-1)
    ray_runtime_env: dict = opt(None, "Ray runtime_env of every replica as JSON (env_vars, pip, py_modules, "
                                      "working_dir...).", factory=dict)
    ray_wait_s: float = opt(600.0, "Longest wait with no replica alive (all starting, or all restarting) before "
                                   "the run stops with an error; what was written is kept.", gt=0)
    ray_reward_workers: int = opt(0, "Replicas of each reward model (--reward_model, --prm_model, --orm_model "
                                     "directories) on Ray; 0: reward models run in the driver.", ge=0)
    ray_num_gpus_per_reward_worker: float = opt(0.0, "GPUs each reward-model replica holds.", ge=0)
    ray_num_cpus_per_reward_worker: float = opt(1.0, "CPUs each reward-model replica holds.", ge=0)
    ray_resources_per_reward_worker: dict = opt(
        None, "Custom Ray resources each reward-model replica needs, as JSON: '{\"prm\": 1}' keeps the reward "
        "models on their own nodes.", factory=dict)

    # --- misc
    progress: bool = opt(True, "Show a progress bar.")
    debug: bool = opt(False, "Show tracebacks on errors.")

    def __post_init__(self) -> None:
        check_fields(self)
        self.sampler_engine = ENGINE_ALIASES.get(self.sampler_engine, self.sampler_engine)
        if self.n_best_to_keep is not None and self.n_best_to_keep > self.num_return_sequences:
            raise ConfigError(f"--n_best_to_keep {self.n_best_to_keep}: more than the {self.num_return_sequences} "
                              "samples per prompt (--num_return_sequences); keep at most that many")
        if self.output_file is not None:
            if "/" in self.output_file or "\\" in self.output_file:
                raise ConfigError(f"--output_file takes a file name without a directory, got {self.output_file!r}; "
                                  "put the directory in --output_dir")
            if not self.output_file.endswith(".jsonl"):
                raise ConfigError(f"--output_file must end with .jsonl, got {self.output_file!r}")
        if self.data_range and (len(self.data_range) != 2 or not 0 <= self.data_range[0] < self.data_range[1]):
            raise ConfigError(f"--data_range takes 'i n' with 0 <= i < n, got {self.data_range}")
        if self.sampler_engine != "no" and not self.model:
            raise ConfigError("--model is required (a local directory, a hub id, or a served model name)")
        if not self.dataset:
            raise ConfigError("--dataset is required, e.g. --dataset data.jsonl#100")
        if self.reasoning_format in (None, "auto"):
            self.reasoning_format = "think_answer" if self.sampler_type == "distill" else "separate"
        self.ray = self.ray or self.use_ray
        if not self.ray and (self.num_workers > 1 or self.ray_reward_workers):
            flag = "--num_workers" if self.num_workers > 1 else "--ray_reward_workers"
            raise ConfigError(f"{flag} runs replicas on Ray: add --ray true (pip install 'winnow[ray]')")

    @property
    def engine(self) -> str:
        """The canonical engine name (``pt`` is ``transformers``)."""
        return self.sampler_engine


@dataclass
class ServeConfig:
    """Options of ``winnow serve`` (alias ``winnow deploy``)."""

    model: str | None = opt(None, "Model to serve: a local directory or a hub id (a policy or a reward model).")
    engine: str = opt("transformers", "Engine for a policy model.", choices=("pt", "transformers", "vllm", "sglang"))
    host: str = opt("127.0.0.1", "Address to bind (loopback unless told otherwise).")
    port: int = opt(8000, "Port to bind (0 picks a free one).", ge=0, le=65535)
    api_key: str | None = opt(None, "Require this bearer key on every request.")
    served_model_name: str | None = opt(None, "Model name clients use (default: the directory name).")
    torch_dtype: str = opt("auto", "Model dtype.", choices=("auto", "float32", "bfloat16", "float16"))
    device: str = opt("auto", "Device: auto, cpu, cuda.")
    engine_kwargs: dict = opt(None, "Extra engine options as JSON.", factory=dict)
    max_batch_size: int = opt(64, "Most requests batched into one engine call.", ge=1)
    max_wait_ms: float = opt(10.0, "Longest wait to fill a batch, in milliseconds.", ge=0)
    max_queue: int = opt(256, "Queued requests before the server answers 503.", ge=1)
    dynamic_batching: bool = opt(True, "Batch concurrent requests into one engine call.")
    template: str | None = opt(None, "Chat template (Jinja string or file).")
    max_new_tokens: int | None = opt(None, "max_tokens of requests that set none; unset: the rest of the context.",
                                      ge=1)
    seed: int = opt(42, "Seed of the server's random stream; a request's own seed gets an engine call of its own.",
                     ge=0, le=2**63 - 1)
    debug: bool = opt(False, "Show tracebacks on errors.")

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.model:
            raise ConfigError("--model is required")
        self.engine = ENGINE_ALIASES.get(self.engine, self.engine)


@dataclass
class ReportConfig:
    """Options of ``winnow report``: the test-time scaling table and plots from outputs."""

    outputs: list[str] = opt(
        None, "Outputs to report on: raw JSONL (or Parquet) from `winnow sample --output_format raw`, any strategy, "
        "or a Qwen2.5-Math evaluation JSONL. Several: one strategy or run each.", factory=list, positional=True)
    output_dir: str | None = opt(None, "Where report.png, report.html and report.json go; unset: beside the first "
                                       "output.")
    label: list[str] = opt(None, "A label per output; unset: model, sampler and N from its manifest, else the "
                                 "file name.", factory=list)
    orm: str | None = opt(None, "Score key of the correctness verdict, value > 0 passes; unset: the manifest's "
                                "ORM.")
    rewards: list[str] = opt(None, "Score keys to rank (best-of-k) and weight votes by; unset: every PRM, RM and "
                                   "function reward of the manifest, or every non-ORM score.", factory=list)
    verdict: str = opt("orm", "Correctness from the ORM score (orm), or from winnow's math verifier against each "
                              "record's reference, run now (math).", choices=("orm", "math"))
    answer_match: str = opt("math", "How votes group final answers: math (math-verify equivalence) or exact (the "
                                    "same answer text).", choices=("math", "exact"))
    ties: str = opt("first", "A tied vote or tied best score goes to the sample seen first (first), or counts as "
                             "the mean of the tied ones (average).", choices=("first", "average"))
    max_k: int | None = opt(None, "Largest k in the table; unset: the most samples a problem has.", ge=1)
    draws: int = opt(200, "Majority votes: every k-subset of a problem's samples when there are at most this many, "
                           "else this many seeded random ones.", ge=1)
    bootstrap: int = opt(1000, "Bootstrap resamples of the problems for the 95% intervals (0: no intervals).", ge=0)
    seed: int = opt(0, "Seed of the subset draws and the bootstrap.")
    input_format: str = opt("auto", "Input format: raw, qwen_eval (Qwen2.5-Math eval JSONL) or auto (by the "
                                    "first line).", choices=("auto", "raw", "qwen_eval"))
    plots: bool = opt(True, "Write report.png and report.html (needs matplotlib: pip install 'winnow[report]').")
    debug: bool = opt(False, "Show tracebacks on errors.")

    def __post_init__(self) -> None:
        if not self.outputs:
            raise ConfigError("give at least one output: winnow report OUTPUT.jsonl [MORE.jsonl ...]")
        check_fields(self)
        if self.label and len(self.label) != len(self.outputs):
            raise ConfigError(f"--label takes one label per output: {len(self.outputs)} outputs, "
                              f"{len(self.label)} labels")


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
        allow_abbrev=False,
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
    """Options from a YAML file, keys normalised to snake_case."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def make_config(cls, values: dict[str, Any], source: str = "options"):
    """Build ``cls`` from a dict, naming any unknown key and any value of the wrong type."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
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
