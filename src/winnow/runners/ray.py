"""Engine and reward-model replicas on a Ray cluster, behind the Engine and Reward contracts.

The pipeline stays one process (the Ray *driver*): it reads the data lazily, keeps a bounded number
of engine calls in flight and is the single writer of the output, so its resume guarantees hold
unchanged. What goes wide is the engine: :class:`RayEngine` owns ``--num_workers`` replica actors,
each building the real engine (``get_engine(name, model, ...)``) in its own worker process on a
node that has what a replica asks for (CPUs, GPUs, custom resources), and sends every ``generate``
call to the least busy live replica; when all are busy, calls wait in order and the first replica
to free a slot takes the next one, so a slow node simply takes fewer calls.
:class:`RayModelReward` does the same for a reward model (``--ray_reward_workers``).

Faults. A call whose replica dies (its process killed, its node lost, its result lost with the
node) is redone on another replica; a late answer from the dead call is never read, so nothing is
written twice. Ray restarts a dead replica up to ``--ray_max_restarts`` times where the cluster has
room; until it answers again it takes no calls. A call that has taken down ``MAX_ATTEMPTS``
replicas fails alone (as error completions, which a resumed run tries again) rather than taking
down more. When every replica is lost, or none has been alive for ``--ray_wait_s`` seconds, the run
stops with one error; what was written is kept.

Importing this module imports ray; without it, one line names the extra to install.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from winnow.engines.prompts import errors
from winnow.errors import EngineError, RewardError, WinnowError, require
from winnow.schema import Completion, Prompt, SamplingParams

ray = require("ray", "ray", "--ray true")
from ray import exceptions as ray_errors  # noqa: E402  (after the one-line error above)

# how a replica fails that costs only its calls in flight: they are redone elsewhere
REDO_ERRORS = (
    ray_errors.RayActorError,
    ray_errors.ObjectLostError,
    ray_errors.WorkerCrashedError,
    ray_errors.NodeDiedError,
    ray_errors.LocalRayletDiedError,
    ray_errors.OutOfMemoryError,
)
MAX_ATTEMPTS = 3  # replicas one call may take down before it fails alone
# driver environment that replicas on other nodes need too (API keys, hub settings, winnow's cache)
# (paths are left alone: another node has its own layout)
FORWARD_ENV = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "HF_TOKEN",
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "MODELSCOPE_API_TOKEN",
    "WINNOW_DEBUG",
)

STARTING, ALIVE, DOWN, LOST = "starting", "alive", "down", "lost"


# ----------------------------------------------------------------------------- connection

_session: dict[str, Any] = {"users": 0, "owned": False}


def connect(address: str | None, namespace: str | None = None) -> None:
    """Join the Ray cluster at ``address`` once per process (``None``: ``RAY_ADDRESS``, else a new
    local Ray on this machine); every :func:`connect` is paired with a :func:`disconnect`."""
    if not ray.is_initialized():
        import logging

        # Ray's driver-side warnings (token auth on a local cluster, ...) would bury the progress bar
        kwargs: dict[str, Any] = {"address": address, "namespace": namespace, "logging_level": logging.ERROR}
        if address is None and not os.environ.get("RAY_ADDRESS"):
            kwargs["include_dashboard"] = False  # a throwaway local cluster: no dashboard process
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = f"--ray_address {address}" if address else "a local Ray"
            raise EngineError(
                f"{where}: cannot start or join a Ray cluster ({e}); start one with "
                "`ray start --head` and pass --ray_address auto (or ray://HOST:10001)"
            ) from None
        _session["owned"] = True
    _session["users"] += 1


def disconnect() -> None:
    """The pair of :func:`connect`: shuts Ray down when this process started it and nothing uses it."""
    _session["users"] = max(0, _session["users"] - 1)
    if _session["users"] == 0 and _session["owned"]:
        _session["owned"] = False
        ray.shutdown()


async def _result(ref: Any) -> Any:
    """Await an ObjectRef (Ray Client refs too, which are not awaitable themselves). Cancelling the
    wait leaves Ray's own future alone: Ray sets it later, and a cancelled one makes Ray Client fail."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def copy(done) -> None:
        if waiter.done():
            return
        if done.cancelled():
            waiter.cancel()
        elif done.exception() is not None:
            waiter.set_exception(done.exception())
        else:
            waiter.set_result(done.result())

    def on_done(done) -> None:  # in one of Ray's threads
        try:
            loop.call_soon_threadsafe(copy, done)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    ref.future().add_done_callback(on_done)
    return await waiter


def _say(line: str) -> None:
    print(f"winnow: ray: {line}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the actor


class ReplicaActor:
    """One replica, in a Ray worker process: builds its component (an engine, a reward model) once
    and runs the driver's calls on it; an async actor, so calls in flight overlap."""

    def __init__(self, build: Callable[..., Any], kwargs: dict[str, Any]):
        import concurrent.futures

        self.component: Any = None
        self.error: str | None = None
        # blocking work (a reward model's forward pass) runs here, one call at a time, off the loop
        self._blocking = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="winnow-replica")
        try:
            self.component = build(**kwargs)
        except Exception as e:  # reported by info(), so the driver can say why in one line
            self.error = str(e) if isinstance(e, WinnowError) else f"{type(e).__name__}: {e}"

    def info(self) -> dict[str, Any]:
        """Where this replica runs, and why it could not build its component (if it could not)."""
        import socket

        ctx = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "node": ctx.get_node_id(),
            "host": socket.gethostname(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "error": self.error,
        }

    async def call(self, method: str, args: tuple, blocking: bool = False) -> Any:
        """``component.method(*args)``: awaited when async, on the blocking thread when ``blocking``."""
        fn = getattr(self.component, method)
        if blocking:
            return await asyncio.get_running_loop().run_in_executor(self._blocking, fn, *args)
        out = fn(*args)
        return await out if inspect.isawaitable(out) else out

    async def optional(self, method: str) -> Any:
        """``component.method()`` if the component has one (``interrupt``, ``stats``), else None."""
        if getattr(self.component, method, None) is None:
            return None
        return await self.call(method, ())

    async def close(self) -> Any:
        """Release the component (a GPU engine's memory, its child processes); its final stats."""
        stats = await self.optional("stats")
        await self.optional("aclose")
        self._blocking.shutdown(wait=False)
        return stats


_Actor = ray.remote(ReplicaActor)


def build_engine_replica(name: str, model: str, kwargs: dict[str, Any], replica: int) -> Any:
    """One replica's engine; each replica draws its own random stream (seed + replica index)."""
    from winnow.engines import get_engine

    kwargs = dict(kwargs)
    if kwargs.get("seed") is not None:
        kwargs["seed"] = (int(kwargs["seed"]) + replica) % 2**63
    return get_engine(name, model, **kwargs)


def build_reward_model_replica(spec: str, options: dict[str, Any], replica: int) -> Any:
    """One replica's reward model (a classifier RM or a PRM)."""
    from winnow.rewards.models import load_reward_model

    return load_reward_model(spec, **options)


# ----------------------------------------------------------------------------- the pool


@dataclass
class ReplicaSpec:
    """What each replica asks of the cluster, and how Ray treats it when it dies."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    scheduling: str = "spread"  # spread over nodes, or pack onto as few as fit
    max_restarts: int = 3
    runtime_env: dict[str, Any] = field(default_factory=dict)

    def actor_options(self) -> dict[str, Any]:
        """``ActorClass.options(...)`` for one replica."""
        env = dict(self.runtime_env)
        forwarded = {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}
        if forwarded:
            env["env_vars"] = {**forwarded, **(env.get("env_vars") or {})}
        return {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "max_restarts": self.max_restarts,
            # winnow redoes a dead replica's call on another replica, not on the same one
            "max_task_retries": 0,
            "scheduling_strategy": "SPREAD" if self.scheduling == "spread" else "DEFAULT",
            **({"resources": dict(self.resources)} if self.resources else {}),
            **({"runtime_env": env} if env else {}),
        }

    def describe(self) -> dict[str, Any]:
        """What a replica asks for, for the manifest (runtime_env by its keys only)."""
        return {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "resources": self.resources,
            "scheduling": self.scheduling,
            "max_restarts": self.max_restarts,
            "runtime_env": sorted(self.runtime_env),
        }


@dataclass
class RayPlan:
    """Where one component's replicas go: the cluster, how many, what each asks for, how long to wait."""

    address: str | None = None
    namespace: str | None = None
    num_workers: int = 1
    replica: ReplicaSpec = field(default_factory=ReplicaSpec)
    wait_s: float = 600.0


@dataclass
class Replica:
    """One replica as the driver sees it: where it runs, its state, and what it did."""

    index: int
    handle: Any
    status: str = STARTING
    pid: int | None = None
    node: str = ""
    host: str = ""
    epoch: int = 0  # bumped when it goes down, so a late release of an old call changes nothing
    busy: int = 0
    calls: int = 0
    restarts: int = 0
    error: str | None = None
    counts: Counter = field(default_factory=Counter)  # what its component produced (samples, tokens)
    ready: Any = None  # while starting: the ref that answers once it is up

    def where(self) -> str:
        """``replica 1 (host, pid 4242)``, for messages."""
        return f"replica {self.index} ({self.host or '?'}, pid {self.pid or '?'})"


class CallLost(Exception):
    """A call that took down ``MAX_ATTEMPTS`` replicas: it fails alone."""


class Stopped(Exception):
    """The run is stopping: calls not yet sent are not sent."""


class ReplicaPool:
    """``plan.num_workers`` replica actors of one component; each call goes to the least busy live
    replica and is redone on another when its replica dies. ``__init__`` joins the cluster and blocks
    until one replica is up; ``aclose`` ends the actors and leaves the cluster."""

    def __init__(self, role: str, build: Callable[..., Any], build_kwargs: dict[str, Any], plan: RayPlan):
        self.role = role
        self.plan = plan
        self.spec = plan.replica
        self.wait_s = float(plan.wait_s)
        # calls one replica holds at once: one running and one queued behind it, so a replica never
        # waits on the driver between calls (an engine's own plan may raise it)
        self.slots = 2
        self.redone = 0
        self.failed_calls = 0
        self.final_stats: list[dict[str, Any]] = []
        self._failure: str | None = None
        self._stopping = False
        self._closed = False
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._none_alive_since: float | None = None
        self.replicas: list[Replica] = []
        connect(plan.address, plan.namespace)
        try:
            options = self.spec.actor_options()
            self.replicas = [
                Replica(i, _Actor.options(**options).remote(build, {**build_kwargs, "replica": i}))
                for i in range(plan.num_workers)
            ]
            self._wait_first()
            self.component = self.call_first("describe")  # what every replica runs, for the manifest
        except BaseException:
            self._kill_all()
            disconnect()
            raise

    # ------------------------------------------------------------------ start

    def _wait_first(self) -> None:
        """Block until one replica is up (the rest join as they come); a replica that cannot build
        its component stops the run here with its reason."""
        for r in self.replicas:
            r.ready = r.handle.info.remote()
        pending = {r.ready: r for r in self.replicas}
        started = time.monotonic()
        while pending:
            waited = time.monotonic() - started
            if waited >= self.wait_s:
                raise EngineError(
                    f"no {self.role} replica started in {self.wait_s:g}s (--ray_wait_s): {self._capacity_note()}"
                )
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(30.0, self.wait_s - waited))
            if not ready:
                _say(
                    f"waiting for {self.role} replicas to start ({time.monotonic() - started:.0f}s): "
                    f"{self._capacity_note()}"
                )
                continue
            replica = pending.pop(ready[0])
            try:
                info = ray.get(ready[0])
            except ray_errors.RayActorError as e:
                raise EngineError(f"{self.role} {replica.where()} died while starting: {_short(e)}") from None
            if info["error"]:
                raise EngineError(
                    f"{self.role} replica {replica.index} on {info['host']} cannot start: {info['error']}"
                )
            self._up(replica, info)
            return

    def _capacity_note(self) -> str:
        ask = {"CPU": self.spec.num_cpus, "GPU": self.spec.num_gpus, **self.spec.resources}
        want = ", ".join(f"{v:g} {k}" for k, v in ask.items() if v)
        have = ray.cluster_resources()
        free = ray.available_resources()
        cluster = ", ".join(f"{free.get(k, 0):g}/{have.get(k, 0):g} {k}" for k in ask if ask[k])
        return (
            f"each replica asks for {want or 'nothing'}; the cluster has {cluster or '(none of it)'} free "
            f"on {len([n for n in ray.nodes() if n.get('Alive')])} nodes"
        )

    def _ensure_watching(self) -> None:
        """Watch, from the event loop calling now, the replicas still starting and those down (an
        engine reused by a later run, or by ``generate_sync``, meets a new loop each time)."""
        loop = asyncio.get_running_loop()
        if loop is self._loop:
            return
        self._loop, self._changed, self._tasks = loop, asyncio.Event(), set()
        for r in self.replicas:
            if r.status == STARTING:
                self._spawn(self._await_start(r))
            elif r.status == DOWN:
                self._spawn(self._await_back(r))

    async def _await_start(self, replica: Replica) -> None:
        try:
            info = await _result(replica.ready)
        except ray_errors.RayActorError as e:
            self._lose(replica, f"died while starting: {_short(e)}")
            return
        if info["error"]:
            self._lose(replica, f"cannot start: {info['error']}")
            return
        self._up(replica, info)

    # ------------------------------------------------------------------ calls

    def call_first(self, method: str, *args: Any, optional: bool = False) -> Any:
        """``method(*args)`` on a live replica, blocking (start-up questions: plan, describe); with
        ``optional``, None when the component has no such method."""
        replica = next((r for r in self.replicas if r.status == ALIVE), None)
        if replica is None:
            raise EngineError(self._failure or f"no {self.role} replica is alive")
        if optional:
            return ray.get(replica.handle.optional.remote(method))
        return ray.get(replica.handle.call.remote(method, args))

    async def run(self, method: str, *args: Any, blocking: bool = False) -> tuple[Any, Replica]:
        """``method(*args)`` on a free replica, redone elsewhere if it dies; the result and who ran it."""
        self._ensure_watching()
        lost_to: list[str] = []
        while True:
            replica, epoch = await self._acquire()
            ref = replica.handle.call.remote(method, args, blocking)
            try:
                result = await _result(ref)
            except REDO_ERRORS as e:
                self._down(replica, epoch, e)
                lost_to.append(replica.where())
                if len(lost_to) >= MAX_ATTEMPTS:
                    self.failed_calls += 1
                    raise CallLost(
                        f"this call took down {len(lost_to)} {self.role} replicas "
                        f"({', '.join(lost_to)}); last: {_short(e)}"
                    ) from None
                self.redone += 1
                continue
            except ray_errors.RayTaskError as e:  # the component raised: a bug or a WinnowError
                cause = getattr(e, "cause", None)
                if isinstance(cause, WinnowError):
                    raise cause from None
                error = cause if cause is not None else e
                raise EngineError(
                    f"{self.role} {replica.where()} raised {type(error).__name__}: {_short(error)}"
                ) from None
            except asyncio.CancelledError:
                try:
                    ray.cancel(ref)
                except Exception:  # already finished or gone: nothing to cancel
                    pass
                raise
            finally:
                self._release(replica, epoch)
            replica.calls += 1
            return result, replica

    async def _acquire(self) -> tuple[Replica, int]:
        while True:
            if self._failure is not None:
                raise EngineError(self._failure)
            if self._stopping:
                raise Stopped
            free = [r for r in self.replicas if r.status == ALIVE and r.busy < self.slots]
            if free:
                best = min(free, key=lambda r: (r.busy, r.calls))
                best.busy += 1
                return best, best.epoch
            changed = self._changed
            if self._none_alive_since is None:
                await changed.wait()
                continue
            left = self._none_alive_since + self.wait_s - time.monotonic()
            try:
                await asyncio.wait_for(changed.wait(), timeout=max(0.0, left))
            except asyncio.TimeoutError:
                if self._none_alive_since is not None:
                    states = ", ".join(
                        f"{r.where()}: {r.status}" + (f" ({r.error})" if r.error else "") for r in self.replicas
                    )
                    self._fail(
                        f"no {self.role} replica alive for {self.wait_s:g}s (--ray_wait_s): {states}; "
                        f"{self._capacity_note()}. What was written is kept: rerun with --resume true"
                    )

    def _release(self, replica: Replica, epoch: int) -> None:
        if replica.epoch == epoch and replica.busy > 0:
            replica.busy -= 1
            self._wake()

    def _wake(self) -> None:
        """Every waiting call looks again (in the order they came)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ replica states

    def _up(self, replica: Replica, info: dict[str, Any]) -> None:
        restarted = replica.pid is not None and info["pid"] != replica.pid
        if restarted:
            replica.restarts += 1
        replica.status, replica.pid, replica.node, replica.host = ALIVE, info["pid"], info["node"], info["host"]
        replica.busy, replica.ready = 0, None
        if restarted:
            _say(f"{self.role} {replica.where()} is back (restart {replica.restarts})")
        self._none_alive_since = None
        self._wake()

    def _down(self, replica: Replica, epoch: int, error: BaseException) -> None:
        if replica.epoch != epoch or replica.status != ALIVE:
            return  # another call already saw it go
        replica.status, replica.error = DOWN, _short(error)
        replica.epoch += 1
        replica.busy = 0
        _say(
            f"{self.role} {replica.where()} is down ({replica.error}); its calls in flight are redone on "
            "the other replicas"
        )
        self._note_alive()
        self._spawn(self._await_back(replica))
        self._wake()

    async def _await_back(self, replica: Replica) -> None:
        """Wait for Ray to restart a replica that went down; lost if it cannot."""
        delay = 0.2
        while True:
            try:
                info = await _result(replica.handle.info.remote())
            except ray_errors.ActorDiedError as e:
                self._lose(replica, _short(e))
                return
            except REDO_ERRORS:  # restarting, or waiting for room on the cluster
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if info["error"]:
                self._lose(replica, f"cannot restart: {info['error']}")
                return
            self._up(replica, info)
            return

    def _lose(self, replica: Replica, why: str) -> None:
        replica.status, replica.error = LOST, why
        replica.epoch += 1
        replica.busy = 0
        _say(f"{self.role} {replica.where()} is lost: {why}")
        try:
            ray.kill(replica.handle, no_restart=True)
        except Exception:  # already gone
            pass
        if all(r.status == LOST for r in self.replicas):
            reasons = "; ".join(f"{r.index}: {r.error}" for r in self.replicas)
            self._fail(
                f"every {self.role} replica is lost ({reasons}). What was written is kept: rerun with --resume true"
            )
        self._note_alive()
        self._wake()

    def _note_alive(self) -> None:
        if not any(r.status == ALIVE for r in self.replicas) and self._none_alive_since is None:
            self._none_alive_since = time.monotonic()

    def _fail(self, message: str) -> None:
        if self._failure is None:
            self._failure = message
        self._wake()

    # ------------------------------------------------------------------ control and reports

    def interrupt(self) -> None:
        """Send nothing more; replicas that can (the client engine) cut their calls in flight short."""
        self._stopping = True
        for r in self.replicas:
            if r.status == ALIVE:
                r.handle.optional.remote("interrupt")
        self._wake()

    def counts(self) -> Counter:
        """Replicas by state."""
        return Counter(r.status for r in self.replicas)

    def stats(self) -> dict[str, Any]:
        """Replicas by state, restarts, calls redone, and what each replica did."""
        states = self.counts()
        return {
            "replicas": len(self.replicas),
            "alive": states[ALIVE],
            "starting": states[STARTING],
            "restarting": states[DOWN],
            "lost": states[LOST],
            "restarts": sum(r.restarts for r in self.replicas),
            "calls_redone": self.redone,
            "calls_failed": self.failed_calls,
            "nodes": len({r.node for r in self.replicas if r.status == ALIVE}),
            "per_replica": [
                {
                    "replica": r.index,
                    "status": r.status,
                    "host": r.host,
                    "node": r.node[:12],
                    "pid": r.pid,
                    "calls": r.calls,
                    "restarts": r.restarts,
                    **r.counts,
                    **({"error": r.error} if r.error else {}),
                }
                for r in self.replicas
            ],
        }

    def progress_fields(self) -> dict[str, str]:
        """``replicas`` alive of all, and ``redone``/``lost`` once there are any."""
        states = self.counts()
        out = {"replicas": f"{states[ALIVE]}/{len(self.replicas)}"}
        if self.redone:
            out["redone"] = str(self.redone)
        if states[LOST]:
            out["lost"] = str(states[LOST])
        return out

    async def aclose(self) -> None:
        """Close every live replica's component (briefly waited for), end the actors, leave the cluster."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._close_replicas()
        finally:
            self._kill_all()
            disconnect()

    async def _close_replicas(self) -> None:
        for task in list(self._tasks):
            if not task.done():
                task.cancel()
        alive = [r for r in self.replicas if r.status == ALIVE]
        refs = [r.handle.close.remote() for r in alive]
        if refs:
            done, late = await asyncio.wait([asyncio.ensure_future(_result(ref)) for ref in refs], timeout=30)
            for task in late:
                task.cancel()
            self.final_stats = [t.result() for t in done if t.exception() is None and isinstance(t.result(), dict)]

    def _kill_all(self) -> None:
        for r in self.replicas:
            try:
                ray.kill(r.handle, no_restart=True)
            except Exception:  # already gone
                pass


def _short(e: BaseException | None) -> str:
    """The first line of an error, without Ray's long explanations."""
    text = str(e).strip().splitlines()[0] if e is not None and str(e).strip() else type(e).__name__
    return text if len(text) <= 240 else text[:237] + "..."


def _sum_counts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Numeric counters of every replica's component added up (requests, retries, failures...)."""
    total: dict[str, int | float] = {}
    for stats in items:
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return dict(sorted(total.items()))


# ----------------------------------------------------------------------------- the engine


class RayEngine:
    """An Engine whose ``generate`` calls run on replica actors of the real engine, over a Ray cluster."""

    def __init__(self, engine: str, model: str, kwargs: dict[str, Any], plan: RayPlan):
        self.plan = plan
        self.name = f"ray:{engine}"
        kwargs = dict(kwargs)
        if engine == "client":  # rate limits are the API account's: each replica gets its share
            for key in ("rpm", "tpm"):
                if kwargs.get(key):
                    kwargs[key] = max(1, math.ceil(kwargs[key] / plan.num_workers))
        self.pool = ReplicaPool(
            "engine", build_engine_replica, {"name": engine, "model": model, "kwargs": kwargs}, plan
        )

    def batch_plan(self, n: int) -> tuple[int, int]:
        # a replica keeps its engine's own plan; an API engine's one-prompt calls travel in groups, so
        # that one Ray call carries several requests and the driver's cost per request stays small
        per_call, in_flight = self.pool.call_first("batch_plan", n)
        group = per_call if per_call > 1 else max(1, in_flight // 8)
        self.pool.slots = max(1, math.ceil(per_call * in_flight / group))
        workers = len(self.pool.replicas)
        # every replica busy, and one call per replica waiting to take the next free slot at once
        return group, self.pool.slots * workers + workers

    async def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """The call on a free replica; a call no replica could finish comes back as error samples."""
        try:
            out, replica = await self.pool.run("generate", prompts, params)
        except CallLost as e:
            return [errors(params.n, str(e)) for _ in prompts]
        except Stopped:
            return [errors(params.n, "the run is stopping: not sent to a replica") for _ in prompts]
        replica.counts["prompts"] += len(prompts)
        for completions in out:
            for c in completions:
                if c.failed:
                    replica.counts["samples_failed"] += 1
                else:
                    replica.counts["samples"] += 1
                replica.counts["tokens"] += c.completion_tokens
        return out

    def generation_defaults(self) -> dict[str, Any]:
        """The replica engine's reading of the model's generation_config.json (what a plain run takes
        for options left unset)."""
        return self.pool.call_first("generation_defaults", optional=True) or {}

    def describe(self) -> dict[str, Any]:
        """The replicas' engine, how many, what each asked for and where."""
        return {
            "name": "ray",
            "engine": self.pool.component,
            "num_workers": self.plan.num_workers,
            "address": self.plan.address or os.environ.get("RAY_ADDRESS") or "local",
            "replica": self.plan.replica.describe(),
        }

    def stats(self) -> dict[str, Any]:
        """The cluster's side of the run: replicas by state, restarts, calls redone, per-replica
        work, and the replicas' own engine counters added up (once they are closed)."""
        out: dict[str, Any] = {"ray": self.pool.stats()}
        if self.pool.final_stats:
            out["replica_engines"] = _sum_counts(self.pool.final_stats)
        return out

    def progress_fields(self) -> dict[str, str]:
        """Progress-bar fields: replicas alive of all, calls redone, replicas lost."""
        return self.pool.progress_fields()

    def summary_note(self) -> str:
        """One line for the run summary: the replicas and what happened to them."""
        s = self.pool.stats()
        per = " ".join(f"{r['replica']}:{r.get('samples', 0)}" for r in s["per_replica"])
        return (
            f"ray: {s['replicas']} replicas on {len({r['node'] for r in s['per_replica'] if r['node']})} nodes, "
            f"{s['alive']} alive at the end, {s['restarts']} restarts, {s['lost']} lost, "
            f"{s['calls_redone']} calls redone; samples per replica {per}"
        )

    def interrupt(self) -> None:
        """Stop: send nothing more; replicas with an interrupt of their own use it."""
        self.pool.interrupt()

    async def aclose(self) -> None:
        await self.pool.aclose()


# ----------------------------------------------------------------------------- reward models


class RayModelReward:
    """A reward model (classifier RM or PRM) scored on replica actors: the Reward protocol."""

    def __init__(self, name: str, spec: str, options: dict[str, Any], plan: RayPlan):
        self.name = name
        self.plan = plan
        self.pool = ReplicaPool(
            f"reward model {name}", build_reward_model_replica, {"spec": spec, "options": options}, plan
        )

    def describe(self) -> dict[str, Any]:
        """The replicas' reward model, and how many there are."""
        return {
            **self.pool.component,
            "ray": {"num_workers": self.plan.num_workers, "replica": self.plan.replica.describe()},
        }

    async def score(self, samples: list) -> list:
        """One Score per sample, from the replicas."""
        from winnow.rewards.base import check_count

        if not samples:
            return []
        # a large batch is shared out, so every replica works on it at once
        size = max(8, math.ceil(len(samples) / len(self.pool.replicas)))
        chunks = [samples[i : i + size] for i in range(0, len(samples), size)]
        try:
            parts = await asyncio.gather(
                *(self.pool.run("score_conversations", [s.messages for s in chunk], blocking=True) for chunk in chunks)
            )
        except (CallLost, Stopped) as e:
            raise RewardError(f"reward {self.name}: {e}") from None
        out = []
        for chunk, (scores, _) in zip(chunks, parts, strict=True):
            out += check_count(self.name, scores, len(chunk))
        return out

    async def aclose(self) -> None:
        await self.pool.aclose()


# ----------------------------------------------------------------------------- from a run's options


def ray_plan(config, role: str = "engine") -> RayPlan:
    """Where a run's engine (``role="engine"``) or reward-model (``"reward"``) replicas go."""
    if role == "engine":
        count, cpus, gpus, resources = (
            config.num_workers,
            config.ray_num_cpus_per_worker,
            config.ray_num_gpus_per_worker,
            config.ray_resources_per_worker,
        )
    else:
        count, cpus, gpus, resources = (
            config.ray_reward_workers,
            config.ray_num_cpus_per_reward_worker,
            config.ray_num_gpus_per_reward_worker,
            config.ray_resources_per_reward_worker,
        )
    spec = ReplicaSpec(
        num_cpus=float(cpus),
        num_gpus=float(gpus),
        resources=dict(resources or {}),
        scheduling=config.ray_scheduling,
        max_restarts=int(config.ray_max_restarts),
        runtime_env=dict(config.ray_runtime_env or {}),
    )
    return RayPlan(address=config.ray_address, num_workers=int(count), replica=spec, wait_s=config.ray_wait_s)


def ray_engine(config, kwargs: dict[str, Any]) -> RayEngine:
    """The run's engine (``--sampler_engine`` with ``kwargs``) as ``--num_workers`` replicas on Ray."""
    return RayEngine(config.engine, config.model, kwargs, ray_plan(config, "engine"))


def ray_model_reward(name: str, spec: str, options: dict[str, Any], config) -> RayModelReward:
    """A reward model as ``--ray_reward_workers`` replicas on Ray."""
    return RayModelReward(name, spec, options, ray_plan(config, "reward"))
