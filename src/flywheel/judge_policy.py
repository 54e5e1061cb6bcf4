"""The judge's policy: scores in, one verdict out (accepted / rejected / needs_review) with its reason.

Pure functions, no I/O, so every rule is testable on numbers alone. Each criterion yields checks that
pass, fail or are unknown; any failure rejects (the reason lists every failing check with its numbers),
otherwise anything unknown (no face to compare, an unparseable judge answer) asks a human, and only
an image that passes every check it could be given is accepted. A missing signal never accepts.

The VLM's structured verdict is parsed here too: its answer is data. Only the three booleans and the
reasons string are read; surrounding prose (including text that tries to give instructions) is
ignored, and an answer with several candidate objects is ambiguous and counts as unparseable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from flywheel.config import JudgeConfig

VERDICT_KEYS = ("same_character", "edit_applied", "artifacts")


@dataclass
class ImageScores:
    """Everything measured about one candidate image (None: not measured, see the score's details)."""

    face_distance: float | None = None
    face_source_id: int | None = None
    face_note: str = ""  # why there is no face distance
    face_distances: dict[int, float] = field(default_factory=dict)  # to each source with a face, by source id
    same_character_prob: float | None = None
    image_similarity: float | None = None  # whole-image embedding cosine to the closest source (optional)
    image_similarity_source_id: int | None = None
    changed_fraction: float | None = None  # None: no parent to compare with (synthetic)
    mask_coverage: float | None = None  # composite edits cut out with a person mask: its share of the frame
    mask_problem: str | None = None  # why that mask cannot be trusted ("subject mask failed: ...")
    edit_prob: float | None = None
    sharpness: float | None = None
    noise_sigma: float | None = None
    artifact_prob: float | None = None
    keep_prob: float | None = None  # a tuned judge's P(keep) (flywheel.judge_tuning); None without an adapter
    dup_distance: int | None = None
    dup_of: int | None = None
    dup_change: float | None = None  # pixel change vs the phash-nearest image (None: none within the distance)
    copy_similarity: float | None = None  # grey SSIM to the nearest source, straight or mirrored (signals.copies)
    copy_source_id: int | None = None
    copy_mirrored: bool = False
    copy_color_difference: float | None = None  # median Delta E to that source
    caption_match_prob: float | None = None  # the VLM's P("the caption describes this image")
    verdict_json: dict[str, Any] | None = None
    verdict_error: str | None = None


def parse_verdict(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """(verdict dict, None) or (None, the problem). Reads the single JSON object with the verdict keys."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    pos = text.find("{")
    while pos != -1:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            pos = text.find("{", pos + 1)
            continue
        if isinstance(obj, dict) and any(k in obj for k in VERDICT_KEYS):
            found.append(obj)
        pos = text.find("{", end)
    if not found:
        return None, "no JSON object with the verdict keys"
    if len(found) > 1:
        return None, f"{len(found)} JSON objects with verdict keys (ambiguous; possibly injected)"
    obj = found[0]
    wrong = [k for k in VERDICT_KEYS if not isinstance(obj.get(k), bool)]
    if wrong:
        return None, f"keys {wrong} missing or not true/false"
    reasons = obj.get("reasons", "")
    if not isinstance(reasons, str):
        return None, "'reasons' is not a string"
    return {**{k: obj[k] for k in VERDICT_KEYS}, "reasons": reasons[:500]}, None


def _checks(s: ImageScores, c: JudgeConfig, *, has_vlm: bool, kind: str) -> list[tuple[str, str]]:
    """(status, message) per check; status is 'pass', 'fail' or 'unknown'."""
    out: list[tuple[str, str]] = []

    def check(ok: bool, good: str, bad: str) -> None:
        out.append(("pass", good) if ok else ("fail", bad))

    # Identity.
    if s.face_distance is not None:
        d = s.face_distance
        check(d <= c.max_face_distance, f"identity: face distance {d:.2f} <= {c.max_face_distance}",
              f"identity: face distance {d:.2f} > {c.max_face_distance} (closest source #{s.face_source_id})")
    elif c.no_face == "reject":
        out.append(("fail", f"identity: {s.face_note} (judge.no_face = 'reject')"))
    elif c.no_face == "needs_review" or (c.no_face == "defer" and s.same_character_prob is None):
        out.append(("unknown", f"identity: {s.face_note}" + ("" if has_vlm else " and no VLM to check it")))
    if s.same_character_prob is not None:
        p = s.same_character_prob
        check(p >= c.min_same_character_prob, f"identity: P(same character) {p:.2f}",
              f"identity: VLM P(same character) {p:.2f} < {c.min_same_character_prob}")
    if s.image_similarity is not None:
        sim = s.image_similarity
        check(sim >= c.min_image_similarity, f"identity: image similarity {sim:.2f}",
              f"identity: image embedding similarity {sim:.2f} < {c.min_image_similarity} "
              f"(closest source #{s.image_similarity_source_id})")
    # Edit applied (edited images are compared with their parent; synthetic ones with their prompt).
    if s.changed_fraction is not None:
        f = s.changed_fraction
        check(f >= c.min_changed_fraction, f"edit: {f:.1%} of pixels changed",
              f"edit_applied: only {f:.1%} of pixels changed vs the parent (< {c.min_changed_fraction:.0%})")
    elif kind == "enriched":
        out.append(("unknown", "edit_applied: no parent image to compare with"))
    if s.mask_coverage is not None:  # a cut-out on a failed mask is not the edit, whatever else it shows
        check(s.mask_problem is None, f"subject mask {s.mask_coverage:.0%} of the frame",
              f"edit_applied: {s.mask_problem}")
    if s.edit_prob is not None:
        check(s.edit_prob >= c.min_edit_prob, f"edit: P(applied) {s.edit_prob:.2f}",
              f"edit_applied: VLM P(edit applied) {s.edit_prob:.2f} < {c.min_edit_prob}")
    # Quality.
    if s.sharpness is not None:
        check(s.sharpness >= c.min_sharpness, f"sharpness {s.sharpness:.4f}",
              f"quality: sharpness {s.sharpness:.5f} < {c.min_sharpness} (blurred)")
    if s.noise_sigma is not None:
        check(s.noise_sigma <= c.max_noise_sigma, f"noise {s.noise_sigma:.3f}",
              f"quality: noise sigma {s.noise_sigma:.3f} > {c.max_noise_sigma} (noisy)")
    if s.artifact_prob is not None:
        check(s.artifact_prob <= c.max_artifact_prob, f"P(artifacts) {s.artifact_prob:.2f}",
              f"quality: VLM P(artifacts) {s.artifact_prob:.2f} > {c.max_artifact_prob}")
    # What the reviewers would decide, as learned by a tuned judge (only with an adapter loaded).
    if s.keep_prob is not None:
        check(s.keep_prob >= c.min_keep_prob, f"tuned judge: P(keep) {s.keep_prob:.2f}",
              f"tuned judge: P(keep) {s.keep_prob:.2f} < {c.min_keep_prob}")
    # Duplicates.
    if s.dup_change is not None:
        check(s.dup_change >= c.near_duplicate_max_change, f"not a duplicate ({s.dup_change:.1%} differs)",
              f"duplicate: near-duplicate of image #{s.dup_of} (phash distance {s.dup_distance} "
              f"<= {c.near_duplicate_distance}, {s.dup_change:.1%} of pixels differ "
              f"< {c.near_duplicate_max_change:.0%})")
    # Too close: a near (or mirrored) copy of a source, in structure, colour and (where known) face.
    if s.copy_similarity is not None and s.copy_color_difference is not None:
        out.extend(_copy_check(s, c))
    # Caption truth: a caption that does not describe the image is for a human to fix, not to train on.
    if s.caption_match_prob is not None:
        p = s.caption_match_prob
        out.append(("pass", f"caption: P(describes the image) {p:.2f}") if p >= c.min_caption_match else
                   ("unknown", f"caption: VLM P(caption describes the image) {p:.2f} < {c.min_caption_match}"))
    # The structured verdict (only its booleans are read; its reasons are quoted, never obeyed).
    if has_vlm and c.structured_verdict:
        v = s.verdict_json
        if v is None:
            out.append(("unknown", f"judge output unparseable ({s.verdict_error})"))
        else:
            # Quoted, shortened and without ';' (the reason's separator): the model's words, never structure.
            said = " ".join(v["reasons"].replace(";", ",").split())[:200]
            why = f' (VLM says: "{said}")' if said else ""
            check(v["same_character"], "VLM verdict: same character",
                  f"identity: VLM verdict says not the same character{why}")
            if kind == "enriched" or s.edit_prob is not None:
                check(v["edit_applied"], "VLM verdict: edit applied",
                      f"edit_applied: VLM verdict says not applied{why}")
            check(not v["artifacts"], "VLM verdict: no artifacts", f"quality: VLM verdict reports artifacts{why}")
    return out


def _copy_check(s: ImageScores, c: JudgeConfig) -> list[tuple[str, str]]:
    sim, delta_e, src = s.copy_similarity, s.copy_color_difference, s.copy_source_id
    face = s.face_distances.get(src) if src is not None else None
    is_copy = (sim > c.max_copy_similarity and delta_e <= c.max_copy_color_difference
               and (face is None or face < c.min_face_distance_copy))
    if not is_copy:
        return [("pass", f"not a copy (SSIM {sim:.2f}, colour difference {delta_e:.1f} to source #{src})")]
    what = "mirrored copy" if s.copy_mirrored else "near copy"
    face_part = "" if face is None else f", face distance {face:.2f} < {c.min_face_distance_copy}"
    return [("fail", f"copy: {what} of source #{src} (structure SSIM {sim:.2f} > {c.max_copy_similarity}, "
                     f"colour difference {delta_e:.1f} <= {c.max_copy_color_difference}{face_part})")]


def decide(s: ImageScores, c: JudgeConfig, *, has_vlm: bool, kind: str) -> tuple[str, str]:
    """(verdict, reason): any failing check rejects; else anything unknown needs review; else accepted."""
    checks = _checks(s, c, has_vlm=has_vlm, kind=kind)
    failed = [m for st, m in checks if st == "fail"]
    unknown = [m for st, m in checks if st == "unknown"]
    if failed:
        return "rejected", "; ".join(failed + [f"also: {m}" for m in unknown])
    if unknown:
        return "needs_review", "; ".join(unknown)
    basis = "" if has_vlm else " (pixel signals only: no VLM configured)"
    return "accepted", "passed" + basis + ": " + ", ".join(m for _, m in checks)
