"""Run untrusted Python in a sandbox: ``run_python(code, stdin=...) -> RunResult``, and :class:`Sandbox`
for many runs at once (a bounded pool, sync and async).

Each run is a fresh interpreter (``python -I``) started through a small launcher
(``_sandbox_launch.py``) in its own session, with a scrubbed environment (a minimal PATH and locale,
HOME and TMPDIR in the working directory), stdin from the caller or empty, stdout and stderr
captured up to a cap, and these limits (:class:`Limits`):

- wall clock: past ``timeout_s`` the run is killed (SIGKILL), every process of it;
- ``RLIMIT_CPU`` (SIGXCPU), ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (one file's size),
  ``RLIMIT_CORE`` 0 (no core files), ``RLIMIT_NOFILE``, and no new privileges (setuid binaries
  do not elevate);
- as root, every run has its own unprivileged uid, so ``RLIMIT_NPROC`` (per uid) caps the processes
  and threads of that run alone (for root itself the limit would not apply at all), and the program
  can write only where any user can;
- where the machine allows it (root, ``unshare`` permitted: :func:`isolation` says ``"namespaces"``),
  new mount, network, PID and IPC namespaces: no network (only a down loopback), every mount
  read-only, a size-capped tmpfs as the working directory (also on /tmp, /var/tmp, /dev/shm), a
  /proc that shows only the run, and the program as a child of PID 1, so when the run ends the
  kernel kills every process it left and the tmpfs disappears with them.

Without namespaces (``isolation() == "none"``: not root, or a container that forbids ``unshare``)
the network is open, the working directory is a temporary folder removed after the run, and the
launcher is a child subreaper that kills and reaps everything the program left (daemons included)
before it reports; as root, what the run's uid wrote in /tmp, /var/tmp and /dev/shm is removed too.
See docs/code.md for exactly what holds where.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from winnow.errors import RewardError

LAUNCHER = str(Path(__file__).with_name("_sandbox_launch.py"))
# Per-run uids (as root): above the usual system and subordinate-uid ranges, spaced by our pid so two
# winnow processes on one machine do not share them.
UID_BASE = 1_000_000_000
UIDS_PER_PROCESS = 64
MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Limits:
    """What one run may use."""

    timeout_s: float = 10.0  # wall clock, interpreter start included
    cpu_s: float | None = None  # CPU seconds (RLIMIT_CPU); None: timeout_s rounded up
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    file_size_mb: int = 16  # largest file the program may write (RLIMIT_FSIZE)
    disk_mb: int = 64  # the tmpfs working directory (namespaces only)
    max_processes: int = 16  # processes and threads of the run's uid (RLIMIT_NPROC; root only)
    max_output_bytes: int = 1 << 20  # per stream; past it the run is killed and its output cut
    network: bool = False  # True: keep the host's network (no network namespace)


@dataclass
class RunResult:
    """How one run ended."""

    stdout: str
    stderr: str
    exit_code: int | None  # None when a signal ended it or it never ran
    signal: int | None = None  # the signal that ended the program, if one did
    timed_out: bool = False
    # the limit it hit, as far as can be told: timeout, cpu, memory, file_size, disk, processes, output
    limit: str | None = None
    duration_s: float = 0.0
    cpu_s: float | None = None
    max_rss_mb: float | None = None
    error: str | None = None  # the sandbox itself failed: nothing can be concluded about the program

    @property
    def ok(self) -> bool:
        """Exited 0, in time, with the sandbox working."""
        return self.exit_code == 0 and not self.timed_out and self.error is None and self.limit is None


# ----------------------------------------------------------------------------- uids and isolation

_uid_lock = threading.Lock()
_uids_free: list[int] = []
_uids_made = 0
_uids_pid = os.getpid()  # a forked copy of this process must not reuse its parent's uids


@contextlib.contextmanager
def _run_uid():
    """(uid, clean): a uid no other live run of this process uses (None when not root: runs keep the
    caller's uid), and a flag the run sets to ``[False]`` when processes of the uid could not be cleared:
    the uid is then never handed out again (its leftovers would count against the next run's limit)."""
    global _uids_made, _uids_free, _uids_pid
    if os.geteuid() != 0:
        yield None, [True]
        return
    with _uid_lock:
        if _uids_pid != os.getpid():
            _uids_free, _uids_made, _uids_pid = [], 0, os.getpid()
        if _uids_free:
            uid = _uids_free.pop()
        elif _uids_made < UIDS_PER_PROCESS:
            uid = UID_BASE + os.getpid() * UIDS_PER_PROCESS + _uids_made  # pids stay below 2**22
            _uids_made += 1
        else:
            raise RewardError(
                f"more than {UIDS_PER_PROCESS} sandbox runs at once in one process, "
                "or too many uids retired after runs whose processes could not be cleared"
            )
    clean = [True]
    try:
        yield uid, clean
    finally:
        if clean[0]:
            with _uid_lock:
                _uids_free.append(uid)


@functools.lru_cache(maxsize=1)
def _setup() -> tuple[str, str]:
    """(isolation, interpreter): the strongest isolation a probe run works in, with the first Python
    the run's uid can start (as root, winnow's own may sit where a fresh uid cannot read it)."""
    system = shutil.which("python3", path=MINIMAL_PATH)
    pythons = [sys.executable, *([system] if system and system != sys.executable else [])]
    modes = ["namespaces", "none"] if os.geteuid() == 0 and sys.platform.startswith("linux") else ["none"]
    errors = []
    for mode in modes:
        for python in pythons:
            probe = _run("print(6 * 7)", None, Limits(timeout_s=30), namespaces=mode == "namespaces", python=python)
            if probe.ok and probe.stdout.strip() == "42":
                return mode, python
            errors.append(f"{mode} with {python}: {probe.error or probe.stderr.strip()[-200:] or probe.exit_code}")
    raise RewardError(
        "the code sandbox cannot start Python here (" + "; ".join(errors) + "); "
        'pass an interpreter every user can run: --reward_kwargs \'{"code": {"python": PATH}}\''
    )


def isolation() -> str:
    """``"namespaces"`` when a probe run in new namespaces works here, else ``"none"`` (see the module doc)."""
    return _setup()[0]


def default_python() -> str:
    """The interpreter programs run with unless one is given."""
    return _setup()[1]


# ----------------------------------------------------------------------------- one run


def _rlimits(limits: Limits, uid: int | None) -> dict[str, list[int]]:
    cpu = math.ceil(limits.cpu_s if limits.cpu_s is not None else limits.timeout_s)
    mb = 1 << 20
    out = {
        "RLIMIT_CPU": [cpu, cpu + 1],  # SIGXCPU at the soft limit, SIGKILL a second later
        "RLIMIT_AS": [limits.memory_mb * mb] * 2,
        "RLIMIT_FSIZE": [limits.file_size_mb * mb] * 2,
        "RLIMIT_CORE": [0, 0],
        "RLIMIT_NOFILE": [256, 256],
    }
    if uid is not None:  # per uid: only meaningful for a uid of the run's own
        out["RLIMIT_NPROC"] = [limits.max_processes] * 2
    return out


def _kill_uid(uid: int, wait_s: float = 2.0) -> bool:
    """SIGKILL every process of ``uid``; True once none is left, dead ones waiting to be reaped included
    (without namespaces, the only way to catch a process that left the run's process group)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = False
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if entry.stat().st_uid == uid:
                        found = True
                        os.kill(int(entry.name), signal.SIGKILL)
        if not found:
            return True
        if time.monotonic() > deadline:  # zombies the machine's init does not reap
            return False
        time.sleep(0.005)


def _remove_uid_files(uid: int) -> None:
    """Without namespaces: remove what the run's uid left in the world-writable folders."""
    for folder in ("/tmp", "/var/tmp", "/dev/shm"):
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid == uid:
                        if entry.is_dir(follow_symlinks=False):
                            shutil.rmtree(entry.path, ignore_errors=True)
                        else:
                            os.unlink(entry.path)


def _limit_from(stderr: str, sig: int | None) -> str | None:
    """Which limit ended the program, from its signal or the last lines of its traceback."""
    if sig == signal.SIGXCPU:
        return "cpu"
    if sig == signal.SIGXFSZ:
        return "file_size"
    tail = stderr[-2000:]
    if "MemoryError" in tail:
        return "memory"
    if "File too large" in tail:  # Python ignores SIGXFSZ: the write fails with EFBIG instead
        return "file_size"
    if "No space left on device" in tail:
        return "disk"
    if "Resource temporarily unavailable" in tail and ("fork" in tail or "thread" in tail):
        return "processes"
    return None


def _collect(
    proc: subprocess.Popen, status_fd: int, stdin: bytes | None, deadline: float, cap: int
) -> tuple[bytes, bytes, list[dict], str | None]:
    """Feed stdin and read the outputs and the launcher's status until the run ends or breaks a limit."""
    assert proc.stdout is not None and proc.stderr is not None  # started with stdout=stderr=PIPE
    out = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    messages = bytearray()
    sel = selectors.DefaultSelector()
    for fd in (*out, status_fd):
        sel.register(fd, selectors.EVENT_READ)
    pending = memoryview(stdin or b"")
    stdin_fd = proc.stdin.fileno() if proc.stdin is not None else None
    if stdin_fd is not None:
        os.set_blocking(stdin_fd, False)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
    broke = None
    status_open = True
    while status_open:
        left = deadline - time.monotonic()
        if left <= 0:
            broke = "timeout"
            break
        for key, _ in sel.select(left):
            fd = key.fd
            if fd == stdin_fd:
                try:
                    pending = pending[os.write(fd, pending[:65536]) :]
                except (BlockingIOError, InterruptedError):
                    continue
                except BrokenPipeError:
                    pending = pending[:0]
                if not pending:
                    sel.unregister(fd)
                    assert proc.stdin is not None  # stdin_fd is only set when there is a stdin pipe
                    proc.stdin.close()
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                sel.unregister(fd)
                status_open = status_open and fd != status_fd
            elif fd == status_fd:
                messages += chunk
            else:
                out[fd] += chunk
                if len(out[fd]) > cap:
                    broke = "output"
        if broke:
            break
    # the program has ended (or is about to be killed): take what is already in the pipes, no more
    ready = True
    while ready and not broke:
        ready = False
        for key, _ in sel.select(0):
            if key.fd in out and (chunk := os.read(key.fd, 65536)):
                out[key.fd] += chunk
                ready = True
            elif key.fd in out:
                sel.unregister(key.fd)
    sel.close()
    if proc.stdin is not None and not proc.stdin.closed:
        proc.stdin.close()
    parsed = [json.loads(line) for line in messages.decode(errors="replace").splitlines() if line.startswith("{")]
    stdout, stderr = (bytes(out[f.fileno()][:cap]) for f in (proc.stdout, proc.stderr))
    return stdout, stderr, parsed, broke


def _end(proc: subprocess.Popen, messages: list[dict], broke: str | None, namespaces: bool) -> None:
    """Make sure every process of the run is gone before returning."""
    if broke:
        # the supervisor clears the rest: the kernel when PID 1 of the namespace dies, else the launcher.
        # (With namespaces program_pid is a pid inside them: meaningless, even dangerous, out here.)
        key = "init_pid" if namespaces else "program_pid"
        target = next((m[key] for m in messages if key in m), None)
        if target is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGKILL)
    try:
        proc.wait(timeout=10)
        return
    except subprocess.TimeoutExpired:
        pass
    # the launcher is not reaped yet, so no other process group can have taken its id
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run(code: str, stdin: str | bytes | None, limits: Limits, *, namespaces: bool, python: str) -> RunResult:
    start = time.monotonic()
    with _run_uid() as (uid, clean), tempfile.TemporaryDirectory(prefix="winnow-sandbox-") as folder:
        os.chmod(folder, 0o711)  # without namespaces the run's uid works in folder/work
        program = Path(folder, "program.py")
        program.write_text(code, encoding="utf-8")
        workdir = os.path.join(folder, "work")
        os.mkdir(workdir, 0o700)
        home = "/tmp" if namespaces else workdir
        env = {
            "PATH": MINIMAL_PATH,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": home,
            "TMPDIR": home,
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        status_r, status_w = os.pipe()
        cfg = {
            "program": str(program),
            "python": python,
            "uid": uid,
            "namespaces": namespaces,
            "network": limits.network,
            "disk_mb": limits.disk_mb,
            "workdir": workdir,
            "status_fd": status_w,
            "rlimits": _rlimits(limits, uid),
        }
        data = stdin.encode() if isinstance(stdin, str) else stdin
        try:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", LAUNCHER, json.dumps(cfg)],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.PIPE if data else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    pass_fds=(status_w,),
                    start_new_session=True,
                )
            finally:
                os.close(status_w)
            with proc:
                stdout, stderr, messages, broke = _collect(
                    proc, status_r, data, start + limits.timeout_s, limits.max_output_bytes
                )
                _end(proc, messages, broke, namespaces)
        finally:
            os.close(status_r)
            if uid is not None and not namespaces:
                clean[0] = _kill_uid(uid)
                _remove_uid_files(uid)
    return _result(stdout, stderr, messages, broke, time.monotonic() - start)


def _result(stdout: bytes, stderr: bytes, messages: list[dict], broke: str | None, duration: float) -> RunResult:
    out, err = stdout.decode(errors="replace"), stderr.decode(errors="replace")
    result = RunResult(out, err, exit_code=None, duration_s=duration, timed_out=broke == "timeout", limit=broke)
    final = next((m for m in messages if "status" in m or "error" in m), None)
    if broke:
        return result
    if final is None:
        result.error = "the sandbox launcher ended without a report: " + err[-500:]
    elif "error" in final:
        result.error = final["error"]
    else:
        status = final["status"]
        result.cpu_s = final["cpu_s"]
        result.max_rss_mb = final["maxrss_kb"] / 1024
        if os.WIFSIGNALED(status):
            result.signal = os.WTERMSIG(status)
        else:
            result.exit_code = os.WEXITSTATUS(status)
        if result.exit_code != 0:
            result.limit = _limit_from(err, result.signal)
    return result


def run_python(
    code: str,
    *,
    stdin: str | bytes | None = None,
    limits: Limits | None = None,
    isolation_mode: str | None = None,
    python: str | None = None,
) -> RunResult:
    """Run ``code`` as a Python program in the sandbox and say how it ended.

    ``isolation_mode``: None picks the strongest this machine allows (:func:`isolation`); ``"none"``
    forces the no-namespace fallback.
    """
    mode = isolation_mode or isolation()
    if mode not in ("namespaces", "none"):
        raise ValueError(f"isolation_mode must be 'namespaces' or 'none', not {mode!r}")
    return _run(code, stdin, limits or Limits(), namespaces=mode == "namespaces", python=python or default_python())


class Sandbox:
    """Runs programs with fixed limits, at most ``workers`` at a time (a thread per run waiting on its
    process, so the runs themselves use every core)."""

    def __init__(
        self,
        limits: Limits | None = None,
        *,
        workers: int | None = None,
        isolation_mode: str | None = None,
        python: str | None = None,
    ):
        self.limits = limits or Limits()
        self.workers = max(1, min(UIDS_PER_PROCESS, workers or os.cpu_count() or 1))
        self.isolation_mode = isolation_mode
        self.python = python
        self._pool = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="winnow-sandbox")

    def describe(self) -> dict:
        """The limits, the pool size and the isolation in force (for the run manifest)."""
        return {
            "isolation": self.isolation_mode or isolation(),
            "python": self.python or default_python(),
            "workers": self.workers,
            "per_run_uid": os.geteuid() == 0,
            **self.limits.__dict__,
        }

    def run(self, code: str, stdin: str | bytes | None = None, **limits) -> RunResult:
        """One run, in the calling thread; keyword arguments override this sandbox's limits."""
        return run_python(
            code,
            stdin=stdin,
            limits=replace(self.limits, **limits) if limits else self.limits,
            isolation_mode=self.isolation_mode,
            python=self.python,
        )

    async def arun(self, code: str, stdin: str | bytes | None = None, **limits) -> RunResult:
        """One run in the pool, awaited."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(self.run, code, stdin, **limits))

    def map(self, programs: list[str], stdins: list[str | None] | None = None) -> list[RunResult]:
        """Many runs through the pool, results in order."""
        stdins = stdins if stdins is not None else [None] * len(programs)
        return list(self._pool.map(self.run, programs, stdins))

    def close(self) -> None:
        """Wait for the runs in flight and stop the pool."""
        self._pool.shutdown(wait=True)
