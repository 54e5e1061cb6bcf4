"""Start the ranks of ``flywheel train --gpus N`` and stay the run's only catalog writer.

The parent (the ``flywheel train`` / ``flywheel run`` process) plans and records the run as always, then
starts N worker processes with ``torch.multiprocessing.start_processes`` (spawn; one per GPU, NCCL; or CPU
processes with gloo when the CPU is asked for by name, for tests) and waits. Each worker joins the process
group and runs the same training loop (``flywheel.train``) with its ``Ranks``; NCCL's settings are the
machine's (nothing here sets NCCL_* variables). A spawned worker inherits the environment but not the parent's
in-memory torch settings, so it first takes them from the spec (``training/process_settings.py``).

Only rank 0 writes files (checkpoints, samples, LoRA, config.json, loss curve), and it writes nothing to the
catalog itself: its ``project.catalog`` is a ``ParentCatalog`` whose calls the parent executes on its own
connection, in order, and answers (ids, rows, errors). Rank 0 also sends its progress and log records;
the other ranks send only warnings. In the loop, a step sends the parent its progress report and nothing else
(no reply awaited: no round-trip per step, tested); catalog calls come at checkpoints and after the loop.
A worker's ``FlywheelError`` (e.g. the NaN stop) is raised again in the parent with its message and hint; a
worker that dies (killed, out of memory) ends the others and the parent raises a one-line ``StageError``. When
the parent is interrupted it ends the workers (a checkpoint is written to a temporary folder and renamed, so a
kill never leaves half of one).
"""

from __future__ import annotations

import importlib
import logging
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flywheel.errors import FlywheelError, StageError
from flywheel.training import process_settings

log = logging.getLogger(__name__)


@dataclass
class Spec:
    """What every worker needs (pickled to it): where to rendezvous and what to run."""

    world: int
    backend: str          # "nccl" or "gloo"
    first_cuda: int       # rank r uses cuda:(first_cuda + r)
    init_method: str
    root: str
    config: Any           # the parent's Config object (with any in-memory overrides)
    target: str           # "module:function", called as target(project, ..., device=, progress=, ranks=)
    kwargs: dict
    settings: dict = field(default_factory=dict)  # the parent's process-wide torch settings (training/process_settings.py)


def launch(project, target: str, *, gpus: int, backend: str, first_cuda: int, progress: Callable, **kwargs) -> Any:
    """Run ``target`` (``"flywheel.train:_run"``) on ``gpus`` ranks and return rank 0's result."""
    import torch.multiprocessing as mp

    spec = Spec(world=gpus, backend=backend, first_cuda=first_cuda, init_method=f"tcp://127.0.0.1:{_free_port()}",
                root=str(project.root), config=project.config, target=target, kwargs=kwargs,
                settings=process_settings.capture())
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(gpus)]
    log.info("starting %d training process(es) (%s)", gpus, backend)
    procs = mp.start_processes(_worker, args=(spec, [child for _, child in pipes]), nprocs=gpus, join=False,
                               start_method="spawn")
    for _, child in pipes:
        child.close()  # the parent keeps its ends only, so a dead worker shows as a closed pipe
    server = _Server(project.catalog, progress)
    try:
        while not _join(procs):
            server.serve([parent for parent, _ in pipes], timeout=0.1)
    except BaseException:
        for p in procs.processes:  # interrupted, or a worker failed: end the rest now, not at NCCL's timeout
            if p.is_alive():
                p.terminate()
        for p in procs.processes:
            p.join(30)
        server.serve([parent for parent, _ in pipes], timeout=0)  # a worker's own error message, if it sent one
        if server.error is not None:
            raise server.error from None
        raise
    finally:
        server.close()
    server.serve([parent for parent, _ in pipes], timeout=0)
    if server.error is not None:
        raise server.error
    if not server.done:
        raise StageError("the training processes ended without a result", hint="run `flywheel train --resume`")
    return server.result


def _join(procs) -> bool:
    """True when every worker ended well; a failed one raises (torch ends the others)."""
    import torch.multiprocessing as mp

    try:
        return procs.join(timeout=0)
    except mp.ProcessRaisedException as err:  # a worker's Python error: its traceback's last line says what
        log.debug("training process %d failed:\n%s", err.error_index, err.msg)
        last = [line for line in str(err.msg).splitlines() if line.strip()][-1:] or ["unknown error"]
        raise StageError(f"training process {err.error_index} failed: {last[0].strip()}",
                         hint="run again with -v for its traceback; after a fix, `flywheel train --resume` "
                         "continues from the last checkpoint") from None
    except mp.ProcessExitedException as err:  # killed (e.g. out of memory) or exited without a Python error
        raise StageError(f"training process {err.error_index} ended with exit code {err.exit_code}",
                         hint="a negative code is the signal that ended it (-9: killed, often out of memory); "
                         "`flywheel train --resume` continues from the last checkpoint") from None


class _Server:
    """The parent's side: executes rank 0's catalog calls, reports progress and log records, keeps the result."""

    def __init__(self, catalog, progress: Callable):
        self.catalog, self.progress = catalog, progress
        self.open: list = []  # rank 0's open (nested) transactions, innermost last
        self.result, self.done, self.error = None, False, None

    def serve(self, conns: list, timeout: float) -> None:
        from multiprocessing.connection import wait

        for conn in wait([c for c in conns if not c.closed], timeout=timeout):
            try:
                while conn.poll():
                    self.handle(conn, conn.recv())
            except (EOFError, OSError):
                conn.close()

    def handle(self, conn, msg: tuple) -> None:
        kind = msg[0]
        if kind == "call":
            conn.send(self.call(*msg[1:]))
        elif kind == "progress":
            self.progress(*msg[1])
        elif kind == "log":
            logging.getLogger(msg[2]).log(msg[1], "%s", msg[3])
        elif kind == "done":
            self.result, self.done = msg[1], True
        elif kind == "error" and self.error is None:
            self.error = _rebuild(*msg[1:])

    def call(self, name: str, args: tuple, kwargs: dict) -> tuple:
        try:
            if name == "begin":
                cm = self.catalog.transaction()
                cm.__enter__()
                self.open.append(cm)
                return ("ok", None)
            if name == "end":  # args[0]: the worker's error inside the block ('' = none: commit)
                self._end(args[0])
                return ("ok", None)
            out = getattr(self.catalog, name)(*args, **kwargs)
            if isinstance(out, list):
                out = [Row(dict(r)) for r in out]
            elif not isinstance(out, (int, str, float, type(None))):
                out = None  # a cursor: callers of the training path never read one
            return ("ok", out)
        except FlywheelError as err:
            return ("error", type(err).__module__, type(err).__qualname__, err.args[0] if err.args else str(err),
                    err.hint)


    def _end(self, error: str) -> None:
        cm = self.open.pop()
        if error:
            cm.__exit__(StageError, StageError(error), None)  # rolls back (the outermost) and does not raise
        else:
            cm.__exit__(None, None, None)

    def close(self) -> None:
        """Roll back what a worker that was ended mid-transaction left open."""
        while self.open:
            self._end("the training process ended inside a catalog transaction")


class Row(dict):
    """A catalog row on the worker side: by column name, like ``sqlite3.Row``, and by position."""

    def __getitem__(self, key):
        return list(self.values())[key] if isinstance(key, int) else super().__getitem__(key)


class ParentCatalog:
    """Rank 0's ``project.catalog``: every call runs in the parent, on the parent's connection."""

    def __init__(self, conn):
        self._conn = conn

    def _call(self, name: str, *args, **kwargs):
        self._conn.send(("call", name, args, kwargs))
        reply = self._conn.recv()
        if reply[0] == "error":
            raise _rebuild(*reply[1:])
        return reply[1]

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._call("begin")
        try:
            yield None
        except BaseException as err:
            self._call("end", f"{type(err).__name__}: {err}")
            raise
        self._call("end", "")

    @contextmanager
    def operation(self, stage: str, **kwargs: Any) -> Iterator[int]:
        from flywheel.catalog.db import Catalog

        with Catalog.operation(self, stage, **kwargs) as op:  # the same rows as the parent's own operations
            yield op

    def __getattr__(self, name: str):  # execute, query, insert, start_operation, finish_operation
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._call(name, *args, **kwargs)


class NoCatalog:
    """The catalog of ranks other than 0: they must not write it, and using it is a bug worth a clear error."""

    def __init__(self, rank: int):
        self.rank = rank

    def __getattr__(self, name: str):
        raise StageError(f"training rank {self.rank} tried to use the catalog ({name}); only rank 0 records",
                         hint="this is a bug in flywheel's multi-GPU training; train without --gpus meanwhile")


def _worker(rank: int, spec: Spec, conns: list) -> None:
    """One rank: join the process group, run the training loop, send the result or the error."""
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from flywheel.project import Project
    from flywheel.training.distributed import Ranks

    conn = conns[rank]
    for other in conns[:rank] + conns[rank + 1:]:  # spawn hands every rank all the pipes: keep only its own
        other.close()
    _forward_logs(conn, rank)
    process_settings.apply(spec.settings, spec.world)
    device = "cpu"
    if spec.backend == "nccl":
        torch.cuda.set_device(spec.first_cuda + rank)
        device = f"cuda:{spec.first_cuda + rank}"
    catalog = ParentCatalog(conn) if rank == 0 else NoCatalog(rank)
    project = Project(root=Path(spec.root), config=spec.config, catalog=catalog, store=None)
    module, name = spec.target.split(":")
    fn = getattr(importlib.import_module(module), name)
    progress = (lambda *a: conn.send(("progress", a))) if rank == 0 else (lambda *a: None)
    dist.init_process_group(spec.backend, init_method=spec.init_method, rank=rank, world_size=spec.world,
                            device_id=torch.device(device) if spec.backend == "nccl" else None)
    try:
        result = fn(project, **spec.kwargs, device=device, progress=progress,
                    ranks=Ranks(rank=rank, world=spec.world, group=True))
    except FlywheelError as err:  # no destroy_process_group here: with a rank gone it could wait for ever
        conn.send(("error", type(err).__module__, type(err).__qualname__, err.args[0] if err.args else str(err),
                   err.hint))
        raise SystemExit(1) from None
    if rank == 0:
        conn.send(("done", result))
    dist.destroy_process_group()


def _forward_logs(conn, rank: int) -> None:
    """Rank 0's records (info and up) and the others' warnings go to the parent's logging."""

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                msg = record.getMessage() if rank == 0 else f"rank {rank}: {record.getMessage()}"
                conn.send(("log", record.levelno, record.name, msg))
            except (OSError, ValueError):  # the parent is gone: nothing left to tell
                pass

    root = logging.getLogger()
    root.handlers[:] = [Forward(logging.INFO if rank == 0 else logging.WARNING)]
    root.setLevel(logging.INFO)
    logging.getLogger("flywheel").setLevel(logging.INFO)


def _rebuild(module: str, qualname: str, message: str, hint: str | None) -> FlywheelError:
    """A worker's FlywheelError as the same class in the parent (else a StageError with its message)."""
    try:
        cls = getattr(importlib.import_module(module), qualname)
        err = cls(message, hint=hint)
        if isinstance(err, FlywheelError):
            return err
    except (ImportError, AttributeError, TypeError):
        pass
    return StageError(message, hint=hint)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

