"""The code sandbox: ordinary runs, and hostile programs that must end within their limits, with a
verdict, leaving no process and no file behind, in each isolation mode this machine offers.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import socket
import subprocess

import pytest

from tests.support import TESTS
from tests.support.hostile_programs import (
    EXPECTED_LIMIT,
    LIMITS,
    new_marker,
    outside_targets,
    processes_with,
    program,
    sandbox_folders,
)
from winnow.rewards import sandbox
from winnow.rewards.sandbox import Limits, Sandbox, run_python

ROOT = os.geteuid() == 0

SRC = TESTS.parent / "src"

SLACK_S = 3.0  # start-up and teardown on two busy cores


def modes():
    """Every isolation mode to test here: the fallback always (its hostile cases need root), namespaces if available."""
    return [
        pytest.param(
            "namespaces",
            marks=pytest.mark.skipif(
                sandbox.isolation() != "namespaces", reason="no namespaces here: not root, or unshare is forbidden"
            ),
        ),
        pytest.param(
            "none",
            marks=pytest.mark.skipif(
                not ROOT, reason="without root the fallback has no per-run uid: hostile programs are not contained"
            ),
        ),
    ]


@pytest.fixture(autouse=True)
def no_folders_left():
    before = sandbox_folders()
    yield
    assert sandbox_folders() <= before, "a sandbox run left its temporary folder"


def hostile(name: str, mode: str, marker: str, **kwargs):
    result = run_python(program(name, marker, **kwargs), limits=LIMITS, isolation_mode=mode)
    assert result.error is None, result.error
    assert result.duration_s < LIMITS.timeout_s + SLACK_S, f"{name} ran {result.duration_s:.1f}s"
    assert processes_with(marker) == [], f"{name} left processes behind"
    return result


NON_ROOT_CHECK = """
import json, sys
from winnow.rewards import sandbox
import hostile_programs as h
out = {"isolation": sandbox.isolation()}
for name in ("daemon", "orphan_child", "infinite_loop"):
    marker = h.new_marker()
    r = sandbox.run_python(h.program(name, marker), limits=h.LIMITS)
    out[name] = [r.limit or r.exit_code, h.processes_with(marker)]
print(json.dumps(out))
"""


def test_ordinary_run_reports_output_stdin_and_exit_code():
    result = run_python(
        "import sys\nname = input()\nprint('hello', name)\nsys.stderr.write('warn')\nsys.exit(3)", stdin="world\n"
    )
    assert (result.stdout, result.stderr, result.exit_code) == ("hello world\n", "warn", 3)
    assert not result.timed_out and result.limit is None and not result.ok
    assert result.cpu_s is not None and result.max_rss_mb > 1
    assert run_python("print(sum(range(10)))").ok


def test_no_stdin_means_end_of_file():
    result = run_python("input('number? ')")
    assert "EOFError" in result.stderr and result.exit_code == 1


@pytest.mark.parametrize("mode", modes())
def test_environment_is_scrubbed_and_work_dir_fresh(mode, monkeypatch):
    monkeypatch.setenv("WINNOW_TEST_SECRET", "hunter2-secret")
    result = run_python(
        "import os\nprint(sorted(os.environ))\nprint(os.listdir('.'))\nprint(os.getcwd())", isolation_mode=mode
    )
    names, files, cwd = result.stdout.splitlines()
    assert "WINNOW_TEST_SECRET" not in names and ast.literal_eval(names) == sorted(
        ["PATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"]
    )
    assert ast.literal_eval(files) == ["main.py"]
    assert (cwd == "/tmp") if mode == "namespaces" else ("winnow-sandbox-" in cwd)


@pytest.mark.parametrize("mode", modes())
@pytest.mark.parametrize("name", ["infinite_loop", "fork_bomb", "memory_bomb", "output_flood", "big_file"])
def test_hostile_program_hits_its_limit(name, mode):
    result = hostile(name, mode, new_marker())
    assert result.limit == EXPECTED_LIMIT[name], (result.limit, result.stderr[-500:])
    assert result.timed_out == (EXPECTED_LIMIT[name] == "timeout")
    if name == "output_flood":
        assert len(result.stdout) == LIMITS.max_output_bytes


@pytest.mark.parametrize("mode", modes())
def test_cpu_limit_stops_a_busy_program_before_the_wall_clock(mode):
    result = run_python("while True:\n    pass", limits=Limits(timeout_s=20, cpu_s=1), isolation_mode=mode)
    assert result.limit == "cpu" and result.signal is not None and not result.timed_out
    assert result.duration_s < 10


@pytest.mark.parametrize("mode", modes())
@pytest.mark.parametrize("name", ["daemon", "orphan_child"])
def test_processes_that_outlive_the_program_are_killed(name, mode):
    marker = new_marker()
    result = hostile(name, mode, marker)
    assert result.exit_code == 0 and result.stdout == "parent done\n" and not result.timed_out


@pytest.mark.parametrize("mode", modes())
def test_nothing_is_written_outside_the_sandbox(mode, tmp_path):
    marker = new_marker()
    targets = outside_targets(marker, [tmp_path])
    result = hostile("write_outside", mode, marker, targets=targets)
    assert result.exit_code == 0
    assert [t for t in targets if os.path.exists(t)] == []
    refused = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("refused")}
    assert str(tmp_path / marker) in refused  # the caller's own folders are never writable


@pytest.mark.parametrize("mode", modes())
def test_no_secret_from_the_parent_environment(mode, monkeypatch):
    monkeypatch.setenv("WINNOW_TEST_SECRET", "hunter2-secret")
    result = hostile("env_secrets", mode, new_marker())
    assert result.exit_code == 0 and "PATH" in result.stdout
    assert "hunter2-secret" not in result.stdout


@pytest.mark.parametrize("network", [False, True])
def test_no_network_in_namespaces(network):
    if sandbox.isolation() != "namespaces":
        pytest.skip("no namespaces here: the network cannot be cut off (docs/code.md)")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    try:
        marker = new_marker()
        result = run_python(
            program("socket", marker, port=server.getsockname()[1]),
            limits=Limits(timeout_s=5, network=network),
            isolation_mode="namespaces",
        )
        if network:
            assert result.ok and result.stdout == "connected\n"
            conn, _ = server.accept()
            conn.close()
        else:
            assert result.exit_code == 1 and "Network is unreachable" in result.stderr
            with pytest.raises(BlockingIOError):
                server.accept()  # no connection ever arrived
    finally:
        server.close()


def test_namespaces_give_a_private_process_table():
    if sandbox.isolation() != "namespaces":
        pytest.skip("no namespaces here")
    result = run_python(
        "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\nprint(os.getuid())"
    )
    pids, uid = result.stdout.splitlines()
    assert ast.literal_eval(pids) == [1, 2]  # the launcher (PID 1) and the program
    assert int(uid) >= sandbox.UID_BASE


def test_pool_runs_concurrently_and_keeps_order():
    box = Sandbox(Limits(timeout_s=10), workers=2)
    try:
        results = box.map([f"print({i} * {i})" for i in range(6)])
        assert [r.stdout.strip() for r in results] == [str(i * i) for i in range(6)]

        async def both():
            return await asyncio.gather(box.arun("print(input())", stdin="a\n"), box.arun("print('b')"))

        assert [r.stdout for r in asyncio.run(both())] == ["a\n", "b\n"]
        assert box.describe()["workers"] == 2 and box.describe()["isolation"] == sandbox.isolation()
    finally:
        box.close()


def test_large_stdin_and_output_pass_through():
    data = "".join(f"{i}\n" for i in range(100_000))
    result = run_python(
        "import sys\nsys.stdout.write(sys.stdin.read())", stdin=data, limits=Limits(max_output_bytes=1 << 21)
    )
    assert result.ok and result.stdout == data


@pytest.mark.skipif(not ROOT or not shutil.which("setpriv"), reason="needs root and setpriv to become another user")
def test_fallback_run_by_an_unprivileged_user_still_clears_what_programs_leave():
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{SRC}:{TESTS / 'support'}", "LANG": "C.UTF-8"}
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sandbox.default_python(), "-c", NON_ROOT_CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out == {"isolation": "none", "daemon": [0, []], "orphan_child": [0, []], "infinite_loop": ["timeout", []]}
