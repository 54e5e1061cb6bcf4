"""What a tuned judge must beat: the judge as it decides today, i.e. the verdicts it recorded.

The incumbent is not the base VLM's zero-shot answer to the keep question (no ``flywheel judge`` ever
asks that without an adapter) but the newest verdict per image under the current judge policy (the
``[judge]`` settings, the judge model and its active adapter: ``judge.policy_fingerprint``): pixel signals,
VLM checks and policy together. ``rejected`` counts as "reject" (P(keep) 0), ``accepted`` as "keep" (1),
``needs_review`` as 0.5, which the 0.5 line reads as keep: the judge did not reject it. An image without
a verdict under the current policy falls back to its newest verdict under an earlier one (counted as
stale in the attempt's metrics); an image never judged is an error.
"""

from __future__ import annotations

import logging
from typing import Any

from flywheel.config import Config
from flywheel.errors import StageError
from flywheel.judge_tuning import adapters
from flywheel.project import Project

log = logging.getLogger(__name__)

P_KEEP = {"accepted": 1.0, "needs_review": 0.5, "rejected": 0.0}


def current_policy(project: Project, config: Config) -> str:
    """The policy fingerprint ``flywheel judge`` would record verdicts under today (active adapter included)."""
    from flywheel.judge import policy_fingerprint

    spec = config.models.judge
    if spec != "none" and config.tune_judge.use_active_adapter:
        ref = adapters.resolve(project, "active", spec)
        if ref is not None:
            spec = f"{spec}+{ref.adapter_id}"
    return policy_fingerprint(config.judge, None if spec == "none" else spec)


def recorded_verdicts(project: Project, config: Config, image_ids: list[int]) -> tuple[list[float], dict[str, Any]]:
    """(P(keep) per image from its recorded verdict, {policy, stale, verdicts}) for ``image_ids``."""
    policy = current_policy(project, config)
    rows = project.catalog.query(
        "SELECT image_id, verdict, json_extract(policy_json, '$.fingerprint') AS fp FROM verdicts ORDER BY id")
    current: dict[int, str] = {}
    newest: dict[int, str] = {}
    for r in rows:  # ascending ids: the last row seen per image is its newest
        newest[r["image_id"]] = r["verdict"]
        if r["fp"] == policy:
            current[r["image_id"]] = r["verdict"]
    missing = [i for i in image_ids if i not in newest]
    if missing:
        shown = ", ".join(f"#{i}" for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise StageError(f"{len(missing)} held-out reviewed image(s) have no judge verdict ({shown}), so there is "
                         "no judge to compare a tuned one with",
                         hint="run `flywheel judge` first: a tuned judge must beat the verdicts the judge records")
    stale = [i for i in image_ids if i not in current]
    if stale:
        log.warning("tune-judge: %d held-out image(s) have no verdict under the current judge policy %s; their "
                    "newest earlier verdict stands in (run `flywheel judge` to compare with today's judge)",
                    len(stale), policy)
    verdicts = [current.get(i, newest[i]) for i in image_ids]
    counts = {v: verdicts.count(v) for v in P_KEEP}
    return [P_KEEP[v] for v in verdicts], {"policy": policy, "stale": len(stale), "verdicts": counts}
