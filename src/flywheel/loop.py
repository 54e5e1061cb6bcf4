"""``flywheel run``: the whole data flywheel, resumable from the catalog after a kill at any point.

ingest -> enrich -> caption -> judge -> [review gate] -> dataset v1 -> train v1 -> generate (round 1) ->
caption -> judge -> [review gate] -> dataset v2 -> train v2 -> ... -> evaluate (last two rounds).

Nothing here keeps state of its own: every step asks the catalog what is done. Each stage skips finished
units (work keys, policy fingerprints), a dataset is frozen once per round, an unfinished training run is
resumed rather than started again, so re-running after a crash neither duplicates nor drops work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.catalog.queries import LATEST_REVIEW, LATEST_VERDICT
from flywheel.progress import ProgressFn, no_progress
from flywheel.project import Project

log = logging.getLogger(__name__)


@dataclass
class LoopResult:
    steps: list[str] = field(default_factory=list)  # what ran (or was found done), in order
    waiting_for_review: int = 0  # > 0: stopped at a review gate
    report: Path | None = None
    verdict: str | None = None

    @property
    def finished(self) -> bool:
        return self.waiting_for_review == 0


@dataclass
class StageHooks:
    """Optional overrides (tests and the demo inject models, e.g. a scripted VLM or a device)."""

    captioner: Any = None
    judge_vlm: Any = None
    editor: Any = None
    device: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def run_loop(project: Project, *, hooks: StageHooks | None = None, progress: ProgressFn | None = None,
             on_step: Callable[[str], None] | None = None) -> LoopResult:
    hooks = hooks or StageHooks()
    progress = progress or no_progress
    result = LoopResult()
    clock = _StepClock(project.catalog)

    def step(name: str) -> None:
        result.steps.append(name)
        log.info("loop: %s", name)
        clock.start(name)
        if on_step:
            on_step(name)

    try:
        _loop(project, hooks, progress, step, result)
    except BaseException as err:
        clock.finish("failed", f"{type(err).__name__}: {err}".split("\n")[0])
        raise
    clock.finish("ok")
    return result


class _StepClock:
    """One catalog row per loop step (stage 'run'): its wall time and the GPU memory peak during it, so a
    user (and benchmarks/loop.py) can see where a run's time and memory went."""

    def __init__(self, catalog):
        self.catalog, self.op, self.t0 = catalog, None, 0.0

    def start(self, name: str) -> None:
        import time

        from flywheel.models.pool import reset_gpu_peak

        self.finish("ok")
        reset_gpu_peak()
        self.op, self.t0 = self.catalog.start_operation("run", kind="stage_run", params={"step": name}), time.perf_counter()

    def finish(self, status: str, error: str | None = None) -> None:
        import json
        import time

        from flywheel.models.pool import gpu_peak_gib

        if self.op is None:
            return
        row = self.catalog.query("SELECT params_json FROM operations WHERE id = ?", (self.op,))[0]
        params = {**json.loads(row["params_json"]), "gpu_peak_gib": gpu_peak_gib()}
        with self.catalog.transaction():
            self.catalog.execute("UPDATE operations SET params_json = ? WHERE id = ?", (json.dumps(params), self.op))
        self.catalog.finish_operation(self.op, status, int((time.perf_counter() - self.t0) * 1000), error)
        self.op = None


def _loop(project: Project, hooks: StageHooks, progress: ProgressFn, step: Callable[[str], None],
          result: LoopResult) -> None:
    from flywheel.caption import caption
    from flywheel.enrich import enrich
    from flywheel.generate import generate
    from flywheel.ingest import ingest
    from flywheel.judge import judge

    cfg = project.config

    # 1. Sources (ingest is a no-op for files already in the catalog).
    if cfg.loop.sources:
        step("ingest")
        ingest(project, [str(_under(project.root, p)) for p in cfg.loop.sources], progress=progress)
    # 2. Round 0: identity-preserving edits of the sources, captioned and judged.
    step("enrich")
    enrich(project, editor=hooks.editor, progress=progress)
    _caption_and_judge(project, caption, judge, hooks, progress, step)
    for k in range(1, cfg.loop.rounds + 1):
        # 3. The review gate before freezing the training set of round k.
        pending = pending_reviews(project, cfg.loop.review)
        if pending:
            step(f"waiting for review ({pending} images)")
            result.waiting_for_review = pending
            return
        # 4. Dataset v_k and LoRA v_k (frozen once; a killed training run is resumed).
        step(f"train round {k}")
        _train_round(project, k, hooks, progress)
        # 5. Synthetic images of round k feed round k+1 (the last round's are not needed).
        if k < cfg.loop.rounds:
            step(f"generate round {k}")
            generate(project, lora_run_id=_run_of_round(project, k), device=hooks.device, progress=progress,
                     **hooks.model_kwargs)
            _caption_and_judge(project, caption, judge, hooks, progress, step)
    # 6. Measure the last round against the one before.
    if cfg.loop.evaluate and cfg.loop.rounds >= 2:
        from flywheel.evaluate import evaluate

        step("evaluate")
        pair = (_run_of_round(project, cfg.loop.rounds - 1), _run_of_round(project, cfg.loop.rounds))
        done = project.catalog.query(
            "SELECT verdict, report_path FROM evaluations WHERE baseline_run_id = ? AND candidate_run_id = ? "
            "ORDER BY id DESC LIMIT 1", pair)
        if done:  # a finished loop re-run adds nothing; `flywheel evaluate` recomputes on request
            result.verdict, result.report = done[0]["verdict"], project.workspace / done[0]["report_path"]
        else:
            ev = evaluate(project, baseline_run=pair[0], candidate_run=pair[1], device=hooks.device,
                          progress=progress, **hooks.model_kwargs)
            result.report, result.verdict = ev.report, ev.verdict


def _caption_and_judge(project, caption, judge, hooks, progress, step) -> None:
    """One pool for both stages: the judge reuses the captioner's VLM when [models] names the same model;
    it is released before training."""
    from flywheel.models.pool import ModelPool

    with ModelPool(project.config.models, catalog=project.catalog, api_cfg=project.config.api,
                   compute=project.config.compute) as pool:
        step("caption")
        caption(project, vlm=hooks.captioner, progress=progress, pool=pool)
        step("judge")
        judge(project, vlm=hooks.judge_vlm, progress=progress, pool=pool)


def _train_round(project: Project, k: int, hooks: StageHooks, progress: ProgressFn) -> None:
    from flywheel.dataset import freeze_dataset
    from flywheel.train import train

    cat = project.catalog
    runs = cat.query("SELECT id, status FROM lora_runs WHERE round = ? ORDER BY id DESC", (k,))
    if runs and runs[0]["status"] == "ok":
        return
    if runs:  # killed or failed mid-run: continue it from its last checkpoint, same run id; or, when [train],
        # the base model or the dataset changed since it stopped, set it aside and train a new run (it says so)
        train(project, project.config.train, resume=runs[0]["id"], device=hooks.device, progress=progress)
        return
    existing = cat.query("SELECT version FROM dataset_versions WHERE round = ? ORDER BY version DESC LIMIT 1", (k,))
    version = existing[0]["version"] if existing else freeze_dataset(project, k).version
    # The loop's own review gate ([loop] review) has decided what trains: 'auto' trains on what the judge
    # accepted and leaves the rest out, which `flywheel train` alone would refuse without --force.
    train(project, dataset_version=version, device=hooks.device, progress=progress, force=True)


def _run_of_round(project: Project, k: int) -> int:
    return project.catalog.query("SELECT id FROM lora_runs WHERE round = ? AND status = 'ok' ORDER BY id DESC LIMIT 1",
                                 (k,))[0]["id"]


def pending_reviews(project: Project, mode: str) -> int:
    """How many training candidates the review gate waits for (0 in 'auto' mode)."""
    if mode == "auto":
        return 0
    verdict_filter = "AND lv.verdict = 'needs_review'" if mode == "needs_review" else ""
    return project.catalog.query(
        f"""SELECT COUNT(*) FROM images i JOIN ({LATEST_VERDICT}) lv ON lv.image_id = i.id
            LEFT JOIN ({LATEST_REVIEW}) lr ON lr.image_id = i.id
            WHERE i.kind != 'source' AND i.purpose = 'train' {verdict_filter}
              AND (lr.decision IS NULL OR lr.decision IN ('skipped', 'cleared'))""")[0][0]


def _under(root: Path, pattern: str) -> Path:
    p = Path(pattern).expanduser()
    return p if p.is_absolute() else root / p
