"""``flywheel calibrate``: how each of the judge's checks agrees with your review decisions.

Once images have human decisions (the newest review per image, ``accepted`` or ``rejected``), every
thresholded check of the judge policy (``[judge]`` keys, ``flywheel.judge_policy``) is compared with them:
a check that fails predicts "reject", one that passes predicts "keep". Per check and scorer it reports
agreement, precision and recall of rejects, Cohen's kappa, a reliability table (the score in equal-width
bins vs the share of those images you kept) and the threshold that would have matched you best.

It only reads the catalog and the config: a suggested threshold is printed with the key to set, and
changing ``flywheel.toml`` is left to the user (a new threshold is a new judge policy).

Reads top to bottom: human decisions, newest score per image and scorer, then per check the numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from flywheel.config import Config
from flywheel.errors import StageError
from flywheel.project import Project

log = logging.getLogger(__name__)

MAX_CANDIDATES = 400  # thresholds tried per check (quantile midpoints beyond that)


@dataclass(frozen=True)
class Check:
    """One thresholded check of the judge policy, as ``judge_policy.decide`` applies it."""

    criterion: str
    scorer_prefix: str
    key: str  # the [judge] setting
    higher_passes: bool  # True: value >= threshold passes (min_*); False: value <= threshold passes (max_*)
    probability: bool  # values in [0, 1]: reliability bins span [0, 1]
    label: str


CHECKS = (
    Check("identity", "face:", "max_face_distance", False, False, "face distance"),
    Check("identity", "vlm_pairwise:", "min_same_character_prob", True, True, "VLM P(same character)"),
    Check("identity", "embedding:", "min_image_similarity", True, False, "image embedding similarity"),
    Check("edit_applied", "pixels:change", "min_changed_fraction", True, False, "changed pixel share"),
    Check("edit_applied", "vlm_pairwise:", "min_edit_prob", True, True, "VLM P(edit applied)"),
    Check("quality", "pixels:sharpness", "min_sharpness", True, False, "sharpness"),
    Check("quality", "pixels:noise", "max_noise_sigma", False, False, "noise sigma"),
    Check("quality", "vlm_pairwise:", "max_artifact_prob", False, True, "VLM P(artifacts)"),
    Check("keep", "vlm_pairwise:", "min_keep_prob", True, True, "tuned judge P(keep)"),
    # The copy check fails only when structure, colour (and face, where known) all say "copy": each of its
    # scores is calibrated on its own here, as if it decided alone.
    Check("copy", "pixels:ssim", "max_copy_similarity", False, False, "structure SSIM to the nearest source"),
    Check("copy", "pixels:delta_e", "max_copy_color_difference", True, False, "colour difference to that source"),
    # A caption mismatch asks for review rather than rejecting; it is still a "not as it is" call to compare.
    Check("caption", "vlm_pairwise:", "min_caption_match", True, True, "VLM P(caption describes the image)"),
)


@dataclass
class CheckReport:
    check: Check
    scorer: str
    threshold: float  # the configured one
    n: int
    human_keep: int
    current: dict[str, float]  # agreement, kappa, reject_precision, reject_recall at the configured threshold
    reliability: list[dict[str, Any]]  # per bin: low, high, n, kept, share_kept, mean_score
    best_threshold: float | None  # None: fewer than two distinct values, nothing to choose
    best: dict[str, float] | None


@dataclass
class CalibrationReport:
    decisions: int  # reviewed images with an accepted / rejected decision
    kept: int
    objective: str
    checks: list[CheckReport] = field(default_factory=list)
    verdicts: dict[str, float] | None = None  # the judge's newest verdicts vs the same decisions


def calibrate(project: Project, cfg: Config | None = None, *, objective: str = "kappa",
              bins: int = 5) -> CalibrationReport:
    """Compare every thresholded check with the human decisions; suggest thresholds; change nothing."""
    import numpy as np

    config = cfg or project.config
    if objective not in ("kappa", "agreement"):
        raise StageError(f"unknown objective {objective!r}", hint="use 'kappa' or 'agreement'")
    # 1. Human decisions: the newest review per edited / generated image, when it is accepted or rejected.
    human = human_decisions(project)
    if not human:
        raise StageError("no human decisions to calibrate against: no edited or generated image has an "
                         "accepted or rejected review", hint="review some images first (`flywheel review`)")
    report = CalibrationReport(len(human), sum(human.values()), objective)
    # 2. Scores: the newest value per image, criterion and scorer (NULL: not measured, left out).
    rows = project.catalog.query(
        "SELECT image_id, criterion, scorer, value FROM scores WHERE id IN (SELECT MAX(id) FROM scores "
        "GROUP BY image_id, criterion, scorer) AND value IS NOT NULL ORDER BY scorer, image_id")
    series: dict[tuple[str, str], list[tuple[float, bool]]] = {}
    for r in rows:
        if r["image_id"] in human:
            series.setdefault((r["criterion"], r["scorer"]), []).append((float(r["value"]), human[r["image_id"]]))
    # 3. Per check and scorer: agreement at the configured threshold, reliability, the best threshold.
    for check in CHECKS:
        for (criterion, scorer), pairs in sorted(series.items()):
            if criterion != check.criterion or not scorer.startswith(check.scorer_prefix):
                continue
            values = np.array([v for v, _ in pairs])
            keep = np.array([h for _, h in pairs])
            threshold = float(getattr(config.judge, check.key))
            current = _metrics(_passes(check, values, np.array([threshold])), keep)
            best_t, best = _best_threshold(check, values, keep, objective, threshold)
            report.checks.append(CheckReport(check, scorer, threshold, len(pairs), int(keep.sum()),
                                             {k: float(v[0]) for k, v in current.items()},
                                             _reliability(check, values, keep, bins), best_t, best))
    # 4. The verdicts as a whole (rejected = reject; accepted and needs_review = not rejected).
    verdicts = verdict_keep(project)
    both = [i for i in human if i in verdicts]
    if both:
        m = _metrics(np.array([[verdicts[i] for i in both]]), np.array([human[i] for i in both]))
        report.verdicts = {"n": float(len(both)), **{k: float(v[0]) for k, v in m.items()}}
    log.info("calibrate: %d decisions, %d check/scorer pairs", report.decisions, len(report.checks))
    return report


def human_decisions(project: Project) -> dict[int, bool]:
    """image id -> kept, from the newest review per edited / generated image (accepted / rejected only)."""
    rows = project.catalog.query(
        """SELECT r.image_id, r.decision FROM reviews r JOIN images i ON i.id = r.image_id
           WHERE r.id = (SELECT MAX(r2.id) FROM reviews r2 WHERE r2.image_id = r.image_id)
             AND r.decision IN ('accepted', 'rejected') AND i.kind IN ('enriched', 'synthetic')""")
    return {int(r["image_id"]): r["decision"] == "accepted" for r in rows}


def verdict_keep(project: Project) -> dict[int, bool]:
    """image id -> not rejected, from the newest verdict per image (any policy)."""
    rows = project.catalog.query("SELECT image_id, verdict FROM verdicts WHERE id IN "
                                 "(SELECT MAX(id) FROM verdicts GROUP BY image_id)")
    return {int(r["image_id"]): r["verdict"] != "rejected" for r in rows}


def _passes(check: Check, values, thresholds):
    """(thresholds x images) booleans: does each image pass the check at each threshold (as decide() does)."""
    return values[None, :] >= thresholds[:, None] if check.higher_passes else values[None, :] <= thresholds[:, None]


def _metrics(pred_keep, human_keep) -> dict[str, Any]:
    """Per row of ``pred_keep`` (thresholds x images): agreement, kappa, reject precision / recall."""
    import numpy as np

    n = human_keep.size
    h = human_keep[None, :]
    rej_tp = (~pred_keep & ~h).sum(axis=1)
    rej_pred = (~pred_keep).sum(axis=1)
    rej_true = int((~human_keep).sum())
    agree = (pred_keep == h).sum(axis=1) / n
    pk_pred, pk_true = pred_keep.sum(axis=1) / n, human_keep.sum() / n
    chance = pk_pred * pk_true + (1 - pk_pred) * (1 - pk_true)
    with np.errstate(divide="ignore", invalid="ignore"):
        kappa = np.where(chance < 1.0, (agree - chance) / np.where(chance < 1.0, 1 - chance, 1.0), 0.0)
        precision = np.where(rej_pred > 0, rej_tp / np.maximum(rej_pred, 1), 0.0)
    recall = rej_tp / rej_true if rej_true else np.zeros_like(agree)
    return {"agreement": agree, "kappa": kappa, "reject_precision": precision, "reject_recall": recall}


def _best_threshold(check: Check, values, keep, objective: str, current: float):
    """The threshold between two observed values that maximises ``objective`` (ties: the other, then nearest)."""
    import numpy as np

    distinct = np.unique(values)
    if distinct.size < 2:
        return None, None
    candidates = (distinct[:-1] + distinct[1:]) / 2  # midpoints: no image sits on the line
    if candidates.size > MAX_CANDIDATES:
        candidates = np.unique(np.quantile(candidates, np.linspace(0, 1, MAX_CANDIDATES)))
    m = _metrics(_passes(check, values, candidates), keep)
    other = "agreement" if objective == "kappa" else "kappa"
    order = np.lexsort((np.abs(candidates - current), -np.round(m[other], 12), -np.round(m[objective], 12)))
    i = int(order[0])
    return float(candidates[i]), {k: float(v[i]) for k, v in m.items()}


def _reliability(check: Check, values, keep, bins: int) -> list[dict[str, Any]]:
    """Equal-width bins of the score ([0, 1] for probabilities, else the observed range) vs share kept."""
    import numpy as np

    low, high = (0.0, 1.0) if check.probability else (float(values.min()), float(values.max()))
    if high <= low:
        return [{"low": low, "high": high, "n": int(values.size), "kept": int(keep.sum()),
                 "share_kept": float(keep.mean()), "mean_score": float(values.mean())}]
    edges = np.linspace(low, high, bins + 1)
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)  # the top edge joins the last bin
    table = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": count,
                      "kept": int(keep[members].sum()), "share_kept": float(keep[members].mean()) if count else None,
                      "mean_score": float(values[members].mean()) if count else None})
    return table


def render(report: CalibrationReport) -> list[str]:
    """The report as text lines: per check the numbers, a reliability table with bars, the suggestion."""
    lines = [(f"calibration against {report.decisions} human decisions ({report.kept} kept, "
             f"{report.decisions - report.kept} rejected); suggestions maximise {report.objective}")]
    if report.verdicts:
        v = report.verdicts
        lines.append(f"judge verdicts (newest per image, {int(v['n'])} reviewed): agreement {v['agreement']:.3f}, "
                     f"kappa {v['kappa']:.3f}, reject precision {v['reject_precision']:.3f} / "
                     f"recall {v['reject_recall']:.3f}")
    if not report.checks:
        lines.append("no reviewed image has a score from a thresholded check yet: run `flywheel judge`")
    for c in report.checks:
        cur = c.current
        lines += ["", f"{c.check.criterion} / {c.check.label} ({c.scorer}): {c.n} reviewed images, {c.human_keep} kept",
                  (f"  at {c.check.key} = {c.threshold:g}: agreement {cur['agreement']:.3f}, kappa {cur['kappa']:.3f}, "
                  f"reject precision {cur['reject_precision']:.3f} / recall {cur['reject_recall']:.3f}"),
                  f"  {'score bin':>21s} {'images':>6s} {'kept':>5s}  share kept by you"]
        for b in c.reliability:
            share = "" if b["share_kept"] is None else f"{b['share_kept']:.2f} " + "#" * round(20 * b["share_kept"])
            lines.append(f"  {b['low']:>10.4g} - {b['high']:<8.4g} {b['n']:6d} {b['kept']:5d}  {share}".rstrip())
        if c.best is None:
            lines.append("  no suggestion: every reviewed image has the same score")
        elif abs(c.best_threshold - c.threshold) < 1e-12 or c.best[report.objective] <= cur[report.objective] + 1e-12:
            lines.append(f"  the configured {c.check.key} = {c.threshold:g} already matches your decisions best")
        else:
            lines.append(f"  suggestion: set [judge] {c.check.key} = {c.best_threshold:.4g} in flywheel.toml "
                         f"(agreement {c.best['agreement']:.3f}, kappa {c.best['kappa']:.3f} on these decisions)")
    return lines
