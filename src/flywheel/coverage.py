"""Coverage: which views, framings, expressions and lights the training set has, and which it lacks.

Every judged image and every source is tagged on four axes, each tag a score row (criterion
``coverage``, the axis and tag in its details; scores, never decisions):

- view (frontal / three-quarter / profile / back) and framing (close-up / portrait / half body / full
  body) from dlib's face landmarks where a face exists (scorer ``dlib_landmarks``, ``signals.coverage``):
  works without a VLM;
- all four axes, expression and lighting included, from the judge VLM's choice among fixed answers
  (``option_probabilities``; scorer ``vlm_choice:<model>``) when ``[judge] coverage_questions = true``.

The table counts the set as it stands: kept sources plus the training images whose decision (a human's
accept/reject, else the judge's verdict) is accepted. Per image and axis the VLM's tag wins over the
landmarks'. Empty cells are named ("no profile views") and ``flywheel enrich --fill-gaps`` maps them to
the shipped recipes that make such images (``GAP_RECIPES``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flywheel.catalog.queries import EFFECTIVE_DECISION, KEPT_SOURCES
from flywheel.signals.coverage import FRAMINGS, VIEWS

if TYPE_CHECKING:
    from PIL import Image

    from flywheel.project import Project

log = logging.getLogger(__name__)

LANDMARKS = "dlib_landmarks"
AXES: dict[str, tuple[str, ...]] = {
    "view": VIEWS,
    "framing": FRAMINGS,
    "expression": ("neutral", "smiling", "sad", "angry", "surprised"),
    "lighting": ("daylight", "overcast", "sunset", "night", "neon", "studio"),
}
# The VLM answers with one word per tag (distinct first tokens: option_probabilities reads the first one).
QUESTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "view": ("From which side is the character seen? Answer with one word: frontal (facing the camera), angled "
             "(three-quarter view), profile (from the side) or back (from behind).",
             ("frontal", "angled", "profile", "back")),
    "framing": ("How is the character framed? Answer with one word: closeup (the face fills the frame), portrait "
                "(head and shoulders), half (from the waist up) or full (the whole body).",
                ("closeup", "portrait", "half", "full")),
    "expression": ("What is the character's facial expression? Answer with one word: neutral, smiling, sad, angry "
                   "or surprised.", AXES["expression"]),
    "lighting": ("What is the lighting like? Answer with one word: daylight, overcast, sunset, night, neon or "
                 "studio.", AXES["lighting"]),
}
EMPTY = {"view": "no {} views", "framing": "no {} shots", "expression": "no {} expressions",
         "lighting": "no {} lighting"}
# Empty cell -> the shipped recipes that make such an image (docs/judging.md); none: new photos are needed.
GAP_RECIPES: dict[tuple[str, str], tuple[str, ...]] = {
    ("view", "three-quarter"): ("left_view", "right_view"),
    ("view", "profile"): ("left_view", "right_view"),
    ("framing", "close-up"): ("close_up",),
    ("framing", "full body"): ("full_body",),
    ("framing", "half body"): ("full_body",),
    ("lighting", "overcast"): ("overcast",),
    ("lighting", "sunset"): ("sunset", "golden_hour"),
    ("lighting", "night"): ("moonlight",),
    ("lighting", "neon"): ("neon",),
    ("lighting", "studio"): ("rim_light",),
}


class CoverageTagger:
    """Records coverage tags for images the judge has in hand (``record`` is the judge's score writer)."""

    def __init__(self, project: Project, record, min_face_score: float, vlm=None, run_id: int | None = None):
        from flywheel.signals import faces

        self.project, self.record, self.min_face_score = project, record, min_face_score
        self.vlm, self.run_id = vlm, run_id
        self.faces_ok = faces.available()

    def tag_sources(self) -> None:
        """Tag the kept sources that lack tags from this tagger (sources are never judged, but are in the set)."""
        vlm_scorer = f"vlm_choice:{self.vlm.model_id}" if self.vlm is not None else None
        images, landmarks, ask = {}, [], []
        for r in self.project.catalog.query(KEPT_SOURCES):
            have = {row[0] for row in self.project.catalog.query(
                "SELECT DISTINCT scorer FROM scores WHERE image_id = ? AND criterion = 'coverage'", (r["id"],))}
            if LANDMARKS not in have:
                landmarks.append(r["id"])  # a faceless source is looked at again (cheap: no face, no detection)
            if vlm_scorer and vlm_scorer not in have:
                ask.append(r["id"])
            if r["id"] in landmarks or r["id"] in ask:
                images[r["id"]] = self.project.store.open_image(r["sha256"])
        self.tag(images, ask=ask, landmarks=landmarks)

    def tag(self, images: dict[int, Image.Image], ask: list[int] | None = None,
            landmarks: list[int] | None = None) -> None:
        """Landmark tags for ``landmarks`` and VLM tags (if any VLM) for ``ask``; both default to all ``images``."""
        if self.faces_ok:
            for image_id in (list(images) if landmarks is None else landmarks):
                self._landmarks(image_id, images[image_id])
        ask = list(images) if ask is None else ask
        if self.vlm is not None and ask:
            self._ask({i: images[i] for i in ask})

    def _landmarks(self, image_id: int, image: Image.Image) -> None:
        from flywheel.signals.coverage import landmark_tags
        from flywheel.signals.faces import EMBEDDER, FaceBox

        rows = self.project.catalog.query(
            "SELECT left_px, top_px, right_px, bottom_px, score FROM faces WHERE image_id = ? AND embedder = ? "
            "AND COALESCE(score, 0) >= ? ORDER BY (right_px - left_px) * (bottom_px - top_px) DESC, id LIMIT 1",
            (image_id, EMBEDDER, self.min_face_score))
        if not rows:
            return  # no face: a back view and a missed face look alike to dlib; nothing is guessed
        r = rows[0]
        tags = landmark_tags(image, FaceBox(r[0], r[1], r[2], r[3], r[4] or 0.0))
        self.record(image_id, "coverage", LANDMARKS, tags.turn, {"axis": "view", "tag": tags.view, **tags.as_dict()})
        self.record(image_id, "coverage", LANDMARKS, tags.face_height,
                    {"axis": "framing", "tag": tags.framing, **tags.as_dict()})

    def _ask(self, images: dict[int, Image.Image]) -> None:
        from flywheel.models.base import ChatRequest

        ids = list(images)
        scorer = f"vlm_choice:{self.vlm.model_id}"
        for axis, (question, words) in QUESTIONS.items():
            params = {"criterion": "coverage", "axis": axis, "image_ids": ids, "prompt": question, **self.vlm.params()}
            with self.project.catalog.operation("judge", model=self.vlm.model_id, params=params,
                                                parent_id=self.run_id) as op:
                answers = self.vlm.option_probabilities([ChatRequest(question, [images[i]]) for i in ids], list(words))
            for image_id, probs in zip(ids, answers):
                if probs[words[0]] is None:  # a service refused or answered none of the words: no tag
                    continue
                word = max(words, key=lambda w: probs[w])
                tag = AXES[axis][words.index(word)]
                self.record(image_id, "coverage", scorer, probs[word],
                            {"axis": axis, "tag": tag, "question": question, "probabilities": probs}, op)


@dataclass
class CoverageTable:
    images: int = 0  # images in the set
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # axis -> tag -> images
    untagged: dict[str, int] = field(default_factory=dict)  # axis -> images without a tag on it

    def tagged(self, axis: str) -> bool:
        return any(self.counts[axis].values())

    @property
    def gaps(self) -> list[tuple[str, str]]:
        """Empty cells of the axes that have any tag at all (an axis nobody tagged is unknown, not empty)."""
        return [(axis, tag) for axis, tags in self.counts.items() if self.tagged(axis)
                for tag, n in tags.items() if n == 0]

    def gap_messages(self) -> list[str]:
        return [EMPTY[axis].format(tag) for axis, tag in self.gaps]

    def sentence(self) -> str:
        """One line for reports: each tagged axis's counts, then the empty cells."""
        tagged = "; ".join(f"{axis}: {text}" for axis, text in self.rows() if not text.startswith("not tagged"))
        gaps = self.gap_messages()
        return (f"Coverage of {self.images} images: {tagged or 'no tags'}. "
                + (f"Missing: {', '.join(gaps)} (`flywheel enrich --fill-gaps` plans recipes for them)." if gaps
                   else "No empty cells."))

    def as_dict(self) -> dict:
        return {"images": self.images, "counts": self.counts, "untagged": self.untagged, "missing": self.gap_messages()}

    def rows(self) -> list[tuple[str, str]]:
        """(axis, 'tag count, ...' or why it is unknown) for display."""
        out = []
        for axis, tags in self.counts.items():
            if not self.tagged(axis):
                why = "needs [judge] coverage_questions = true" if axis in ("expression", "lighting") else "no tags yet"
                out.append((axis, f"not tagged ({why})"))
                continue
            text = ", ".join(f"{tag} {n}" for tag, n in tags.items())
            out.append((axis, text + (f", untagged {self.untagged[axis]}" if self.untagged[axis] else "")))
        return out


def set_image_ids(project: Project) -> list[int]:
    """Kept sources plus training candidates whose effective decision is 'accepted'."""
    sources = [r["id"] for r in project.catalog.query(KEPT_SOURCES)]
    accepted = [r[0] for r in project.catalog.query(
        f"SELECT i.id FROM images i WHERE i.kind != 'source' AND COALESCE(i.purpose, 'train') = 'train' "
        f"AND ({EFFECTIVE_DECISION}) = 'accepted' ORDER BY i.id")]
    return sources + accepted


def coverage_table(project: Project, ids: list[int] | None = None) -> CoverageTable:
    """The table over ``ids`` (default: the set as it stands, ``set_image_ids``)."""
    ids = set_image_ids(project) if ids is None else list(ids)
    table = CoverageTable(images=len(ids), counts={a: {t: 0 for t in tags} for a, tags in AXES.items()},
                          untagged={a: 0 for a in AXES})
    tags: dict[tuple[int, str], tuple[bool, int, str]] = {}  # (image, axis) -> (from the VLM, row id, tag)
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        for r in project.catalog.query(
                f"SELECT id, image_id, scorer, details_json FROM scores WHERE criterion = 'coverage' "
                f"AND image_id IN ({','.join('?' * len(chunk))})", chunk):
            d: dict[str, Any] = json.loads(r["details_json"] or "{}")
            if d.get("axis") not in AXES or d.get("tag") not in AXES[d["axis"]]:
                continue
            key, rank = (r["image_id"], d["axis"]), (r["scorer"].startswith("vlm_choice:"), r["id"], d["tag"])
            if key not in tags or rank > tags[key]:  # the VLM's tag wins, then the newest row
                tags[key] = rank
    for axis in AXES:
        for image_id in ids:
            if (image_id, axis) in tags:
                table.counts[axis][tags[image_id, axis][2]] += 1
            else:
                table.untagged[axis] += 1
    return table


def gap_recipes(table: CoverageTable) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """(recipe ids that fill the empty cells, in order; (gap message, its recipes) per empty cell)."""
    recipes: list[str] = []
    plan = []
    for axis, tag in table.gaps:
        ids = list(GAP_RECIPES.get((axis, tag), ()))
        plan.append((EMPTY[axis].format(tag), ids))
        recipes += [r for r in ids if r not in recipes]
    return recipes, plan


def fill_gaps(project: Project, cfg):
    """(``[enrich]`` settings whose recipes fill the set's empty coverage cells, (gap, recipes) per cell)."""
    from flywheel.errors import StageError

    if not project.catalog.query("SELECT 1 FROM scores WHERE criterion = 'coverage' LIMIT 1"):
        raise StageError("no coverage tags yet: nothing says which views or framings the set lacks",
                         hint="run `flywheel judge` first (it tags every judged image and source)")
    recipes, plan = gap_recipes(coverage_table(project))
    return cfg.model_copy(update={"recipes": recipes}), plan
