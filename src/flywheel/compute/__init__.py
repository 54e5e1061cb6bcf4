"""Where a stage's model calls run: in this process, or on a pool of model-holding Ray actors.

The seam is one function, ``map_calls(model, method, items)``: a stage hands it its fixed work units
(the same batches the local path plans), each with the arguments of one model call, and gets the
outcomes back in plan order, as they finish. With a local adapter the calls run here, one after the
other, exactly as before. With a ``RemoteModel`` (``flywheel.compute.ray_pool``, made by the model pool
when ``[compute] backend = "ray"``) each replica holds the model and several units are in flight at once;
the driver (this process) stays the catalog's single writer and puts every image into the store itself.

Failure handling lives in the remote path: an actor that dies is restarted by Ray and its unfinished
units are run again; a unit that still fails after ``[compute] retries`` comes back as an outcome with
a ``UnitFailed`` error, which the stage records as failed for its items and goes on. Locally an
``Exception`` from the model is handed back the same way, so each stage keeps its own rules (enrich
records a ``ModelOutputError`` and goes on, and stops on anything else, as it always did).

Nothing here imports Ray; ``ray_pool`` does, inside its functions, and only when the backend is "ray".
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from flywheel.errors import StageError


class UnitFailed(StageError):
    """A unit of work failed on the cluster after its retries (the error names the cause)."""


@dataclass
class Outcome:
    """One unit's result: ``value`` (the model call's return) or ``error``, and the call's seconds."""

    item: Any
    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0


def is_remote(model: Any) -> bool:
    return callable(getattr(model, "map_remote", None))


def map_calls(model: Any, method: str, items: Iterable[tuple[Any, tuple]], **kwargs: Any) -> Iterator[Outcome]:
    """``getattr(model, method)(*args, **kwargs)`` for each ``(item, args)`` (or ``(item, args, own_kwargs)``),
    outcomes in the order given.

    ``items`` is consumed lazily: locally one unit at a time; on Ray a few units per replica ahead, so a
    stage that builds a unit's inputs (and writes its 'running' operation rows) in the generator does so
    shortly before the unit runs, never for the whole plan at once.
    """
    if is_remote(model):
        yield from model.map_remote(method, items, kwargs)
        return
    call = getattr(model, method)
    for item, args, *own in items:
        t0 = time.perf_counter()
        try:
            value = call(*args, **kwargs, **(own[0] if own else {}))
        except Exception as err:  # the stage decides: record and go on, or stop (BaseException always stops)
            yield Outcome(item, error=err, seconds=time.perf_counter() - t0)
            continue
        yield Outcome(item, value=value, seconds=time.perf_counter() - t0)


def remote(compute_cfg: Any, loader: Any, label: str) -> Any:
    """A ``RemoteModel`` of ``loader()`` replicas when ``[compute] backend = "ray"``, else ``loader()`` here."""
    if compute_cfg is None or compute_cfg.backend == "local":
        return loader()
    from flywheel.compute.ray_pool import RemoteModel

    return RemoteModel(compute_cfg, loader, label)
