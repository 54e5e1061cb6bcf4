"""``RemoteModel``: one model adapter as a pool of Ray actors, each holding a replica (``[compute] backend = "ray"``).

A ``RemoteModel`` stands in for the adapter on the driver: attributes and methods (``model_id``,
``params()``, ``pipeline_prompt(...)``) are read from a replica, calls that change a replica's state
(``load_lora``, ``unload_lora``, ``load_adapter``) go to every replica and are replayed on one that Ray
restarts, and ``map_remote`` streams a stage's units through per-replica queues in plan order, a
couple of units per replica in flight.

Fault tolerance is Ray's own: actors are created with ``max_restarts=-1`` and their calls with
``max_task_retries`` / ``retry_exceptions`` = ``[compute] retries``, so a replica that dies mid-batch is
restarted (on any node with room) and only its unfinished units run again; a unit that still fails comes
back as ``UnitFailed`` with the cause, and the stage records its items as failed and goes on.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Callable

from flywheel.compute import Outcome, UnitFailed
from flywheel.errors import FlywheelError, MissingExtraError, StageError

log = logging.getLogger(__name__)

# Calls that change a replica (a LoRA or a judge adapter on it): sent to every replica, replayed after a restart.
SETUP_METHODS = frozenset({"load_lora", "unload_lora", "load_adapter", "expect"})
# Questions about the model whose answer only a setup call changes: asked once, so that a stage asking them per
# unit (operation rows record params()) does not wait behind the units queued on a replica.
QUERY_METHODS = frozenset({"params", "pipeline_prompt"})
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def connect(cfg) -> None:
    """Join ``[compute] address``, or start a local cluster for this process (once)."""
    try:
        import ray
    except ImportError:
        raise MissingExtraError("ray", "ray", '[compute] backend = "ray"') from None
    if ray.is_initialized():
        return
    try:
        if cfg.address:
            ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=cfg.local_cpus or None, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
    except ConnectionError as err:
        raise StageError(f"cannot reach the Ray cluster at {cfg.address!r}: {one_line(err)}",
                         hint="start it (`ray start --head` on the head node) or set [compute] address = '' "
                         "to start a local one") from None
    res = ray.cluster_resources()
    log.info("ray: %s with %d CPUs, %d GPUs", cfg.address or "a local cluster", res.get("CPU", 0), res.get("GPU", 0))


def replicas(cfg) -> tuple[int, float]:
    """(how many replicas, GPUs each) from ``[compute]`` and the cluster's resources."""
    import ray

    res = ray.cluster_resources()
    gpus = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if res.get("GPU", 0) >= 1 else 0.0)
    if cfg.actors:
        return cfg.actors, gpus
    if gpus:
        return max(1, int(res.get("GPU", 0) // gpus)), gpus
    return max(1, int(res.get("CPU", 1) // cfg.cpus_per_actor) if cfg.cpus_per_actor else int(res.get("CPU", 1))), gpus


class _Replica:
    """The actor: builds its model once with ``loader()`` and runs calls on it."""

    def __init__(self, loader: Callable[[], Any]):
        self.model = loader()
        self.applied: list[tuple] = []

    def ready(self) -> int:
        return os.getpid()

    def _sync(self, setup: tuple) -> None:
        for step in setup[len(self.applied):]:  # a restarted replica replays every step
            name, args, kwargs = step
            getattr(self.model, name)(*args, **kwargs)
            self.applied.append(step)

    def call(self, setup: tuple, method: str, args: tuple, kwargs: dict) -> tuple[float, Any]:
        self._sync(setup)
        t0 = time.perf_counter()
        value = getattr(self.model, method)(*args, **kwargs)
        return time.perf_counter() - t0, value

    def attr(self, setup: tuple, name: str) -> tuple[str, Any]:
        self._sync(setup)
        if not hasattr(self.model, name):
            return "missing", None
        value = getattr(self.model, name)
        return ("method", None) if callable(value) else ("value", value)


class RemoteModel:
    """A model adapter replicated on Ray actors; see the module docstring."""

    DEPTH = 2  # units queued on each replica: one running, one ready to start the moment it ends
    BUFFER = 4  # units per replica sent and not yet handed back (finished ones wait for their turn in order)

    def __init__(self, cfg, loader: Callable[[], Any], label: str):
        import ray

        connect(cfg)
        n, gpus = replicas(cfg)
        self._label, self._retries, self._setup, self._turn, self._known = label, cfg.retries, [], 0, {}
        actor = ray.remote(_Replica).options(num_gpus=gpus, num_cpus=cfg.cpus_per_actor, max_restarts=-1,
                                             max_task_retries=cfg.retries)
        self._actors = [actor.remote(loader) for _ in range(n)]
        try:
            ray.get([a.ready.remote() for a in self._actors])
        except ray.exceptions.RayError as err:
            self.close()
            raise StageError(f"{label} could not be loaded on the Ray cluster: {one_line(err)}",
                             hint="the same model loads in this process with [compute] backend = 'local'; "
                             "every node needs Flywheel and the model files (docs/scaling.md)") from None
        log.info("ray: %d replica(s) of %s (%g GPU, %g CPU each)", n, label, gpus, cfg.cpus_per_actor)

    @property
    def replicas(self) -> int:
        return len(self._actors)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if ("attr", name) not in self._known:  # attributes change only with a setup call (which forgets them)
            self._known[("attr", name)] = self._get(self._next().attr, tuple(self._setup), name)
        kind, value = self._known[("attr", name)]
        if kind == "missing":
            raise AttributeError(f"{self._label} has no attribute {name!r}")
        if kind == "value":
            return value
        if name in SETUP_METHODS:
            return lambda *args, **kwargs: self._setup_call(name, args, kwargs)

        def call(*args, **kwargs):
            key = ("call", name, repr(args), repr(sorted(kwargs.items())))
            if key in self._known:
                return self._known[key]
            value = self._get(self._call(self._next()), tuple(self._setup), name, args, kwargs)[1]
            if name in QUERY_METHODS:
                self._known[key] = value
            return value

        return call

    def map_remote(self, method: str, items: Iterable[tuple[Any, tuple]], kwargs: dict) -> Iterator[Outcome]:
        """Each ``(item, args)`` as ``method(*args, **kwargs)`` on the pool; outcomes in the order given.

        Every replica holds ``DEPTH`` units in its own queue, and a replica that finishes one is given the
        next at once, whatever the order the outcomes are handed back in. (Ray's ``ActorPool`` gives a replica
        its next unit only once the driver has taken that replica's result in order: on the H200 pair, with
        each replica waiting on the other's unit and on the driver's PNG encoding, 2 replicas made 1.54x the
        edits of 1.) Finished units wait for their turn here, at most ``BUFFER`` per replica."""
        import ray

        setup, source = tuple(self._setup), iter(items)
        pending: deque = deque()  # (item, ref, replica), in plan order
        load, done, finished = [0] * len(self._actors), set(), False

        def fill() -> None:
            nonlocal finished
            while not finished and len(pending) < self.BUFFER * len(self._actors):
                replica = min(range(len(load)), key=load.__getitem__)
                if load[replica] >= self.DEPTH:
                    return
                unit = next(source, None)
                if unit is None:
                    finished = True
                    return
                item, args, *own = unit
                pending.append((item, self._send(replica, setup, method, args, {**kwargs, **(own[0] if own else {})}),
                                replica))
                load[replica] += 1

        fill()
        while pending:
            item, ref, replica = pending[0]
            while ref not in done:  # refill each replica as it finishes, not as its results come up in order
                ready = self._wait([r for _, r, _ in pending if r not in done])
                for _, r, k in pending:
                    if r in ready:
                        done.add(r)
                        load[k] -= 1
                fill()
            pending.popleft()
            done.discard(ref)
            try:
                seconds, value = ray.get(ref)
            except ray.exceptions.RayError as err:
                log.warning("ray: a unit of %s failed after %d retries: %s", self._label, self._retries, one_line(err))
                yield Outcome(item, error=UnitFailed(f"{method} failed on the cluster: {one_line(err)}"))
            else:
                yield Outcome(item, value=value, seconds=seconds)
            fill()

    def _send(self, replica: int, setup: tuple, method: str, args: tuple, kwargs: dict):
        """Queue one unit on replica ``replica``; its result's ObjectRef."""
        return self._call(self._actors[replica]).remote(setup, method, args, kwargs)

    def _wait(self, refs: list) -> set:
        """Block until at least one of ``refs`` is finished; the finished ones."""
        import ray

        ready, _ = ray.wait(refs, num_returns=1)
        return set(ready)

    def close(self) -> None:
        import ray

        for actor in self._actors:
            ray.kill(actor)  # its model's memory goes with the process
        self._actors = []

    def _next(self):
        self._turn = (self._turn + 1) % len(self._actors)
        return self._actors[self._turn]

    def _call(self, actor):
        return actor.call.options(max_task_retries=self._retries, retry_exceptions=self._retries > 0)

    def _setup_call(self, name: str, args: tuple, kwargs: dict) -> None:
        import ray

        self._setup.append((name, args, kwargs))
        self._known.clear()
        try:
            ray.get([a.attr.remote(tuple(self._setup), "model_id") for a in self._actors])  # applied now
        except ray.exceptions.RayError as err:
            raise UnitFailed(f"{name} failed on the cluster: {one_line(err)}") from None

    def _get(self, method, *args):
        import ray

        try:
            return ray.get(method.remote(*args))
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, FlywheelError):  # the stage's own rules apply (e.g. ModelOutputError)
                raise err.cause from None
            raise UnitFailed(f"{self._label} failed on the cluster: {one_line(err)}") from None
        except ray.exceptions.RayError as err:
            raise UnitFailed(f"{self._label} failed on the cluster: {one_line(err)}") from None


def one_line(err: BaseException) -> str:
    """The cause of a Ray error as one line (``ValueError: ...``), without Ray's traceback and colours."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    lines = [ln.strip() for ln in _ANSI.sub("", str(err)).splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
    return errors[-1] if errors else (lines[0] if lines else type(err).__name__)
