"""Scores as a reviewer reads them: "identity: face distance 0.42 (accept ≤ 0.60)", not "identity 0.42
face:dlib_resnet_v1".

Each label names the measurement, its value and the line the judge policy (``flywheel.judge_policy``)
draws, and says whether the value is on the accepted side ('pass'), the wrong side ('fail'), could not
be measured ('unknown') or carries no threshold ('info'). The threshold recorded with the score
(``details_json``: ``max_distance``, ``min``, ``max``) is preferred, since it is the one the image was
judged by; the project's current ``[judge]`` settings fill in where a scorer records none.
Labels are read-only text: they never change a score or a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flywheel.config import JudgeConfig


@dataclass
class Label:
    text: str
    status: str  # pass / fail / unknown / info
    scorer: str  # the raw scorer name, for a tooltip


def score_label(criterion: str, scorer: str, value: float | None, details: dict[str, Any],
                cfg: JudgeConfig) -> Label:
    family = scorer.split(":", 1)[0]
    note = _note(details)

    def bound(key: str, default: float) -> float:
        got = details.get(key)
        return float(got) if isinstance(got, (int, float)) and not isinstance(got, bool) else default

    def label(text: str, status: str) -> Label:
        return Label(text, status, scorer)

    def unknown(what: str) -> Label:  # "identity: no face found in the image"
        return label(f"{what.split(':')[0]}: {note or 'not measured'}", "unknown")

    def at_most(what: str, shown: str, limit: float, fmt: str) -> Label:
        if value is None:
            return unknown(what)
        return label(f"{what} {shown} (accept ≤ {limit:{fmt}})", "pass" if value <= limit else "fail")

    def at_least(what: str, shown: str, limit: float, fmt: str) -> Label:
        if value is None:
            return unknown(what)
        return label(f"{what} {shown} (accept ≥ {limit:{fmt}})", "pass" if value >= limit else "fail")

    v = value if value is not None else float("nan")
    if family == "vlm_verdict" or criterion == "structured_verdict":
        return _verdict_label(criterion, value, note, scorer)
    if criterion == "identity":
        if family == "face":
            source = details.get("closest_source_id")
            of = f" to source #{source}" if source is not None else ""
            return at_most("identity: face distance", f"{v:.2f}{of}", bound("max_distance", cfg.max_face_distance), ".2f")
        if family == "vlm_pairwise":
            return at_least("identity: P(same character)", f"{v:.2f}", cfg.min_same_character_prob, ".2f")
        if family in ("embedding", "clip_i"):
            return at_least("identity: image similarity", f"{v:.2f}", bound("min", cfg.min_image_similarity), ".2f")
    if criterion == "edit_applied":
        if family == "mask":  # the composite editor's person mask (signals.segmentation)
            if details.get("ok", True):
                return label(f"subject mask: covers {v:.0%} of the frame (usable)", "pass")
            return label(f"subject mask failed: {details.get('problem') or 'unusable'}", "fail")
        if scorer == "pixels:change":
            return at_least("edit:", f"{v:.0%} of pixels changed", bound("min", cfg.min_changed_fraction), ".0%")
        if family == "vlm_pairwise":
            return at_least("edit: P(applied)", f"{v:.2f}", cfg.min_edit_prob, ".2f")
    if criterion == "quality":
        if scorer == "pixels:sharpness":
            return at_least("quality: sharpness", f"{v:.4f}", bound("min", cfg.min_sharpness), ".4f")
        if scorer == "pixels:noise":
            return at_most("quality: noise σ", f"{v:.3f}", bound("max", cfg.max_noise_sigma), ".3f")
        if family == "vlm_pairwise":
            return at_most("quality: P(artifacts)", f"{v:.2f}", cfg.max_artifact_prob, ".2f")
    if criterion == "keep":
        return at_least("tuned judge: P(keep)", f"{v:.2f}", cfg.min_keep_prob, ".2f")
    if criterion == "duplicate":
        return _duplicate_label(scorer, value, details, cfg, note)
    shown = "n/a" if value is None else f"{value:.3g}"
    return label(f"{criterion.replace('_', ' ')}: {shown}" + (f" ({note})" if note else ""),
                 "unknown" if value is None else "info")


def _verdict_label(criterion: str, value: float | None, note: str | None, scorer: str) -> Label:
    if value is None:
        return Label(f"VLM verdict: {note or 'no answer'}", "unknown", scorer)
    good = value >= 0.5
    said = {"identity": ("same character", "not the same character"),
            "edit_applied": ("edit applied", "edit not applied"),
            "quality": ("no artifacts", "artifacts")}.get(criterion, ("yes", "no"))
    text = f"VLM verdict: {said[0] if good else said[1]}"
    return Label(text + (f' ("{note}")' if note else ""), "pass" if good else "fail", scorer)


def _duplicate_label(scorer: str, value: float | None, details: dict[str, Any], cfg: JudgeConfig,
                     note: str | None) -> Label:
    limit = details.get("max_distance", cfg.near_duplicate_distance)
    if scorer.startswith("phash"):
        other = details.get("nearest_image_id")
        if value is None:
            return Label("duplicate: nothing to compare with" + (f" ({note})" if note else ""), "info", scorer)
        if value <= limit:  # a candidate only: the pixel comparison (pixels:change) confirms or clears it
            return Label(f"near-duplicate of #{other}? (phash distance {value:.0f}, limit {limit})", "unknown", scorer)
        return Label(f"not a near-duplicate: closest #{other} at phash distance {value:.0f} (limit {limit})",
                     "pass", scorer)
    other = details.get("image_id", details.get("nearest_image_id"))
    distance = details.get("phash_distance")
    at = f"phash distance {distance}, limit {limit}; " if distance is not None else ""
    most = float(details.get("max", cfg.near_duplicate_max_change))
    if value is None:
        return Label(f"duplicate: {note or 'not measured'}", "unknown", scorer)
    if value < most:
        return Label(f"near-duplicate of #{other} ({at}{value:.1%} of pixels differ, duplicate < {most:.0%})",
                     "fail", scorer)
    return Label(f"not a duplicate of #{other} ({at}{value:.1%} of pixels differ, duplicate < {most:.0%})",
                 "pass", scorer)


def _note(details: dict[str, Any]) -> str | None:
    for key in ("reason", "reasons", "note", "error"):  # the VLM verdict says 'reasons', face scores 'note'
        if details.get(key):
            return " ".join(str(details[key]).split())[:300]
    return None
