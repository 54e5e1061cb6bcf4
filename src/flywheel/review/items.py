"""What the review page lists: the reviewable images of a filter, each with what explains it.

``list_items`` gathers, per edited or synthetic image, its parent(s), the newest score per criterion and
scorer (with a readable label, ``flywheel.review.labels``), the newest machine verdict and its reason,
the newest human review, the newest caption and the recipe (or prompt) that made it. ``count_items``
says how many images a filter covers and how many still need a human decision; ``matching_ids`` is
every image a filter selects, across pages (what a filter action decides).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from flywheel.errors import ReviewError
from flywheel.project import Project
from flywheel.review.decisions import _DIGITS, MAX_SQLITE_INT, _short

REVIEWABLE_KINDS = ("enriched", "synthetic")  # sources are always in the dataset: nothing to decide
VERDICT_FILTERS = ("accepted", "rejected", "needs_review", "none")
REVIEW_FILTERS = ("todo", "accepted", "rejected", "skipped")
# What the page opens on when the URL names no filter: what needs a human (not what the judge accepted).
DEFAULT_VIEW = {"verdict": "needs_review", "review": "todo"}
PAGE_SIZE = 120  # cards per page: thumbnails load lazily, and 1,000 cards would still be a slow page

# The newest row of a table for image ``alias.id``, found through the (image_id) index: one probe per image.
# (A "WHERE id IN (SELECT MAX(id) ... GROUP BY image_id)" sub-table makes SQLite walk the whole list for
# every image: 1,000 images took 0.3 s per query that way.)
_NEWEST = "(SELECT MAX(t.id) FROM {table} t WHERE t.image_id = {alias}.id)"
# flywheel.enrich records the recipe as 'recipe'; 'recipe_id' is accepted too (older or external writers).
_RECIPE = ("CAST(COALESCE(json_extract(o.params_json, '$.recipe'), json_extract(o.params_json, '$.recipe_id'))"
           " AS TEXT)")
# Scores read in the order a reviewer asks: same character? edit applied? clean? a duplicate?
_CRITERIA_ORDER = ("CASE criterion WHEN 'identity' THEN 0 WHEN 'edit_applied' THEN 1 WHEN 'quality' THEN 2 "
                   "WHEN 'keep' THEN 3 WHEN 'duplicate' THEN 4 ELSE 5 END")
_FROM = f"""
FROM images i
LEFT JOIN verdicts lv ON lv.id = {_NEWEST.format(table="verdicts", alias="i")}
LEFT JOIN reviews lr ON lr.id = {_NEWEST.format(table="reviews", alias="i")}
LEFT JOIN captions lc ON lc.id = {_NEWEST.format(table="captions", alias="i")}
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
    source: int | None = None  # only the edits made from this source image
    limit: int = PAGE_SIZE
    offset: int = 0

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> Filters:
        """Filters from URL query parameters. An empty value means "any"; a parameter that is absent
        takes the page's default (``DEFAULT_VIEW``: what needs a human). Raises ReviewError on bad values."""
        def choice(name: str, allowed: tuple[str, ...]) -> str | None:
            value = (query.get(name, DEFAULT_VIEW.get(name)) or "").strip()
            if value and value not in allowed:
                raise ReviewError(f"unknown {name} filter {_short(value)}", hint=f"use one of: {', '.join(allowed)}")
            return value or None

        def number(name: str, default: int | None, low: int, high: int) -> int | None:
            value = (query.get(name) or "").strip()
            if not value:
                return default
            if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
                raise ReviewError(f"{name} must be a whole number from {low} to {high}, got {_short(value)}")
            return int(value)

        return cls(
            round=number("round", None, 0, 10_000),
            kind=choice("kind", REVIEWABLE_KINDS),
            verdict=choice("verdict", VERDICT_FILTERS),
            recipe=(query.get("recipe") or "").strip() or None,
            review=choice("review", REVIEW_FILTERS),
            source=number("source", None, 1, MAX_SQLITE_INT),
            limit=number("limit", PAGE_SIZE, 0, 5000),
            offset=number("offset", 0, 0, 10_000_000),
        )

    def query(self) -> dict[str, str]:
        """The filters as URL query parameters (for links that keep the current view). Verdict and review
        are always present, empty for "any", so a link never falls back to the default view."""
        values = {"round": self.round, "kind": self.kind, "verdict": self.verdict or "", "recipe": self.recipe,
                  "review": self.review or "", "source": self.source}
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
        if self.source is not None:
            clauses.append("EXISTS (SELECT 1 FROM image_parents sp WHERE sp.image_id = i.id AND sp.parent_id = ? "
                           "AND sp.role = 'source')")
            params.append(self.source)
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
    left_out: bool = False  # a source a human left out of training


@dataclass
class Score:
    criterion: str
    scorer: str
    value: float | None
    note: str | None  # the scorer's own reason, when it gave one (e.g. why it could not score)
    label: str = ""  # readable, with the threshold: "identity: face distance 0.42 (accept ≤ 0.60)"
    status: str = "info"  # pass / fail / unknown / info: which side of the threshold the value is on


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
    caption_source: str | None  # vlm / template / human
    recipe: str | None
    prompt: str | None
    parents: list[Parent] = field(default_factory=list)
    scores: list[Score] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Counts:
    total: int = 0  # images the filter covers, whatever your decision (the review filter is ignored)
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    matching: int = 0  # images the whole filter selects (the review filter too): what a filter action decides

    @property
    def remaining(self) -> int:
        """Images with no human accept/reject yet (skipped ones still count: they wait for a decision)."""
        return self.total - self.accepted - self.rejected

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "remaining": self.remaining}


def list_items(project: Project, filters: Filters | None = None) -> list[Item]:
    """The reviewable images matching ``filters``, oldest round first, each with what explains it."""
    from flywheel.review.labels import score_label

    filters = filters or Filters()
    q = project.catalog.query
    # 1. The images, with their newest verdict, review and caption, and how they were made.
    where, params = filters.where()
    rows = q(
        f"""SELECT i.id, i.sha256, i.kind, i.round, i.width, i.height,
                   lv.verdict, lv.reason AS verdict_reason, lr.decision AS review, lr.reason AS review_reason,
                   lr.reviewer, lr.created_at AS reviewed_at, lc.text AS caption, lc.source AS caption_source,
                   {_RECIPE} AS recipe, CAST(json_extract(o.params_json, '$.prompt') AS TEXT) AS prompt
            {_FROM} WHERE {where} ORDER BY i.round, i.id LIMIT ? OFFSET ?""",
        (*params, filters.limit, filters.offset),
    )
    items = {r["id"]: Item(**dict(r)) for r in rows}
    if not items:
        return []
    marks = ", ".join("?" for _ in items)
    # 2. Parents, so the reviewer sees each edit beside the image it was made from (and whether a human
    #    left that source out of training).
    for r in q(f"""SELECT p.image_id, p.parent_id, p.role, pi.sha256, pi.kind,
                          COALESCE(lr.decision = 'rejected' AND pi.kind = 'source', 0) AS left_out
                   FROM image_parents p JOIN images pi ON pi.id = p.parent_id
                   LEFT JOIN reviews lr ON lr.id = {_NEWEST.format(table="reviews", alias="pi")}
                   WHERE p.image_id IN ({marks}) ORDER BY p.role DESC, p.parent_id""", tuple(items)):
        items[r["image_id"]].parents.append(Parent(r["parent_id"], r["sha256"], r["kind"], r["role"],
                                                   bool(r["left_out"])))
    # 3. Scores: the newest row per criterion and scorer (a re-judge appends, it does not overwrite),
    #    each with a label that states the threshold it is judged against.
    cfg = project.config.judge
    for r in q(f"""SELECT image_id, criterion, scorer, value, details_json FROM scores
                   WHERE id IN (SELECT MAX(id) FROM scores WHERE image_id IN ({marks})
                                GROUP BY image_id, criterion, scorer)
                   ORDER BY image_id, {_CRITERIA_ORDER}, criterion, scorer""", tuple(items)):
        details = _details(r["details_json"])
        label = score_label(r["criterion"], r["scorer"], r["value"], details, cfg)
        items[r["image_id"]].scores.append(Score(r["criterion"], r["scorer"], r["value"], _note(details),
                                                 label.text, label.status))
    return list(items.values())


def _details(details_json: str) -> dict[str, Any]:
    try:
        details = json.loads(details_json or "{}")
    except (json.JSONDecodeError, RecursionError):
        return {}
    return details if isinstance(details, dict) else {}


def _note(details: dict[str, Any]) -> str | None:
    for key in ("reason", "reasons", "note", "error"):  # the judge's VLM scores say 'reasons', face scores 'note'
        if details.get(key):
            return str(details[key])
    return None


def count_items(project: Project, filters: Filters | None = None) -> Counts:
    """How many images the filters cover (ignoring the review-state filter) and how they were decided."""
    filters = filters or Filters()
    where, params = filters.where(with_review=False)
    row = project.catalog.query(
        f"""SELECT COUNT(*) AS total,
                   COALESCE(SUM(lr.decision = 'accepted'), 0) AS accepted,
                   COALESCE(SUM(lr.decision = 'rejected'), 0) AS rejected,
                   COALESCE(SUM(lr.decision = 'skipped'), 0) AS skipped
            {_FROM} WHERE {where}""",
        tuple(params),
    )[0]
    counts = Counts(**dict(row))
    counts.matching = counts.total if not filters.review else len(matching_ids(project, filters))
    return counts


def matching_ids(project: Project, filters: Filters) -> list[int]:
    """Every image the filter selects, across all pages (limit and offset are ignored)."""
    where, params = filters.where()
    return [r[0] for r in project.catalog.query(f"SELECT i.id {_FROM} WHERE {where} ORDER BY i.round, i.id",
                                                tuple(params))]


def verdict_tally(project: Project) -> dict[str, int]:
    """Reviewable images per newest judge verdict ('none': not judged yet), for the page's overview."""
    where, params = Filters().where()
    rows = project.catalog.query(f"SELECT COALESCE(lv.verdict, 'none') AS v, COUNT(*) AS n {_FROM} WHERE {where} "
                                 "GROUP BY 1", tuple(params))
    tally = {v: 0 for v in VERDICT_FILTERS}
    tally.update({r["v"]: r["n"] for r in rows})
    return tally


def filter_options(project: Project) -> dict[str, list]:
    """The rounds and recipes present among reviewable images (for the grid's filter menus)."""
    kinds = tuple(REVIEWABLE_KINDS)
    q = project.catalog.query
    rounds = [r[0] for r in q("SELECT DISTINCT round FROM images WHERE kind IN (?, ?) ORDER BY round", kinds)]
    recipes = [r[0] for r in q(
        f"SELECT DISTINCT {_RECIPE} FROM images i JOIN operations o ON o.id = i.operation_id "
        f"WHERE i.kind IN (?, ?) AND {_RECIPE} IS NOT NULL ORDER BY 1", kinds)]
    return {"rounds": rounds, "recipes": recipes, "kinds": list(REVIEWABLE_KINDS)}
