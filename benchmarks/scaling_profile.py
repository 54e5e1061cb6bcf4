"""Where the driver's time goes while a stage runs on Ray replicas (``benchmarks/scaling.py``, issue 17)."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager


class _Timed:
    """An iterator that adds the time spent producing each item to ``totals[key]``."""

    def __init__(self, items, totals: dict, key: str):
        self.items, self.totals, self.key = iter(items), totals, key

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.items)
        finally:
            self.totals[self.key] += time.perf_counter() - t0


@contextmanager
def profile(totals: dict):
    """Where the driver's time goes during a stage on Ray replicas, by wrapping (for the stage only) the
    points every stage passes through: ``RemoteModel.map_remote`` (the stage's unit generator = prepare;
    ``RemoteModel._send`` = send; ``RemoteModel._wait`` = wait on the actors; the time the stage holds each
    outcome = record), ``Catalog.execute`` (every SQL statement, commits included) and
    ``ImageStore.put_image`` (PNG encode + fsync). ``busy`` sums the replicas' own call seconds."""
    from flywheel.catalog.db import Catalog
    from flywheel.catalog.store import ImageStore
    from flywheel.compute.ray_pool import RemoteModel

    inside: list[str] = []  # send/wait being timed: a send inside a wait is counted as send only

    def timed(fn, key):
        exclusive = key in ("send", "wait")

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            inside.extend([key] if exclusive else [])
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - t0
                totals[key] += seconds
                if exclusive:
                    inside.pop()
                    if inside:
                        totals[inside[-1]] -= seconds
        return wrapper

    map_remote = RemoteModel.map_remote

    def profiled_map(self, method, items, kwargs):
        outcomes = map_remote(self, method, _Timed(items, totals, "prepare"), kwargs)
        while True:
            t0 = time.perf_counter()
            try:
                out = next(outcomes)
            except StopIteration:
                return
            finally:
                totals["in_map"] += time.perf_counter() - t0
            totals["busy"] += out.seconds
            t0 = time.perf_counter()
            yield out
            totals["record"] += time.perf_counter() - t0

    saved = [(RemoteModel, "map_remote", map_remote), (RemoteModel, "_send", RemoteModel._send),
             (RemoteModel, "_wait", RemoteModel._wait), (Catalog, "execute", Catalog.execute),
             (ImageStore, "put_image", ImageStore.put_image)]
    RemoteModel.map_remote = profiled_map
    for (cls, name, fn), key in zip(saved[1:], ["send", "wait", "catalog_sql", "store_put_image"]):
        setattr(cls, name, timed(fn, key))
    try:
        yield totals
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def breakdown(r: dict) -> str:
    """The N-replica run's driver time as one line per part (seconds and share of the stage)."""
    t, stage = defaultdict(float, r["profile"]), r["stage_s"]
    other_map = t["in_map"] - t["prepare"] - t["send"] - t["wait"]
    outside = stage - t["in_map"] - t["record"]
    parts = [("prepare units (stage's generator: read inputs, 'running' rows)", t["prepare"]),
             ("send to actors (pickling inputs)", t["send"]),
             ("wait on actors (until one finishes)", t["wait"]),
             ("record results (stage code per outcome: rows, store)", t["record"]),
             ("other dispatch", other_map), ("before/after the units (planning, summary)", outside)]
    lines = [f"    {name:64s} {s:8.2f} s {s / stage:6.1%}" for name, s in parts]
    lines += [(f"    of which catalog SQL (all statements, commits) {t['catalog_sql']:.2f} s, "
               f"store.put_image (PNG encode + fsync) {t['store_put_image']:.2f} s"),
              (f"    replicas busy {t['busy']:.2f} s of {r['replicas']} x {stage:.2f} s = "
               f"{t['busy'] / (r['replicas'] * stage):.0%} (the rest: idle, waiting for the driver or the transfer)")]
    return "\n".join(lines)
