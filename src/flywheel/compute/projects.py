"""``flywheel run DIR...`` / ``--queue FILE``: the loop for several projects (characters) through one cluster.

Each project keeps its own catalog and config; they run one after another in this process, so with
``[compute] backend = "ray"`` every project's stages spread over the whole cluster, which is joined once (the
first Ray project's ``[compute] address``). A queue file is read again after each project, so folders
appended while the run goes on are picked up; each folder runs once. A project that fails (a bad config, a
missing model) is reported in the table with its error, and the others still run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flywheel.errors import FlywheelError
from flywheel.progress import ProgressFn

log = logging.getLogger(__name__)


@dataclass
class ProjectRun:
    folder: Path
    status: str = "queued"  # queued | running | done | waiting for review | failed
    detail: str = ""  # the verdict and report, how many images wait for review, or the error
    seconds: float = 0.0


def queued_folders(paths: list[Path], queue: Path | None) -> Iterator[Path]:
    """``paths``, then the queue file's folders (one per line, '#' comments), read again after each one."""
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            yield path
    while queue is not None:
        lines = [ln.split("#", 1)[0].strip() for ln in queue.read_text(encoding="utf-8").splitlines()]
        fresh = [p for p in ((queue.parent / ln).expanduser() for ln in lines if ln) if p.resolve() not in seen]
        if not fresh:
            return
        seen.add(fresh[0].resolve())
        yield fresh[0]


def run_projects(folders: Iterator[Path], *, progress: ProgressFn | None = None,
                 on_update: Callable[[list[ProjectRun]], None] | None = None,
                 on_step: Callable[[str], None] | None = None) -> list[ProjectRun]:
    """Run the loop (``flywheel.loop.run_loop``) in each folder; the table of every project so far."""
    from flywheel.loop import run_loop
    from flywheel.project import open_project

    runs: list[ProjectRun] = []
    cluster: str | None = None
    for folder in folders:
        run = ProjectRun(folder, "running")
        runs.append(run)
        if on_update:
            on_update(runs)
        t0 = time.perf_counter()
        try:
            with open_project(folder) as project:
                compute = project.config.compute
                if compute.backend == "ray":
                    if cluster is not None and compute.address != cluster:
                        log.warning("%s: [compute] address %r ignored: this run already joined %r", folder,
                                    compute.address, cluster or "a local cluster")
                    cluster = compute.address if cluster is None else cluster
                result = run_loop(project, progress=progress,
                                  on_step=(lambda s, name=folder.name: on_step(f"{name}: {s}")) if on_step else None)
        except (FlywheelError, OSError) as err:  # this project cannot go on; the others still can
            run.status, run.detail = "failed", str(err).split("\n")[0]
            log.warning("%s: %s", folder, run.detail)
        else:
            if result.waiting_for_review:
                run.status, run.detail = "waiting for review", f"{result.waiting_for_review} images"
            else:
                run.status = "done"
                run.detail = f"{result.verdict.replace('_', ' ')}: {result.report}" if result.report else ""
        run.seconds = time.perf_counter() - t0
        if on_update:
            on_update(runs)
    return runs
