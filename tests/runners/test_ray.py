"""winnow sample on Ray: a real two-node Ray cluster on loopback (Ray's own cluster utilities: a head
node and a second node, each with one CPU and its own custom resource), engine replicas spread over
both, a replica killed with SIGKILL and a node removed mid-run, the driver killed and resumed.

One cluster serves the whole module and is torn down whatever happens; the test process is a driver
of it too, so that the in-process runs can watch and kill their replicas.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import ray

import winnow
from tests.support.commands import wait_for
from tests.support.fakeserver import FakeServer
from tests.support.files import read_jsonl, write_jsonl
from winnow.config import SampleConfig
from winnow.errors import ConfigError

NODE = {"num_cpus": 1, "object_store_memory": 100 * 2**20}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=False)
    try:
        c.client_port = free_port()  # Ray Client's server on the head: ray://127.0.0.1:PORT
        c.add_node(**NODE, resources={"head_node": 1}, include_dashboard=False, ray_client_server_port=c.client_port)
        c.add_node(**NODE, resources={"second_node": 1})
        ray.init(address=c.address, logging_level="ERROR")
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def server():
    with FakeServer().running() as s:
        yield s


def sums(path: Path, n: int) -> Path:
    return write_jsonl(path, [{"query": f"What is {i} + {i + 1}?", "k": i} for i in range(n)])


def client_options(server, dataset: Path, latency: float, n: int = 1, **more) -> dict:
    """A client-engine run against the loopback fake server, answers taking ``latency`` seconds, two
    requests in flight per engine (so a few replicas stay busy for a while)."""
    return dict(
        model=f"fake?latency={latency}",
        sampler_engine="client",
        dataset=[str(dataset)],
        num_return_sequences=n,
        engine_kwargs={"base_url": server.url},
        max_concurrency=2,
        output_file="o.jsonl",
        progress=False,
        **more,
    )


def outputs(folder: Path, name: str = "o.jsonl") -> tuple[list[dict], dict]:
    records = read_jsonl(folder / name)
    manifest = json.loads((folder / name.replace(".jsonl", ".manifest.json")).read_text())
    return records, manifest


def shape(records: list[dict]) -> tuple[collections.Counter, set]:
    """Lines per id, and the set of record key sets: what a Ray run must share with a plain one."""
    return collections.Counter(r["id"] for r in records), {tuple(sorted(r)) for r in records}


def row_ids(dataset: Path) -> set[str]:
    """The ids winnow gives the dataset's rows (what every run of it must write, once each)."""
    from winnow import data

    plan = data.build_plan([str(dataset)])
    return {plan.read(p).id for p in range(len(plan))}


def run_watched(config: SampleConfig, act=None) -> tuple[winnow.RunSummary, dict]:
    """``sample(config)`` on a Ray engine built here with every replica up (a run starts as soon as one
    is), while ``act(engine)`` runs in a thread (to kill a replica or a node); the summary and the
    engine's stats. The engine is closed whatever happens."""
    from winnow.pipeline import build_engine

    engine = build_engine(config)
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            if act is not None:
                act(engine)
        except BaseException as e:  # reported by the test, not lost in the thread
            errors.append(e)

    thread = threading.Thread(target=watch, daemon=True)
    try:
        ray.get([r.ready for r in engine.pool.replicas if r.ready is not None])
        thread.start()
        summary = winnow.sample(config, engine=engine)
        thread.join(60)
    finally:
        asyncio.run(engine.aclose())
    assert not errors, errors
    return summary, engine.stats()


def busy_replica(engine, at_least: int = 1, where: str | None = None):
    """A live replica with ``at_least`` calls in flight (on the node ``where``), once the run has
    written something, else None."""
    pool = engine.pool
    if sum(r.calls for r in pool.replicas) < 2:
        return None
    for r in pool.replicas:
        if r.status == "alive" and r.busy >= at_least and (where is None or r.node == where):
            return r
    return None


def test_options_are_checked_and_use_ray_is_an_alias(tmp_path):
    base = dict(model="m", dataset=["d.jsonl"])
    assert SampleConfig(**base, use_ray=True).ray is True
    with pytest.raises(ConfigError, match="--num_workers runs replicas on Ray: add --ray true"):
        SampleConfig(**base, num_workers=2)
    with pytest.raises(ConfigError, match="--ray_reward_workers runs replicas on Ray"):
        SampleConfig(**base, ray_reward_workers=1)
    with pytest.raises(ConfigError, match="--num_workers 0: must be at least 1"):
        SampleConfig(**base, ray=True, num_workers=0)
    with pytest.raises(ConfigError, match="--ray_scheduling 'round': not one of spread, pack"):
        SampleConfig(**base, ray=True, ray_scheduling="round")


def test_without_ray_one_line_names_the_extra_and_help_imports_no_ray(tmp_path):
    dataset = sums(tmp_path / "d.jsonl", 2)
    blocked = (
        "import sys; sys.modules['ray'] = None\nfrom winnow.cli import main\n"
        f"sys.exit(main(['sample', '--model', 'm', '--sampler_engine', 'client', '--dataset', '{dataset}', "
        f"'--output_dir', '{tmp_path / 'out'}', '--ray', 'true', '--num_workers', '2']))"
    )
    proc = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "winnow sample: error: ray is needed for --ray true but is not installed; install it with: "
        "pip install 'winnow[ray]'"
    ]
    light = (
        "import sys; from winnow.cli import main\ntry:\n    main(['sample', '--help'])\nexcept SystemExit:\n"
        "    pass\nprint('HEAVY', [m for m in ('ray', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out and "--num_workers" in out and "--ray_address" in out


def test_transformers_replicas_on_both_nodes_write_what_one_process_writes(tmp_path, cluster, tiny_model):
    dataset = sums(tmp_path / "d.jsonl", 16)
    common = dict(
        model=str(tiny_model),
        dataset=[str(dataset)],
        num_return_sequences=2,
        max_new_tokens=8,
        num_sampling_batch_size=1,
        output_file="o.jsonl",
        progress=False,
    )
    winnow.sample(SampleConfig(**common, output_dir=str(tmp_path / "plain")))
    summary, _ = run_watched(
        SampleConfig(**common, output_dir=str(tmp_path / "ray"), ray=True, num_workers=2, ray_address=cluster.address)
    )
    plain, _ = outputs(tmp_path / "plain")
    records, manifest = outputs(tmp_path / "ray")
    assert shape(records) == shape(plain)
    assert summary.status == "finished" and summary.groups_written == 16 and summary.records_written == 32
    stats = manifest["engine_stats"]["ray"]
    assert stats["replicas"] == 2 and stats["nodes"] == 2 and stats["calls_redone"] == 0
    assert all(r["calls"] >= 1 for r in stats["per_replica"]), stats  # both took work
    assert sum(r["samples"] for r in stats["per_replica"]) == 32
    assert manifest["engine"]["name"] == "ray" and manifest["engine"]["engine"]["name"] == "transformers"
    assert "ray: 2 replicas on 2 nodes" in summary.line()


def test_client_replicas_on_both_nodes_write_what_one_process_writes(tmp_path, cluster, server):
    dataset = sums(tmp_path / "d.jsonl", 40)
    common = client_options(server, dataset, latency=0.02, n=2)
    winnow.sample(SampleConfig(**common, output_dir=str(tmp_path / "plain")))
    _, stats = run_watched(
        SampleConfig(**common, output_dir=str(tmp_path / "ray"), ray=True, num_workers=2, ray_address=cluster.address)
    )
    plain, _ = outputs(tmp_path / "plain")
    records, _ = outputs(tmp_path / "ray")
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(records, key=key) == sorted(plain, key=key)  # the fake server answers alike: equal records
    assert stats["ray"]["nodes"] == 2 and all(r["calls"] >= 1 for r in stats["ray"]["per_replica"])
    assert stats["replica_engines"]["requests"] == 40  # the replicas' own counters, added up


def test_a_driver_elsewhere_joins_through_ray_client(tmp_path, cluster, server):
    dataset = sums(tmp_path / "d.jsonl", 12)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "winnow",
            "sample",
            "--sampler_engine",
            "client",
            "--model",
            "fake",
            "--dataset",
            str(dataset),
            "--num_return_sequences",
            "2",
            "--engine_kwargs",
            json.dumps({"base_url": server.url}),
            "--output_dir",
            str(tmp_path),
            "--output_file",
            "o.jsonl",
            "--progress",
            "false",
            "--ray",
            "true",
            "--ray_address",
            f"ray://127.0.0.1:{cluster.client_port}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    records, manifest = outputs(tmp_path)
    ids, _ = shape(records)
    assert len(ids) == 12 and set(ids.values()) == {2}
    assert manifest["engine"]["address"].startswith("ray://")
    assert "Traceback" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr


def test_reward_model_replicas_score_as_the_driver_does(tmp_path, cluster, tiny_model, tiny_classifier_rm):
    dataset = sums(tmp_path / "d.jsonl", 6)
    common = dict(
        model=str(tiny_model),
        dataset=[str(dataset)],
        num_return_sequences=2,
        max_new_tokens=6,
        temperature=0.0,
        num_sampling_batch_size=2,
        reward_model=[str(tiny_classifier_rm)],
        output_format="raw",
        output_file="o.jsonl",
        progress=False,
    )
    winnow.sample(SampleConfig(**common, output_dir=str(tmp_path / "plain")))
    winnow.sample(
        SampleConfig(
            **common,
            output_dir=str(tmp_path / "ray"),
            ray=True,
            ray_address=cluster.address,
            ray_num_cpus_per_worker=0.5,
            ray_reward_workers=2,
            ray_num_cpus_per_reward_worker=0.5,
        )
    )
    plain, _ = outputs(tmp_path / "plain")
    records, manifest = outputs(tmp_path / "ray")

    def scores(rows):
        return {(r["id"], c["text"]): c["scores"] for r in rows for c in r["completions"]}

    want, got = scores(plain), scores(records)
    assert got.keys() == want.keys() and len(got) == 6  # greedy: the same texts
    for k, s in want.items():
        (name,) = s
        assert got[k][name]["value"] == pytest.approx(s[name]["value"], rel=1e-4, abs=1e-5)
    (reward,) = manifest["rewards"]
    assert reward["ray"]["num_workers"] == 2 and reward["ray"]["replica"]["num_cpus"] == 0.5


def test_a_replica_killed_mid_run_costs_only_its_calls(tmp_path, cluster, tiny_model):
    dataset = sums(tmp_path / "d.jsonl", 30)
    config = SampleConfig(
        model=str(tiny_model),
        dataset=[str(dataset)],
        num_return_sequences=2,
        max_new_tokens=24,
        num_sampling_batch_size=1,
        output_dir=str(tmp_path),
        output_file="o.jsonl",
        progress=False,
        ray=True,
        num_workers=2,
        ray_address=cluster.address,
    )
    killed = []

    def kill(engine) -> None:
        wait_for(lambda: busy_replica(engine, at_least=2) is not None, what="a replica with two calls in flight")
        victim = busy_replica(engine, at_least=2)
        os.kill(victim.pid, signal.SIGKILL)
        killed.append(victim.pid)

    summary, stats = run_watched(config, kill)
    records, _ = outputs(tmp_path)
    ids, _ = shape(records)
    assert killed and summary.status == "finished"
    assert set(ids) == row_ids(dataset) and set(ids.values()) == {2}  # every row, none twice
    ray_stats = stats["ray"]
    assert ray_stats["calls_redone"] >= 1, ray_stats
    assert summary.rows_failed == 0 and summary.samples == 60


def test_a_killed_replica_is_restarted_and_takes_calls_again(tmp_path, cluster, server):
    dataset = sums(tmp_path / "d.jsonl", 100)
    config = SampleConfig(
        **client_options(server, dataset, latency=0.2),
        output_dir=str(tmp_path),
        ray=True,
        num_workers=2,
        ray_address=cluster.address,
    )
    seen = {}

    def kill_and_wait(engine) -> None:
        wait_for(lambda: busy_replica(engine) is not None, what="a busy replica")
        victim = busy_replica(engine)
        seen.update(index=victim.index, pid=victim.pid)
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(lambda: victim.status == "alive" and victim.pid != seen["pid"], what="the restarted replica")
        seen["calls_when_back"] = victim.calls

    summary, stats = run_watched(config, kill_and_wait)
    ids, _ = shape(outputs(tmp_path)[0])
    assert set(ids) == row_ids(dataset) and set(ids.values()) == {1}
    back = stats["ray"]["per_replica"][seen["index"]]
    assert back["restarts"] == 1 and back["status"] == "alive" and back["pid"] != seen["pid"]
    assert back["calls"] > seen["calls_when_back"], "the restarted replica took calls again"
    assert stats["ray"]["calls_redone"] >= 1 and "1 restarts" in summary.line()


def test_no_replica_left_is_one_error_and_the_output_resumes_without_ray(tmp_path, cluster, server):
    from winnow.errors import EngineError

    dataset = sums(tmp_path / "d.jsonl", 60)
    common = client_options(server, dataset, latency=0.1, output_dir=str(tmp_path))
    config = SampleConfig(**common, ray=True, num_workers=1, ray_max_restarts=0, ray_address=cluster.address)

    def kill(engine) -> None:
        wait_for(lambda: busy_replica(engine) is not None, what="a busy replica")
        os.kill(busy_replica(engine).pid, signal.SIGKILL)

    with pytest.raises(EngineError, match=r"every engine replica is lost \(0: .*\)\. What was written is kept"):
        run_watched(config, kill)
    records, manifest = outputs(tmp_path)
    assert manifest["status"] == "failed" and "every engine replica is lost" in manifest["error"]
    assert 2 <= len(records) < 60
    # Ray options are not part of the fingerprint: the same output resumes in one process
    summary = winnow.sample(SampleConfig(**common, resume=True))
    assert summary.status == "finished"
    assert sorted(r["k"] for r in read_jsonl(tmp_path / "o.jsonl")) == list(range(60))


def test_a_node_removed_mid_run_costs_only_its_calls(tmp_path, cluster, server):
    dataset = sums(tmp_path / "d.jsonl", 60)
    # answers slow enough (about 5 s of work) that the run is still going when Ray has seen the node go
    common = client_options(server, dataset, latency=0.3)
    winnow.sample(SampleConfig(**common, output_dir=str(tmp_path / "plain")))
    config = SampleConfig(
        **common, output_dir=str(tmp_path / "ray"), ray=True, num_workers=2, ray_address=cluster.address, ray_wait_s=60
    )
    second = next(n for n in cluster.worker_nodes)

    def remove(engine) -> None:
        wait_for(
            lambda: busy_replica(engine, where=second.node_id) is not None, what="work on the second node's replica"
        )
        cluster.remove_node(second, allow_graceful=False)

    try:
        summary, stats = run_watched(config, remove)
    finally:
        if second not in cluster.worker_nodes:  # give the module its second node back
            cluster.add_node(**NODE, resources={"second_node": 1})
    plain, _ = outputs(tmp_path / "plain")
    records, _ = outputs(tmp_path / "ray")
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(records, key=key) == sorted(plain, key=key)
    assert summary.status == "finished" and summary.rows_failed == 0
    ray_stats = stats["ray"]
    # the lost replica's calls were redone; it is gone, or Ray restarted it on the node that is left
    assert ray_stats["calls_redone"] >= 1, ray_stats
    assert ray_stats["alive"] == 1 or ray_stats["restarts"] >= 1, ray_stats


def test_a_killed_driver_resumes_with_nothing_lost_or_doubled(tmp_path, cluster, server):
    dataset = sums(tmp_path / "d.jsonl", 80)
    out = tmp_path / "out"
    args = [
        "sample",
        "--sampler_engine",
        "client",
        "--model",
        "fake?latency=0.1",
        "--dataset",
        str(dataset),
        "--num_return_sequences",
        "1",
        "--engine_kwargs",
        json.dumps({"base_url": server.url}),
        "--max_concurrency",
        "2",
        "--output_dir",
        str(out),
        "--output_file",
        "o.jsonl",
        "--progress",
        "false",
        "--ray",
        "true",
        "--num_workers",
        "2",
        "--ray_address",
        cluster.address,
    ]
    driver = subprocess.Popen(
        [sys.executable, "-m", "winnow", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(
            lambda: (out / "o.jsonl").exists() and len(read_jsonl(out / "o.jsonl")) >= 10 or driver.poll() is not None,
            what="the first lines",
        )
        assert driver.poll() is None, driver.stderr.read()
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait(30)
    first = len(read_jsonl(out / "o.jsonl"))
    assert 10 <= first < 80
    again = subprocess.run(
        [sys.executable, "-m", "winnow", *args, "--resume", "true"], capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr
    records = read_jsonl(out / "o.jsonl")
    assert sorted(r["k"] for r in records) == list(range(80))  # nothing lost, nothing twice
    done = int(re.search(r"(\d+) rows already done", again.stderr)[1])
    assert 0 < done <= first and "ray: 2 replicas" in again.stderr
