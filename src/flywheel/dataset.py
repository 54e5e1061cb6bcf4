"""Freeze the training set: which images, with which captions, go into LoRA round ``k``.

The rule (recorded with each version as ``dataset_versions.rule``):
- sources are always in;
- any other image made before round ``k`` (``images.round < k``) is in when its newest human review is
  'accepted', or, when it has no review (or the newest review is 'cleared' or 'skipped'), its newest
  machine verdict is 'accepted'. A human 'rejected' always wins over the machine;
- each member carries its newest caption (NULL when it has none; training then uses the trigger word).
"Newest" is the highest row id: rows are append-only, so ids order them even within one millisecond.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.catalog.queries import EFFECTIVE_DECISION
from flywheel.errors import StageError

log = logging.getLogger(__name__)

RULE = (
    "sources always; other images with round < k: newest human review 'accepted', or no deciding review "
    "(none/cleared/skipped) and newest machine verdict 'accepted'; newest caption per image"
)

_MEMBERS_SQL = f"""
WITH last_caption AS (
    SELECT image_id, MAX(id) AS caption_id FROM captions GROUP BY image_id
)
SELECT i.id AS image_id, c.caption_id
FROM images i
LEFT JOIN last_caption c ON c.image_id = i.id
WHERE i.kind = 'source'
   OR (i.round < :round AND i.purpose = 'train'  -- held-out evaluation images never train
       AND {EFFECTIVE_DECISION} = 'accepted')
ORDER BY i.id
"""


@dataclass
class Member:
    image_id: int
    sha256: str
    kind: str
    width: int
    height: int
    caption_id: int | None
    caption: str | None
    path: Path


@dataclass
class DatasetVersion:
    id: int
    version: int
    round: int
    rule: str
    members: list[Member] = field(default_factory=list)


def freeze_dataset(project, round: int) -> DatasetVersion:
    """Record a new dataset version for LoRA round ``round`` (>= 1) and its members, in one transaction."""
    if round < 1:
        raise StageError(f"round must be 1 or more (got {round})", hint="round 1 trains on sources and their edits")
    cat = project.catalog
    with cat.transaction():
        rows = cat.query(_MEMBERS_SQL, {"round": round})
        if not rows:
            raise StageError("no images to train on: the catalog has no sources",
                             hint="run `flywheel ingest PATH...` first")
        version = cat.query("SELECT COALESCE(MAX(version), 0) + 1 AS v FROM dataset_versions")[0]["v"]
        dataset_id = cat.insert("dataset_versions", {"version": version, "round": round, "rule": RULE})
        for r in rows:
            cat.insert("dataset_members", {"dataset_id": dataset_id, "image_id": r["image_id"],
                                           "caption_id": r["caption_id"]})
    ds = load_dataset(project, version)
    log.info("dataset v%d (round %d): %d images", ds.version, round, len(ds.members))
    return ds


def load_dataset(project, version: int | None = None) -> DatasetVersion:
    """A recorded dataset version with its members (the newest version when ``version`` is None)."""
    cat = project.catalog
    if version is None:
        row = cat.query("SELECT * FROM dataset_versions ORDER BY version DESC LIMIT 1")
    else:
        row = cat.query("SELECT * FROM dataset_versions WHERE version = ?", (version,))
    if not row:
        what = "no dataset version yet" if version is None else f"no dataset version v{version}"
        raise StageError(what, hint="`flywheel train` freezes one; list versions with `flywheel status`")
    dv = row[0]
    members = [
        Member(image_id=m["image_id"], sha256=m["sha256"], kind=m["kind"], width=m["width"], height=m["height"],
               caption_id=m["caption_id"], caption=m["text"], path=project.store.image_path(m["sha256"]))
        for m in cat.query(
            "SELECT dm.image_id, dm.caption_id, i.sha256, i.kind, i.width, i.height, c.text "
            "FROM dataset_members dm JOIN images i ON i.id = dm.image_id "
            "LEFT JOIN captions c ON c.id = dm.caption_id WHERE dm.dataset_id = ? ORDER BY dm.image_id",
            (dv["id"],),
        )
    ]
    return DatasetVersion(id=dv["id"], version=dv["version"], round=dv["round"], rule=dv["rule"], members=members)
