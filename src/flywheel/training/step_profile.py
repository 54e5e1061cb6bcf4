"""Profile a few training steps in whichever process trains them (this one, or each rank of ``--gpus N``).

``benchmarks/train_gpus.py --profile DIR`` sets ``FLYWHEEL_TRAIN_PROFILE`` (JSON: ``path``, ``start``, ``steps``)
before it trains; the trainer's progress callback is wrapped (``wrap``), so after step ``start`` a
``torch.profiler`` and a ``cProfile`` run for ``steps`` steps, and ``path`` gets the top ops by self CPU time and
by CUDA time, the Python functions by own time, and the wall time of those steps. The spawned workers inherit
the environment, so the plain path and the distributed path are profiled at the same steps, the same way.
Unset (always, outside the benchmark) the callback is returned as it is.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "FLYWHEEL_TRAIN_PROFILE"
ROWS = 25


def request(path: Path, *, start: int, steps: int) -> str:
    """The ``ENV`` value that profiles steps ``start + 1 .. start + steps`` into ``path``."""
    return json.dumps({"path": str(path), "start": start, "steps": steps})


def wrap(progress, rank: int = 0):
    """``progress``, profiling the requested steps first when ``ENV`` asks for it. Rank 0 writes ``path``, the
    other ranks of ``--gpus N`` ``<path stem>-rank<r>.txt`` beside it (a slow rank holds the others up)."""
    spec = os.environ.get(ENV)
    if not spec:
        return progress
    conf = json.loads(spec)
    path = Path(conf["path"])
    if rank:
        path = path.with_name(f"{path.stem}-rank{rank}{path.suffix}")
    return _Profiled(progress, path, int(conf["start"]), int(conf["steps"]))


class _Profiled:
    def __init__(self, progress, path: Path, start: int, steps: int):
        self.progress, self.path, self.start, self.steps = progress, path, start, steps
        self.torch_prof = self.py_prof = None
        self.t0 = 0.0

    def __call__(self, done: int, total: int, label: str = "") -> None:
        if done == self.start + self.steps and self.torch_prof is not None:
            self._stop()
        self.progress(done, total, label)
        if done == self.start and self.torch_prof is None:  # the steps after this one are profiled
            self._begin()

    def _begin(self) -> None:
        import cProfile

        import torch
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.torch_prof = profile(activities=acts)
        self.torch_prof.__enter__()
        self.py_prof = cProfile.Profile()
        self.py_prof.enable()
        self.t0 = time.perf_counter()

    def _stop(self) -> None:
        import io
        import pstats

        import torch

        wall = time.perf_counter() - self.t0
        self.py_prof.disable()
        self.torch_prof.__exit__(None, None, None)
        events = self.torch_prof.key_averages()
        py = io.StringIO()
        pstats.Stats(self.py_prof, stream=py).sort_stats("tottime").print_stats(ROWS)
        head = (f"{self.steps} steps after step {self.start}: {wall:.4f} s wall, {wall / self.steps:.4f} s/step "
                f"(pid {os.getpid()}, torch threads {torch.get_num_threads()})")
        parts = [head,
                 "", "## top ops by self CPU time", events.table(sort_by="self_cpu_time_total", row_limit=ROWS)]
        if torch.cuda.is_available():
            parts += ["## top ops by self CUDA time", events.table(sort_by="self_device_time_total", row_limit=ROWS)]
        parts += ["## Python functions by own time (cProfile, this thread)", py.getvalue()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(parts), encoding="utf-8")
        log.info("profile of %d steps written to %s", self.steps, self.path)
        self.torch_prof = self.py_prof = None
        self.start = -1  # once per run
