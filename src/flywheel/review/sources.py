"""Sources on the review page: each source with what its edits became, and a way to leave it out.

A source is in every dataset unless a human's newest review of it is 'rejected' (with a reason): then
``flywheel.dataset`` leaves it out of training (its edits are decided on their own). Statistics per
source: how many edits were made from it, how many are accepted / rejected / waiting for a human (a
human accept/reject counts over the judge's verdict, as at dataset time), and the face distance of
its edits to the sources (the judge's identity score), which shows a source whose edits drift.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any

from flywheel.project import Project

# The newest row of a table for image ``alias.id``, through the (image_id) index (see review.items).
_NEWEST = "(SELECT MAX(t.id) FROM {table} t WHERE t.image_id = {alias}.id)"


@dataclass
class SourceItem:
    id: int
    sha256: str
    name: str | None  # the user's file name
    width: int
    height: int
    review: str | None  # newest human decision about the source itself
    review_reason: str | None
    reviewer: str | None
    reviewed_at: str | None
    caption: str | None
    caption_source: str | None
    edits: int = 0  # edits made from this source (training candidates; held-out renders aside)
    accepted: int = 0  # by a human, or by the judge when no human decided
    rejected: int = 0
    waiting: int = 0  # needs a human: the judge said needs_review (or has not judged) and no human decided
    decided_by_you: int = 0
    face_distance_median: float | None = None  # of its edits' newest dlib identity scores
    face_distance_min: float | None = None
    face_distance_max: float | None = None
    faces_measured: int = 0

    @property
    def left_out(self) -> bool:
        return self.review == "rejected"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "left_out": self.left_out}


def list_sources(project: Project) -> list[SourceItem]:
    """Every source image, oldest first, with the statistics of the edits made from it."""
    q = project.catalog.query
    # 1. The sources, with the newest human decision about each and its newest caption.
    sources = {r["id"]: SourceItem(**dict(r)) for r in q(
        f"""SELECT i.id, i.sha256, i.original_name AS name, i.width, i.height,
                   lr.decision AS review, lr.reason AS review_reason, lr.reviewer, lr.created_at AS reviewed_at,
                   lc.text AS caption, lc.source AS caption_source
            FROM images i
            LEFT JOIN reviews lr ON lr.id = {_NEWEST.format(table="reviews", alias="i")}
            LEFT JOIN captions lc ON lc.id = {_NEWEST.format(table="captions", alias="i")}
            WHERE i.kind = 'source' ORDER BY i.id""")}
    if not sources:
        return []
    # 2. What the edits made from each source became (human over machine, as a dataset would read it).
    for r in q(f"""SELECT p.parent_id AS source_id, COUNT(*) AS edits,
                          COALESCE(SUM(d.effective = 'accepted'), 0) AS accepted,
                          COALESCE(SUM(d.effective = 'rejected'), 0) AS rejected,
                          COALESCE(SUM(d.effective IS NULL OR d.effective = 'needs_review'), 0) AS waiting,
                          COALESCE(SUM(d.human IN ('accepted', 'rejected')), 0) AS decided_by_you
                   FROM image_parents p
                   JOIN (SELECT e.id, lr.decision AS human,
                                CASE WHEN lr.decision IN ('accepted', 'rejected') THEN lr.decision
                                     ELSE lv.verdict END AS effective
                         FROM images e
                         LEFT JOIN reviews lr ON lr.id = {_NEWEST.format(table="reviews", alias="e")}
                         LEFT JOIN verdicts lv ON lv.id = {_NEWEST.format(table="verdicts", alias="e")}
                         WHERE e.kind = 'enriched' AND e.purpose = 'train') d ON d.id = p.image_id
                   WHERE p.role = 'source' GROUP BY p.parent_id"""):
        if r["source_id"] in sources:
            item = sources[r["source_id"]]
            for key in ("edits", "accepted", "rejected", "waiting", "decided_by_you"):
                setattr(item, key, r[key])
    # 3. Face distance of its edits: the newest dlib identity score of each edit.
    distances: dict[int, list[float]] = {}
    for r in q("""SELECT p.parent_id, s.value FROM image_parents p
                  JOIN images e ON e.id = p.image_id AND e.kind = 'enriched' AND e.purpose = 'train'
                  JOIN scores s ON s.id = (SELECT MAX(t.id) FROM scores t WHERE t.image_id = e.id
                                           AND t.criterion = 'identity' AND t.scorer LIKE 'face:%')
                  WHERE p.role = 'source' AND s.value IS NOT NULL"""):
        distances.setdefault(r["parent_id"], []).append(float(r["value"]))
    for source_id, values in distances.items():
        if source_id in sources:
            item = sources[source_id]
            item.faces_measured = len(values)
            item.face_distance_median = statistics.median(values)
            item.face_distance_min, item.face_distance_max = min(values), max(values)
    return list(sources.values())
