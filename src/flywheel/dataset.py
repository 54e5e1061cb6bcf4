"""Freeze the training set: which images, with which captions, go into LoRA round ``k``.

The rule (recorded with each version as ``dataset_versions.rule``):
- sources are in unless a human left one out (its newest review is 'rejected', given with a reason on
  the review page's Sources tab);
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
    "sources unless a human's newest review of one is 'rejected'; other images with round < k: newest human "
    "review 'accepted', or no deciding review (none/cleared/skipped) and newest machine verdict 'accepted'; "
    "newest caption per image"
)

_MEMBERS_SQL = f"""
WITH last_caption AS (
    SELECT image_id, MAX(id) AS caption_id FROM captions GROUP BY image_id
)
SELECT i.id AS image_id, c.caption_id
FROM images i
LEFT JOIN last_caption c ON c.image_id = i.id
WHERE (i.kind = 'source'  -- a source is left out only by a human: its newest review is 'rejected'
       AND COALESCE((SELECT r.decision FROM reviews r WHERE r.image_id = i.id ORDER BY r.id DESC LIMIT 1), '')
           != 'rejected')
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


def next_round(project) -> int:
    """The LoRA round the next training run is for: one past the newest finished run's."""
    return int(project.catalog.query(
        "SELECT COALESCE(MAX(round), 0) + 1 AS r FROM lora_runs WHERE status = 'ok'")[0]["r"])


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


# --- What a set holds, and whether it is ready to train ------------------------------------------------
_CANDIDATES_SQL = f"""
SELECT i.id AS image_id, i.kind, {EFFECTIVE_DECISION} AS decision,
       (SELECT r.decision FROM reviews r WHERE r.image_id = i.id ORDER BY r.id DESC LIMIT 1) AS review
FROM images i WHERE i.round < :round AND i.purpose = 'train'
"""
_LEFT_OUT = {"rejected": "rejected", "needs_review": "need review", None: "not judged", "accepted": "accepted since"}


@dataclass
class SetSummary:
    """A training set, frozen (``version``) or as a freeze would make it now (``version`` None)."""

    round: int
    version: int | None
    kinds: dict[str, int]  # members by kind
    uncaptioned: int  # members without a caption (training would fall back to the bare trigger word)
    by_you: int  # non-source members a human accepted
    by_judge: int  # non-source members the judge accepted, with no deciding review
    left_out: dict[str | None, int]  # training images of earlier rounds not in the set, by decision now
    edits: int  # non-source training images made before the round, in the set or not

    @property
    def images(self) -> int:
        return sum(self.kinds.values())

    @property
    def kinds_text(self) -> str:
        """'5 source, 12 enriched', in pipeline order."""
        order = {"source": 0, "enriched": 1, "synthetic": 2}
        return ", ".join(f"{self.kinds[k]} {k}" for k in sorted(self.kinds, key=lambda k: (order.get(k, 3), k)))

    @property
    def name(self) -> str:
        return f"dataset v{self.version} (round {self.round})" if self.version else f"the round-{self.round} set"

    def describe(self) -> str:
        """One line: 'dataset v1 (round 1): 17 images (5 source, 12 enriched); 2 uncaptioned; ...'."""
        parts = [f"{_count(self.images, 'image')} ({self.kinds_text})", f"{self.images - self.uncaptioned} captioned, "
                 f"{self.uncaptioned} uncaptioned"]
        if self.edits:
            parts.append(f"accepted: {self.by_you} by you, {self.by_judge} by the judge")
            out = [f"{self.left_out[d]} {label}" for d, label in _LEFT_OUT.items() if self.left_out.get(d)]
            parts.append("left out: " + (", ".join(out) if out else "none"))
        else:
            parts.append("no edits yet (sources only)")
        return f"{self.name}: " + "; ".join(parts)

    def blockers(self) -> list[tuple[str, str]]:
        """(what is missing, the command that fixes it), in pipeline order; empty when ready to train."""
        out = []
        if not self.edits:
            out.append(("no edits yet, only the sources", "flywheel enrich"))
        if self.uncaptioned:
            out.append((f"{self.uncaptioned} uncaptioned", "flywheel caption"))
        if self.left_out.get(None):
            out.append((f"{self.left_out[None]} not judged", "flywheel judge"))
        if self.left_out.get("needs_review"):
            out.append((f"{self.left_out['needs_review']} waiting for your review", "flywheel review"))
        return out


def summarize(project, *, round: int | None = None, version: int | None = None) -> SetSummary:
    """What dataset ``version`` holds, or what freezing ``round`` would hold now, and what is left out."""
    cat = project.catalog
    if version is None and round is None:
        raise ValueError("summarize needs a dataset version or a round")
    if version is not None:
        ds = load_dataset(project, version)
        round = ds.round
        members = {m.image_id: (m.kind, m.caption_id is not None) for m in ds.members}
    else:
        kinds = {r["id"]: r["kind"] for r in cat.query("SELECT id, kind FROM images")}
        members = {r["image_id"]: (kinds[r["image_id"]], r["caption_id"] is not None)
                   for r in cat.query(_MEMBERS_SQL, {"round": round})}
    counts: dict[str, int] = {}
    for kind, _ in members.values():
        counts[kind] = counts.get(kind, 0) + 1
    summary = SetSummary(round=round, version=version, kinds=counts, left_out={}, edits=0, by_you=0, by_judge=0,
                         uncaptioned=sum(1 for _, captioned in members.values() if not captioned))
    for r in cat.query(_CANDIDATES_SQL, {"round": round}):
        summary.edits += r["kind"] != "source"
        if r["image_id"] not in members:
            summary.left_out[r["decision"]] = summary.left_out.get(r["decision"], 0) + 1
        elif r["kind"] != "source" and r["review"] == "accepted":
            summary.by_you += 1
        elif r["kind"] != "source":
            summary.by_judge += 1
    return summary


def ensure_trainable(project, round: int, version: int | None = None) -> SetSummary:
    """Refuse (StageError, one line) a set with uncaptioned members, unjudged or unreviewed images, or no edits
    yet, saying what it holds and what to run. ``flywheel train --force`` skips this."""
    summary = summarize(project, round=round, version=version)
    blockers = summary.blockers()
    if blockers:
        commands = ", ".join(f"`{cmd}`" for _, cmd in blockers)
        raise StageError(
            f"{summary.name} is not ready to train: {_count(summary.images, 'image')} ({summary.kinds_text}); "
            + "; ".join(what for what, _ in blockers),
            hint=f"run {commands}; or pass --force to train on it as it is",
        )
    return summary


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
