"""Hub ids: ModelScope by default (swift's hub), Hugging Face with --use_hf, read from local cache layouts
offline; a hub that cannot be reached is one line within seconds. No hub is reachable from the test
machines, so every cache here is a real layout built on disk and every unreachable hub a closed
loopback port.
"""

from __future__ import annotations

import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.support.commands import run_winnow
from tests.support.files import read_jsonl, write_jsonl
from winnow import data, hub
from winnow.errors import ConfigError, DataError


@pytest.fixture
def closed_port():
    """A loopback port nothing listens on (connecting is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def fresh_hub(monkeypatch):
    monkeypatch.delenv("USE_HF", raising=False)
    hub.configure(False, None)
    yield
    hub.configure(False, None)


def tiny_copy(tiny_model: Path, dest: Path) -> Path:
    shutil.copytree(tiny_model, dest)
    return dest


def test_hub_loading_code_on_a_local_hub_layout(tmp_path, monkeypatch):
    """The hub path goes through the real ``datasets.load_dataset``; exercised on a local repo layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "hub" / "org" / "arith"
    (repo / "data").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist([{"problem": f"P{i}", "answer": str(i)} for i in range(5)]),
        repo / "data" / "train-00000-of-00001.parquet",
    )
    (source,) = [data._open_hub(data.DatasetSpec(path=str(repo), text=str(repo)))]
    assert len(source) == 5 and source.row(3) == {"problem": "P3", "answer": "3"}
    assert source.where(3) == f"{repo} row 3"
    # an id that is neither a local path nor loadable says both, for the hub it was read from
    from winnow import hub

    with pytest.raises(DataError, match="no-such-org/no-such-dataset: not in the ModelScope cache"):
        data.build_plan(["no-such-org/no-such-dataset#3"])
    hub.configure(use_hf=True)
    try:
        with pytest.raises(DataError, match="no local file or folder by that name"):
            data.build_plan(["no-such-org/no-such-dataset#3"])
    finally:
        hub.configure(use_hf=False)


@pytest.mark.parametrize(
    "layout",
    [
        "hub/models/{owner}/{safe}",
        "models/{owner}/{safe}",
        "{owner}/{name}",
        "hub/{owner}/{name}",
        "models/{owner}--{name}/snapshots/abc123",
    ],
)
def test_every_modelscope_cache_layout_is_found(tmp_path, monkeypatch, layout):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    folder = tmp_path / layout.format(owner="Qwen", name="Qwen2.5-0.5B", safe="Qwen2___5-0___5B")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert hub.modelscope_cached("Qwen/Qwen2.5-0.5B") == folder
    assert hub.model_dir("Qwen/Qwen2.5-0.5B") == str(folder)  # no network asked
    assert hub.modelscope_cached("Qwen/Other") is None


def test_a_snapshot_of_the_asked_revision_or_the_branch_ref(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    repo = tmp_path / "models" / "org--m"
    for rev in ("aaa", "bbb"):
        (repo / "snapshots" / rev).mkdir(parents=True)
        (repo / "snapshots" / rev / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "master").write_text("aaa")
    assert hub.modelscope_cached("org/m") == repo / "snapshots" / "aaa"
    assert hub.modelscope_cached("org/m", revision="bbb") == repo / "snapshots" / "bbb"
    assert hub.modelscope_cached("org/m", revision="ccc") is None


def test_an_unreachable_hub_is_one_line_within_seconds(tmp_path, monkeypatch, closed_port):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("MODELSCOPE_DOMAIN", closed_port)
    monkeypatch.setenv("HF_ENDPOINT", closed_port)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "MODELSCOPE_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    with pytest.raises(ConfigError) as e:
        hub.model_dir("LLM-Research/Meta-Llama-3-8B-Instruct")
    message = str(e.value)
    assert "ModelScope" in message and "LLM-Research/Meta-Llama-3-8B-Instruct" in message
    assert str(tmp_path) in message and "cannot be reached" in message and "--model /path/to/model_folder" in message
    assert "\n" not in message and "--use_hf true" in message
    hub.configure(True, None)
    with pytest.raises(ConfigError, match="not in the Hugging Face cache .* cannot be reached"):
        hub.model_dir("meta-llama/Llama-3.2-1B")
    assert time.monotonic() - started < 10


def test_offline_says_so_and_a_missing_library_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))
    monkeypatch.setenv("MODELSCOPE_OFFLINE", "1")
    with pytest.raises(ConfigError, match="offline"):
        hub.model_dir("Qwen/Qwen2.5-7B-Instruct")
    monkeypatch.delenv("MODELSCOPE_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with socket.socket() as listener:  # a hub that answers, and no modelscope library to talk to it
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("MODELSCOPE_DOMAIN", f"http://127.0.0.1:{listener.getsockname()[1]}")
        monkeypatch.setitem(sys.modules, "modelscope.hub.snapshot_download", None)
        with pytest.raises(ConfigError, match=r"pip install 'winnow\[modelscope\]'"):
            hub.model_dir("Qwen/Qwen2.5-7B-Instruct")


def test_winnow_sample_reads_a_modelscope_model_and_dataset_from_the_cache(tmp_path, tiny_model):
    cache = tmp_path / "ms"
    tiny_copy(tiny_model, cache / "models" / "my-org" / "tiny___chat")
    data = cache / "datasets" / "my-org" / "arith"
    for subset in ("easy", "hard"):
        (data / subset).mkdir(parents=True)
    write_jsonl(data / "easy" / "train.jsonl", [{"query": f"Count to {i}."} for i in range(3)])
    write_jsonl(data / "easy" / "test.jsonl", [{"query": "never read"}])
    write_jsonl(data / "hard" / "train.jsonl", [{"query": "not this subset"}])
    out = tmp_path / "out"
    proc = run_winnow(
        "sample",
        "--model",
        "my-org/tiny.chat",
        "--dataset",
        "my-org/arith:easy",
        "--num_return_sequences",
        "2",
        "--max_new_tokens",
        "4",
        "--output_dir",
        str(out),
        "--output_file",
        "o.jsonl",
        "--progress",
        "false",
        env={"MODELSCOPE_CACHE": str(cache), "MODELSCOPE_DOMAIN": "http://127.0.0.1:9"},
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(out / "o.jsonl")
    assert len(rows) == 6 and {r["messages"][0]["content"] for r in rows} == {f"Count to {i}." for i in range(3)}
    test_split = run_winnow(
        "sample",
        "--model",
        "my-org/tiny.chat",
        "--dataset",
        "my-org/arith:easy@test",
        "--num_return_sequences",
        "1",
        "--max_new_tokens",
        "2",
        "--output_dir",
        str(out),
        "--output_file",
        "t.jsonl",
        "--progress",
        "false",
        env={"MODELSCOPE_CACHE": str(cache)},
    )
    assert test_split.returncode == 0, test_split.stderr
    assert [r["messages"][0]["content"] for r in read_jsonl(out / "t.jsonl")] == ["never read"]
    missing = run_winnow(
        "sample",
        "--model",
        "my-org/nope",
        "--dataset",
        "my-org/arith:easy",
        "--output_dir",
        str(out),
        env={"MODELSCOPE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"},
    )
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "--model my-org/nope: not in the ModelScope cache" in missing.stderr


def test_use_hf_reads_the_hugging_face_cache(tmp_path, tiny_model):
    hf_cache = tmp_path / "hf"
    snapshot = tiny_copy(tiny_model, hf_cache / "models--my-org--tiny" / "snapshots" / "0123abcd")
    (hf_cache / "models--my-org--tiny" / "refs").mkdir()
    (hf_cache / "models--my-org--tiny" / "refs" / "main").write_text("0123abcd")
    dataset = write_jsonl(tmp_path / "d.jsonl", [{"query": "Count to 2."}])
    out = tmp_path / "out"
    env = {"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1", "MODELSCOPE_CACHE": str(tmp_path / "empty")}
    for flags, extra_env in ((["--use_hf", "true"], {}), ([], {"USE_HF": "1"})):
        proc = run_winnow(
            "sample",
            "--model",
            "my-org/tiny",
            *flags,
            "--dataset",
            str(dataset),
            "--max_new_tokens",
            "2",
            "--num_return_sequences",
            "1",
            "--output_dir",
            str(out),
            "--output_file",
            "o.jsonl",
            "--progress",
            "false",
            "--override_exist_file",
            "true",
            env={**env, **extra_env},
        )
        assert proc.returncode == 0, proc.stderr
        assert len(read_jsonl(out / "o.jsonl")) == 1
    assert snapshot.is_dir()
    # the same id on ModelScope (the default) is not there
    proc = run_winnow("sample", "--model", "my-org/tiny", "--dataset", str(dataset), "--output_dir", str(out), env=env)
    assert proc.returncode != 0 and "not in the ModelScope cache" in proc.stderr and "--use_hf true" in proc.stderr
