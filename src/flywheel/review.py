"""``flywheel review``: what a human reviewer sees and decides, read from and appended to the catalog.

The web app (``flywheel.web``) is a thin layer over these functions:

- ``list_items`` gathers, per edited or synthetic image, everything a reviewer needs to judge it: its
  parent(s), the newest score per criterion and scorer, the newest machine verdict and its reason, the
  newest human review, the newest caption and the recipe (or prompt) that made it.
- ``count_items`` says how many images a filter covers and how many still need a human decision.
- ``record_review`` appends decisions; nothing is ever updated or deleted. The newest review per image
  is the current one, and 'cleared' is an undo (back to "no human decision"). Machine verdicts are never
  touched: training reads human-over-machine at dataset time (see ``flywheel.dataset``).
- ``thumbnail`` serves a cached, downscaled copy of a catalog image; only catalog ids reach the store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flywheel.errors import ReviewError
from flywheel.project import Project

log = logging.getLogger(__name__)

DECISIONS = ("accepted", "rejected", "skipped", "cleared")
REVIEWABLE_KINDS = ("enriched", "synthetic")  # sources are always in the dataset: nothing to decide
VERDICT_FILTERS = ("accepted", "rejected", "needs_review", "none")
REVIEW_FILTERS = ("todo", "accepted", "rejected", "skipped")
THUMB_SIZE = 384
MAX_SQLITE_INT = 2**63 - 1
_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII only: str.isdigit() also accepts '²', which int() refuses

_LATEST = "SELECT {cols} FROM {table} WHERE id IN (SELECT MAX(id) FROM {table} GROUP BY image_id)"
# flywheel.enrich records the recipe as 'recipe'; 'recipe_id' is accepted too (older or external writers).
_RECIPE = ("CAST(COALESCE(json_extract(o.params_json, '$.recipe'), json_extract(o.params_json, '$.recipe_id'))"
           " AS TEXT)")
_FROM = f"""
FROM images i
LEFT JOIN ({_LATEST.format(cols="image_id, verdict, reason", table="verdicts")}) lv ON lv.image_id = i.id
LEFT JOIN ({_LATEST.format(cols="image_id, decision, reason, reviewer, created_at", table="reviews")}) lr
       ON lr.image_id = i.id
LEFT JOIN ({_LATEST.format(cols="image_id, text", table="captions")}) lc ON lc.image_id = i.id
LEFT JOIN operations o ON o.id = i.operation_id
"""


@dataclass(frozen=True)
class Filters:
    """What the grid shows. ``None`` means "any"; ``kind=None`` means every reviewable kind."""

    round: int | None = None
    kind: str | None = None
    verdict: str | None = None  # accepted / rejected / needs_review / none (no verdict yet)
    recipe: str | None = None
    review: str | None = None  # todo (no accept/reject yet) / accepted / rejected / skipped
    limit: int = 300
    offset: int = 0

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> Filters:
        """Filters from URL query parameters; empty values mean "any". Raises ReviewError on bad values."""
        def choice(name: str, allowed: tuple[str, ...]) -> str | None:
            value = (query.get(name) or "").strip()
            if value and value not in allowed:
                raise ReviewError(f"unknown {name} filter {value!r}", hint=f"use one of: {', '.join(allowed)}")
            return value or None

        def number(name: str, default: int | None, low: int, high: int) -> int | None:
            value = (query.get(name) or "").strip()
            if not value:
                return default
            if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
                raise ReviewError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
            return int(value)

        return cls(
            round=number("round", None, 0, 10_000),
            kind=choice("kind", REVIEWABLE_KINDS),
            verdict=choice("verdict", VERDICT_FILTERS),
            recipe=(query.get("recipe") or "").strip() or None,
            review=choice("review", REVIEW_FILTERS),
            limit=number("limit", 300, 0, 5000),
            offset=number("offset", 0, 0, 10_000_000),
        )

    def query(self) -> dict[str, str]:
        """The non-default filters as URL query parameters (for links that keep the current view)."""
        values = {"round": self.round, "kind": self.kind, "verdict": self.verdict, "recipe": self.recipe,
                  "review": self.review}
        return {k: str(v) for k, v in values.items() if v is not None}

    def where(self, *, with_review: bool = True) -> tuple[str, list[Any]]:
        # Held-out evaluation renders are measured, never trained on: they are no one's to review.
        clauses, params = ["i.purpose = 'train'"], []
        if self.kind:
            clauses.append("i.kind = ?")
            params.append(self.kind)
        else:
            clauses.append(f"i.kind IN ({', '.join('?' for _ in REVIEWABLE_KINDS)})")
            params.extend(REVIEWABLE_KINDS)
        if self.round is not None:
            clauses.append("i.round = ?")
            params.append(self.round)
        if self.verdict == "none":
            clauses.append("lv.verdict IS NULL")
        elif self.verdict:
            clauses.append("lv.verdict = ?")
            params.append(self.verdict)
        if self.recipe:
            clauses.append(f"{_RECIPE} = ?")
            params.append(self.recipe)
        if with_review and self.review == "todo":
            clauses.append("COALESCE(lr.decision, '') NOT IN ('accepted', 'rejected')")
        elif with_review and self.review:
            clauses.append("lr.decision = ?")
            params.append(self.review)
        return " AND ".join(clauses), params


@dataclass
class Parent:
    id: int
    sha256: str
    kind: str
    role: str  # 'source' (the image edited) or 'reference'


@dataclass
class Score:
    criterion: str
    scorer: str
    value: float | None
    note: str | None  # the scorer's own reason, when it gave one (e.g. why it could not score)


@dataclass
class Item:
    id: int
    sha256: str
    kind: str
    round: int
    width: int
    height: int
    verdict: str | None
    verdict_reason: str | None
    review: str | None  # newest human decision ('cleared' = undone)
    review_reason: str | None
    reviewer: str | None
    reviewed_at: str | None
    caption: str | None
    recipe: str | None
    prompt: str | None
    parents: list[Parent] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Counts:
    total: int = 0
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0

    @property
    def remaining(self) -> int:
        """Images with no human accept/reject yet (skipped ones still count: they wait for a decision)."""
        return self.total - self.accepted - self.rejected

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "remaining": self.remaining}


def list_items(project: Project, filters: Filters | None = None) -> list[Item]:
    """The reviewable images matching ``filters``, oldest round first, each with what explains it."""
    filters = filters or Filters()
    q = project.catalog.query
    # 1. The images, with their newest verdict, review and caption, and how they were made.
    where, params = filters.where()
    rows = q(
        f"""SELECT i.id, i.sha256, i.kind, i.round, i.width, i.height,
                   lv.verdict, lv.reason AS verdict_reason, lr.decision AS review, lr.reason AS review_reason,
                   lr.reviewer, lr.created_at AS reviewed_at, lc.text AS caption, {_RECIPE} AS recipe,
                   CAST(json_extract(o.params_json, '$.prompt') AS TEXT) AS prompt
            {_FROM} WHERE {where} ORDER BY i.round, i.id LIMIT ? OFFSET ?""",
        (*params, filters.limit, filters.offset),
    )
    items = {r["id"]: Item(**dict(r)) for r in rows}
    if not items:
        return []
    marks = ", ".join("?" for _ in items)
    # 2. Parents, so the reviewer sees each edit beside the image it was made from.
    for r in q(f"""SELECT p.image_id, p.parent_id, p.role, pi.sha256, pi.kind FROM image_parents p
                   JOIN images pi ON pi.id = p.parent_id WHERE p.image_id IN ({marks})
                   ORDER BY p.role DESC, p.parent_id""", tuple(items)):
        items[r["image_id"]].parents.append(Parent(r["parent_id"], r["sha256"], r["kind"], r["role"]))
    # 3. Scores: the newest row per criterion and scorer (a re-judge appends, it does not overwrite).
    for r in q(f"""SELECT image_id, criterion, scorer, value, details_json FROM scores
                   WHERE id IN (SELECT MAX(id) FROM scores WHERE image_id IN ({marks})
                                GROUP BY image_id, criterion, scorer)
                   ORDER BY image_id, criterion, scorer""", tuple(items)):
        items[r["image_id"]].scores.append(Score(r["criterion"], r["scorer"], r["value"], _note(r["details_json"])))
    return list(items.values())


def _note(details_json: str) -> str | None:
    try:
        details = json.loads(details_json or "{}")
    except json.JSONDecodeError:
        return None
    if not isinstance(details, dict):
        return None
    for key in ("reason", "reasons", "note", "error"):  # the judge's VLM scores say 'reasons', face scores 'note'
        if details.get(key):
            return str(details[key])
    return None


def count_items(project: Project, filters: Filters | None = None) -> Counts:
    """How many images the filters cover (ignoring the review-state filter) and how they were decided."""
    where, params = (filters or Filters()).where(with_review=False)
    row = project.catalog.query(
        f"""SELECT COUNT(*) AS total,
                   COALESCE(SUM(lr.decision = 'accepted'), 0) AS accepted,
                   COALESCE(SUM(lr.decision = 'rejected'), 0) AS rejected,
                   COALESCE(SUM(lr.decision = 'skipped'), 0) AS skipped
            {_FROM} WHERE {where}""",
        tuple(params),
    )[0]
    return Counts(**dict(row))


def filter_options(project: Project) -> dict[str, list]:
    """The rounds and recipes present among reviewable images (for the grid's filter menus)."""
    kinds = tuple(REVIEWABLE_KINDS)
    q = project.catalog.query
    rounds = [r[0] for r in q("SELECT DISTINCT round FROM images WHERE kind IN (?, ?) ORDER BY round", kinds)]
    recipes = [r[0] for r in q(
        f"SELECT DISTINCT {_RECIPE} FROM images i JOIN operations o ON o.id = i.operation_id "
        f"WHERE i.kind IN (?, ?) AND {_RECIPE} IS NOT NULL ORDER BY 1", kinds)]
    return {"rounds": rounds, "recipes": recipes, "kinds": list(REVIEWABLE_KINDS)}


def record_review(project: Project, image_ids: list[int], decision: str, reviewer: str,
                  reason: str | None = None) -> list[int]:
    """Append one review row per image (all or none). Returns the new rows' ids.

    ``decision`` is accepted / rejected / skipped, or 'cleared' to undo (the image is undecided again).
    """
    # 1. Validate everything before writing anything.
    if decision not in DECISIONS:
        raise ReviewError(f"unknown decision {decision!r}", hint=f"use one of: {', '.join(DECISIONS)}")
    reviewer = (reviewer or "").strip()
    if not reviewer:
        raise ReviewError("a review needs a reviewer name", hint="pass --reviewer NAME to `flywheel review`")
    ids = list(dict.fromkeys(_image_id(i) for i in image_ids))  # de-duplicated, order kept
    if not ids:
        raise ReviewError("no images to review", hint="select at least one image")
    found = {r[0] for r in project.catalog.query(
        f"SELECT id FROM images WHERE id IN ({', '.join('?' for _ in ids)})", tuple(ids))}
    missing = [i for i in ids if i not in found]
    if missing:
        raise ReviewError(f"no image with id {', '.join(map(str, missing))} in the catalog",
                          hint="reload the page: the catalog may have changed")
    # 2. Append, in one transaction: a bulk decision is recorded for every image or for none.
    reason = (reason or "").strip() or None
    with project.catalog.transaction():
        rows = [project.catalog.insert("reviews", {"image_id": i, "decision": decision, "reason": reason,
                                                   "reviewer": reviewer}) for i in ids]
    log.info("review: %s %d image(s) by %s", decision, len(ids), reviewer)
    return rows


def _image_id(value: Any) -> int:
    # bool is an int subclass; a JSON `true` is not an image id.
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not _DIGITS.fullmatch(str(value)):
        raise ReviewError(f"not an image id: {value!r}", hint="image ids are whole numbers from the catalog")
    number = int(value)
    if number > MAX_SQLITE_INT:
        raise ReviewError(f"no image with id {number} in the catalog")
    return number


def image_sha(project: Project, image_id: int) -> str | None:
    """The store name of a catalog image, or None when the id is not in the catalog."""
    if not 0 < image_id <= MAX_SQLITE_INT:
        return None
    rows = project.catalog.query("SELECT sha256 FROM images WHERE id = ?", (image_id,))
    return rows[0][0] if rows else None


def thumbnail(project: Project, sha: str, size: int = THUMB_SIZE) -> Path:
    """A JPEG of at most ``size`` px a side, cached under ``.flywheel/cache/thumbs`` by content hash.

    The cache never goes stale: a stored image never changes under its hash.
    """
    source = project.store.image_path(sha)  # refuses anything that is not a content hash
    path = project.workspace / "cache" / "thumbs" / sha[:2] / f"{sha}-{size}.jpg"
    if path.exists():
        return path
    from PIL import Image

    with Image.open(source) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside, then rename: two requests for one thumbnail never serve a half-written file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".jpg")
        try:
            with os.fdopen(fd, "wb") as f:
                im.save(f, format="JPEG", quality=85)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path
