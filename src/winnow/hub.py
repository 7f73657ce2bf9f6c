"""Model and dataset ids on a hub: ModelScope by default (as swift), Hugging Face with ``--use_hf true``
or ``USE_HF=1``.

An id (``Qwen/Qwen2.5-7B-Instruct``, ``AI-ModelScope/alpaca-gpt4-data-en``) becomes a local folder:

1. already in the hub's local cache: that folder, without the network (every cache layout the
   ModelScope SDKs have written, and Hugging Face's ``snapshots/``);
2. else, when the hub answers a TCP connect within seconds: downloaded by the hub's own library
   (``modelscope`` for ModelScope, an optional extra; ``huggingface_hub`` for Hugging Face), with
   ``--model_revision`` and ``--hub_token``;
3. else one :class:`ConfigError` line: which hub, which id, where the cache was looked for, and how to
   pass a local folder instead. No library retry loop runs against a hub that cannot be reached.

A Hugging Face model that is not cached and whose hub answers is left as its id: transformers and
vLLM download what they need themselves.
"""

from __future__ import annotations

import inspect
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from winnow.errors import ConfigError, DataError

CONNECT_TIMEOUT_S = 3.0
_TRUE = ("1", "true", "yes", "on")
# weights in formats winnow's engines never read, left out of a ModelScope download
MODELSCOPE_IGNORE = ["*.gguf", "*.onnx", "*.h5", "*.msgpack", "*.ckpt"]


def _env_true(*names: str) -> bool:
    """Whether any of these environment variables holds a true value (1, true, yes, on)."""
    return any(os.environ.get(n, "").lower() in _TRUE for n in names)


@dataclass
class HubOptions:
    """The run's hub settings (``--use_hf``, ``--hub_token``); set once per run by :func:`configure`."""

    use_hf: bool = False
    token: str | None = None


_options = HubOptions(use_hf=_env_true("USE_HF"))


def configure(use_hf: bool | None = None, token: str | None = None) -> None:
    """The hub this process reads ids from: Hugging Face when ``use_hf`` or ``USE_HF`` is true, else
    ModelScope (swift's default)."""
    _options.use_hf = bool(use_hf) or _env_true("USE_HF")
    _options.token = token or None


def use_hf() -> bool:
    """Whether ids are read from Hugging Face (else ModelScope)."""
    return _options.use_hf


def token() -> str | None:
    return _options.token


HF_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
MODELSCOPE_OFFLINE_VARS = ("MODELSCOPE_OFFLINE", "HF_HUB_OFFLINE")


def hf_offline() -> bool:
    return _env_true(*HF_OFFLINE_VARS)


def unavailable_reason(endpoint: str, offline_vars: tuple[str, ...]) -> str | None:
    """Why a hub cannot be asked (one of ``offline_vars`` is set, or ``endpoint`` cannot be reached), or None
    when it answers."""
    if _env_true(*offline_vars):
        return f"offline ({' or '.join(v for v in offline_vars if _env_true(v))} is set)"
    return unreachable_reason(endpoint)


def unreachable_reason(endpoint: str) -> str | None:
    """Why ``endpoint`` cannot be reached (``"<endpoint> cannot be reached: <reason>"``), or None when its host
    accepts a TCP connection within :data:`CONNECT_TIMEOUT_S`."""
    url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=CONNECT_TIMEOUT_S):
            return None
    except TimeoutError:
        reason = f"no answer within {CONNECT_TIMEOUT_S:g} s"
    except socket.gaierror:
        reason = f"the name {url.hostname} does not resolve"
    except OSError as e:
        reason = e.strerror or type(e).__name__
    return f"{endpoint} cannot be reached ({reason})"


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _ms_endpoint() -> str:
    return os.environ.get("MODELSCOPE_DOMAIN", "https://www.modelscope.cn")


# ----------------------------------------------------------------------------- ModelScope's cache


def modelscope_cache_roots() -> list[Path]:
    """Where ModelScope SDKs keep their cache: ``MODELSCOPE_CACHE`` if set, else ``~/.cache/modelscope``
    (older SDKs: its ``hub`` folder)."""
    env = os.environ.get("MODELSCOPE_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "modelscope"
    return [base, base / "hub"]


def _non_empty(path: Path) -> bool:
    try:
        return path.is_dir() and any(path.iterdir())
    except OSError:
        return False


def modelscope_cached(repo_id: str, kind: str = "model", revision: str | None = None) -> Path | None:
    """The folder of ``repo_id`` in a ModelScope cache, in any layout an SDK wrote, or None.

    ``modelscope_hub`` (SDK 1.3x) writes ``{root}/{kind}s/{owner}--{name}/snapshots/{revision}``; earlier SDKs
    ``{root}/{kind}s/{owner}/{name}`` with dots in the name written ``___``, or ``{root}/{owner}/{name}``.
    With ``revision``, only a snapshot of that revision counts (the flat layouts do not say theirs).
    """
    if "/" not in repo_id:
        return None
    owner, name = repo_id.split("/", 1)
    safe = name.replace(".", "___")
    for root in modelscope_cache_roots():
        snapshots = root / f"{kind}s" / f"{owner}--{name}" / "snapshots"
        if snapshots.is_dir():
            wanted = revision or _ref(snapshots.parent, "master") or _ref(snapshots.parent, "main")
            candidates = [snapshots / wanted] if wanted else sorted(snapshots.iterdir(), key=_mtime, reverse=True)
            for snap in candidates:
                if _non_empty(snap):
                    return snap
        if revision:
            continue
        for path in (
            root / f"{kind}s" / owner / safe,
            root / f"{kind}s" / owner / name,
            root / owner / safe,
            root / owner / name,
        ):
            if _non_empty(path):
                return path
    return None


def _ref(repo: Path, branch: str) -> str | None:
    try:
        return (repo / "refs" / branch).read_text().strip() or None
    except OSError:
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# ----------------------------------------------------------------------------- Hugging Face's cache


def hf_cached(repo_id: str, kind: str = "model", revision: str | None = None) -> Path | None:
    """The snapshot folder of ``repo_id`` in the Hugging Face cache (``HF_HUB_CACHE``/``HF_HOME``), or None."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(
            snapshot_download(repo_id, repo_type=kind, revision=revision, local_files_only=True, token=_options.token)
        )
    except Exception:  # not cached (LocalEntryNotFoundError), or a malformed id
        return None


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:
        return "~/.cache/huggingface/hub"


# ----------------------------------------------------------------------------- ids to folders


def unavailable_error(what: str, repo_id: str, kind: str, hub: str, why: str, looked: str) -> ConfigError | DataError:
    """The one line for an id no cache holds and no hub can give (a DataError for a dataset, as every data
    problem is)."""
    local = "/path/to/model_folder" if kind == "model" else "/path/to/data.jsonl"
    other = "--use_hf false" if hub == "Hugging Face" else "--use_hf true"
    error = ConfigError if kind == "model" else DataError
    return error(
        f"{what} {repo_id}: not in the {hub} cache ({looked}) and {why}; pass a local folder "
        f"({what} {local}), download it where there is a network, or try the other hub ({other})"
    )


def model_dir(repo_id: str, what: str = "--model", revision: str | None = None) -> str:
    """A local folder for a model id on the run's hub, or (Hugging Face, not cached, hub answering) the id
    itself for transformers or vLLM to download."""
    if _options.use_hf:
        cached = hf_cached(repo_id, "model", revision)
        if cached is not None:
            return str(cached)
        why = unavailable_reason(hf_endpoint(), HF_OFFLINE_VARS)
        if why is not None:
            raise unavailable_error(what, repo_id, "model", "Hugging Face", why, _hf_cache_dir())
        return repo_id
    return _modelscope(repo_id, "model", what, revision)


def dataset_dir(repo_id: str, what: str = "--dataset", revision: str | None = None) -> Path:
    """A local folder holding a ModelScope dataset's files (the run reads them like a dataset folder)."""
    return Path(_modelscope(repo_id, "dataset", what, revision))


def _modelscope(repo_id: str, kind: str, what: str, revision: str | None) -> str:
    cached = modelscope_cached(repo_id, kind, revision)
    if cached is not None:
        return str(cached)
    looked = " or ".join(str(r) for r in modelscope_cache_roots())
    why = unavailable_reason(_ms_endpoint(), MODELSCOPE_OFFLINE_VARS)
    if why is not None:
        raise unavailable_error(what, repo_id, kind, "ModelScope", why, looked)
    try:
        import modelscope.hub.snapshot_download as ms
    except ImportError:
        raise ConfigError(
            f"{what} {repo_id}: a ModelScope id (swift's default hub) needs the modelscope library: "
            "pip install 'winnow[modelscope]'; or read it from Hugging Face with --use_hf true"
        ) from None
    download = ms.snapshot_download if kind == "model" else ms.dataset_snapshot_download
    kwargs: dict[str, Any] = {"revision": revision, "token": _options.token}
    if kind == "model":
        kwargs["ignore_patterns"] = MODELSCOPE_IGNORE
    accepted = inspect.signature(download).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted and v is not None}
    try:
        return str(download(repo_id, **kwargs))
    except Exception as e:  # the SDK raises many kinds: not found, no access, network
        raise ConfigError(
            f"{what} {repo_id}: ModelScope could not provide it ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300] if str(e) else ''}); check the id, --hub_token, or "
            f"pass a local folder"
        ) from None
