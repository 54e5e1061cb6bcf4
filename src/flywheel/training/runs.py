"""Which LoRA run ``flywheel train`` and ``flywheel run`` continue, and when they start a new one instead.

A run that stopped (killed, crashed, NaN) is resumed from its last checkpoint with its own frozen settings,
so the result is the run the user started. When the settings it would be resumed with are no longer the
user's ([train] edited, another base model, another dataset version), resuming would silently ignore the
edit: the old run is set aside instead (superseded: status 'failed', and its stage-run operation's error
names the run that replaced it and why) and a new run starts. ``--restart`` sets aside every unfinished
run on request. A superseded run is never resumed again; its checkpoints stay on disk.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flywheel.config import TrainConfig
from flywheel.errors import StageError

log = logging.getLogger(__name__)

SUPERSEDED = "superseded by run"  # how a set-aside run's stage-run operation error starts
# Stopped, not set aside, and not followed by a finished run of the same round (which made it obsolete).
_UNFINISHED = f"""SELECT r.* FROM lora_runs r LEFT JOIN operations o ON o.id = r.operation_id
                  WHERE r.status != 'ok' AND COALESCE(o.error, '') NOT LIKE '{SUPERSEDED}%'
                    AND NOT EXISTS (SELECT 1 FROM lora_runs later WHERE later.round = r.round
                                    AND later.status = 'ok' AND later.id > r.id)"""


@dataclass
class Plan:
    """What ``train`` does: continue ``run``, or (``run`` None) start a new run, setting ``set_aside`` aside."""

    run: Any = None  # the lora_runs row to continue
    dataset_version: int | None = None  # None: freeze a new version for the next round
    set_aside: list[int] = field(default_factory=list)
    why: str = ""
    same_set: bool = False  # the new run replaces one on this very set: it was vetted when that one started
    base: str | None = None  # the base folder, when resolving it was needed to decide


def plan(project, cfg: TrainConfig | None, *, resume: int | bool, restart: bool, dataset_version: int | None,
         base_of: Callable[[TrainConfig], str]) -> Plan:
    """Continue, replace or refuse: the decision ``train`` acts on (nothing is written here)."""
    cat = project.catalog
    if resume:
        run = unfinished_run(cat, None if resume is True else int(resume))
        version = cat.query("SELECT version FROM dataset_versions WHERE id = ?", (run["dataset_id"],))[0]["version"]
        if cfg is None:  # the library call "resume this run": its own settings, nothing to compare
            return Plan(run=run, dataset_version=version)
        base = base_of(cfg)
        changed = changes(run, cfg, base=base, dataset_version=dataset_version, run_dataset_version=version)
        if not changed:
            return Plan(run=run, dataset_version=version)
        return Plan(dataset_version=dataset_version or version, set_aside=[run["id"]], same_set=dataset_version is None,
                    why="the settings changed since it stopped: " + "; ".join(changed), base=base)
    if restart:
        return Plan(dataset_version=dataset_version, set_aside=[r["id"] for r in unfinished_runs(cat)],
                    why="`flywheel train --restart`")
    refuse_second_run(project, cat)
    return Plan(dataset_version=dataset_version)


def unfinished_runs(cat) -> list:
    """Runs that stopped before the end and were not set aside, newest first."""
    return cat.query(_UNFINISHED + " ORDER BY r.id DESC")


def unfinished_run(cat, run_id: int | None = None):
    """The newest unfinished run (or run ``run_id``, which must be unfinished and not set aside)."""
    rows = cat.query(_UNFINISHED + " AND r.id = ?", (run_id,)) if run_id else unfinished_runs(cat)
    if rows:
        return rows[0]
    if run_id:
        known = cat.query("SELECT r.status, o.error FROM lora_runs r LEFT JOIN operations o ON o.id = r.operation_id "
                          "WHERE r.id = ?", (run_id,))
        if known and (known[0]["error"] or "").startswith(SUPERSEDED):
            raise StageError(f"run {run_id} was set aside ({known[0]['error']}) and is not resumed",
                             hint="`flywheel train --resume` continues the newest unfinished run")
    raise StageError("no unfinished training run to resume" + (f" with id {run_id}" if run_id else ""),
                     hint="start one with `flywheel train`; finished runs are not resumed")


def changes(run, cfg: TrainConfig, *, base: str, dataset_version: int | None, run_dataset_version: int) -> list[str]:
    """What differs between a stopped run and what the user asks for now, as "key: old -> new" (empty: same)."""
    stored = json.loads(run["config_json"])
    try:  # defaults of keys added since the run started fill in, so an upgrade alone changes nothing
        old = _normalised(TrainConfig.model_validate(stored).model_dump())
    except ValidationError:  # written by a Flywheel with other [train] keys: compare what is there
        old = _normalised(stored)
    new = _normalised(cfg.model_dump())
    found = [f"{key}: {_show(old.get(key))} -> {_show(new.get(key))}" for key in sorted(set(old) | set(new))
             if old.get(key) != new.get(key)]
    if Path(run["base_model"]).expanduser().resolve() != Path(base).expanduser().resolve():
        found.append(f"base model: {run['base_model']} -> {base}")
    if dataset_version is not None and dataset_version != run_dataset_version:
        found.append(f"dataset: v{run_dataset_version} -> v{dataset_version}")
    return found


def supersede(cat, run_ids: list[int], *, by: int, reason: str) -> None:
    """Set runs aside for run ``by`` (call inside the transaction that records ``by``)."""
    for run_id in run_ids:
        cat.execute("UPDATE lora_runs SET status = 'failed' WHERE id = ?", (run_id,))
        cat.execute("UPDATE operations SET status = 'failed', error = ? WHERE id = "
                    "(SELECT operation_id FROM lora_runs WHERE id = ?)", (f"{SUPERSEDED} {by}: {reason}", run_id))


def announce(planned: Plan, run_id: int) -> None:
    """Say which runs were set aside, why, and which run starts instead (a warning: shown by default)."""
    if planned.set_aside:
        runs_text = ", ".join(map(str, planned.set_aside))
        log.warning("run %s set aside, not resumed (%s); new run %d starts from step 0", runs_text, planned.why,
                    run_id)


def stopped_at(run_dir: Path) -> str:
    """Where a stopped run got to, from its checkpoints: "last checkpoint at step 400" or "no checkpoint"."""
    from flywheel.training import checkpoint

    last = checkpoint.list_checkpoints(run_dir)
    if not last:
        return "no checkpoint"
    step = json.loads((last[-1] / "state.json").read_text(encoding="utf-8")).get("step", "?")
    return f"last checkpoint at step {step}"


def refuse_second_run(project, cat) -> None:
    """A plain ``flywheel train`` while a run is unfinished: continuing it or starting over is the user's call."""
    rows = unfinished_runs(cat)
    if not rows:
        return
    run = rows[0]
    raise StageError(
        f"run {run['id']} (round {run['round']}) did not finish ({stopped_at(project.workspace / run['output_dir'])})",
        hint="`flywheel train --resume` continues it (a new run if [train] changed since), "
        "`flywheel train --restart` sets it aside and starts a new run",
    )


def _normalised(dump: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dump))  # tuples vs lists, as stored in the catalog


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value
