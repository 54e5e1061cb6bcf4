"""SFT examples for the judge from the reviews table, split train / held-out by source image.

One example per edited or generated image whose newest human review is ``accepted`` or ``rejected``
(``skipped`` and ``cleared`` are not decisions). Its reference is the image the judge compares it with:
the source it was edited from, else the source the judge found its face closest to, else the first
source. Examples are grouped by the source they descend from (generated images, which have no source,
by their prompt), and whole groups go to held-out, so no edit of a held-out source is ever trained on.

The side of each group is stored once (catalog table ``judge_split_groups``) and reused by every later
attempt: the first attempt fills held-out in a seeded hash order, a group seen later goes to held-out
when its own seeded hash falls under ``held_out_fraction``, and no stored group ever changes side.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field

from flywheel.errors import StageError
from flywheel.judge_tuning.prompt import keep_answer, keep_request, recipe_of
from flywheel.models.base import ChatRequest
from flywheel.project import Project

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    image_id: int
    sha256: str
    reference_sha256: str
    kind: str
    keep: bool  # the human decision: accepted = keep
    reason: str
    prompt: str | None
    recipe: str | None
    group: str  # "source:<id>", "prompt:<text>" or "image:<id>": what the split keeps together


@dataclass
class SplitData:
    train: list[Example]
    held_out: list[Example]
    data_hash: str
    sides: dict[str, str] = field(default_factory=dict)  # group -> "train" / "held_out", every group here
    new_groups: dict[str, str] = field(default_factory=dict)  # the groups not stored yet, with their side

    def balance(self) -> dict[str, dict[str, int]]:
        """Class balance per split (a judge that says "keep" to everything looks good on 90% keeps)."""
        def count(examples: list[Example]) -> dict[str, int]:
            c = Counter("keep" if e.keep else "reject" for e in examples)
            return {"keep": c["keep"], "reject": c["reject"], "groups": len({e.group for e in examples})}

        return {"train": count(self.train), "held_out": count(self.held_out)}


def load_examples(project: Project) -> list[Example]:
    """Every reviewed (accepted / rejected) edited or generated image, with its reference and recipe."""
    catalog = project.catalog
    rows = catalog.query(
        """SELECT i.id, i.sha256, i.kind, r.decision, r.reason, o.params_json AS made_with
           FROM images i
           JOIN reviews r ON r.id = (SELECT MAX(r2.id) FROM reviews r2 WHERE r2.image_id = i.id)
           LEFT JOIN operations o ON o.id = i.operation_id
           WHERE i.kind IN ('enriched', 'synthetic') AND r.decision IN ('accepted', 'rejected')
           ORDER BY i.id""")
    sources = [r["id"] for r in catalog.query("SELECT id FROM images WHERE kind = 'source' ORDER BY id")]
    if rows and not sources:
        raise StageError("the project has reviewed images but no source images to compare them with",
                         hint="ingest the character's source images (`flywheel ingest`)")
    examples = []
    for r in rows:
        prompt, recipe = recipe_of(json.loads(r["made_with"]) if r["made_with"] else {})
        root = _root_source(project, r["id"])
        # The image `flywheel judge` compares it with: its parent, else the closest source face, else the first.
        ref_id = _parent(project, r["id"]) or _closest_face_source(project, r["id"]) or sources[0]
        group = f"source:{root}" if root else (f"prompt:{prompt}" if prompt else f"image:{r['id']}")
        ref_sha = catalog.query("SELECT sha256 FROM images WHERE id = ?", (ref_id,))[0]["sha256"]
        examples.append(Example(r["id"], r["sha256"], ref_sha, r["kind"], r["decision"] == "accepted",
                                r["reason"] or "", prompt, recipe, group))
    return examples


def _parent(project: Project, image_id: int) -> int | None:
    row = project.catalog.query("SELECT parent_id FROM image_parents WHERE image_id = ? AND role = 'source' "
                                "ORDER BY parent_id LIMIT 1", (image_id,))
    return int(row[0]["parent_id"]) if row else None


def _root_source(project: Project, image_id: int) -> int | None:
    """The source an image descends from through 'source' parents (an edit of an edit ends at a source)."""
    seen = {image_id}
    current = image_id
    while True:
        row = project.catalog.query(
            "SELECT p.parent_id, i.kind FROM image_parents p JOIN images i ON i.id = p.parent_id "
            "WHERE p.image_id = ? AND p.role = 'source' ORDER BY p.parent_id LIMIT 1", (current,))
        if not row or row[0]["parent_id"] in seen:
            return None
        if row[0]["kind"] == "source":
            return int(row[0]["parent_id"])
        current = int(row[0]["parent_id"])
        seen.add(current)


def _closest_face_source(project: Project, image_id: int) -> int | None:
    """The source the judge found the face closest to (its newest face identity score), if any."""
    row = project.catalog.query(
        "SELECT json_extract(details_json, '$.closest_source_id') AS src FROM scores WHERE image_id = ? "
        "AND criterion = 'identity' AND scorer LIKE 'face:%' ORDER BY id DESC LIMIT 1", (image_id,))
    return int(row[0]["src"]) if row and row[0]["src"] is not None else None


def data_hash(examples: list[Example]) -> str:
    """sha256 of what the adapter learns from: (image sha, decision, reason, prompt) per example, sorted."""
    items = sorted((e.sha256, e.keep, e.reason, e.prompt or e.recipe or "") for e in examples)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def stored_sides(project: Project) -> dict[str, str]:
    """The side every group got when it first appeared (``judge_split_groups``)."""
    return {r["group_key"]: r["side"] for r in project.catalog.query("SELECT group_key, side FROM judge_split_groups")}


def store_sides(project: Project, split: SplitData, attempt_id: int) -> None:
    """Record the sides of the groups first seen by this attempt (call inside a transaction); never moves one."""
    for group, side in sorted(split.new_groups.items()):
        project.catalog.execute("INSERT OR IGNORE INTO judge_split_groups (group_key, side, attempt_id) "
                                "VALUES (?, ?, ?)", (group, side, attempt_id))


def _hash_side(group: str, seed: int, held_out_fraction: float) -> str:
    """A new group's side from its own seeded hash: stable, and independent of every other group."""
    u = int(hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()[:12], 16) / 16**12
    return "held_out" if u < held_out_fraction else "train"


def split_by_source(examples: list[Example], held_out_fraction: float, seed: int, *,
                    min_examples: int = 2, stored: dict[str, str] | None = None) -> SplitData:
    """Whole groups to train or held-out; ``stored`` sides are kept, new groups get theirs by hash.

    With nothing stored (the first attempt), whole groups go to held-out in a seeded hash order until it
    holds ``held_out_fraction`` of the examples, and the last group always trains.
    """
    if len(examples) < min_examples:
        raise StageError(f"only {len(examples)} reviewed image(s) have an accepted/rejected decision; "
                         f"tuning the judge needs at least {min_examples}",
                         hint="review more images (`flywheel review`), or lower [tune_judge] min_examples")
    groups: dict[str, list[Example]] = {}
    for e in examples:
        groups.setdefault(e.group, []).append(e)
    if len(groups) < 2:
        raise StageError(f"all {len(examples)} reviewed images descend from one source ({next(iter(groups))}), "
                         "so no held-out set can be kept apart from training",
                         hint="review edits of at least two different source images")
    stored = stored or {}
    if stored:
        sides = {g: stored.get(g) or _hash_side(g, seed, held_out_fraction) for g in groups}
    else:
        order = sorted(groups, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
        sides, held_count, target = {}, 0, held_out_fraction * len(examples)
        for g in order:
            last = g == order[-1]  # the last group always trains
            sides[g] = "held_out" if held_count < target and not last else "train"
            held_count += len(groups[g]) if sides[g] == "held_out" else 0
    for side in ("train", "held_out"):
        if side not in sides.values():
            raise StageError(f"the stored judge split puts none of today's {len(groups)} review groups in {side}",
                             hint="review edits of more source images (new sources are split by a stable hash)")
    held = [e for e in examples if sides[e.group] == "held_out"]
    split = SplitData([e for e in examples if sides[e.group] == "train"], held, data_hash(examples), sides,
                      {g: s for g, s in sides.items() if g not in stored})
    balance = split.balance()
    log.info("tune-judge: %d train / %d held-out examples, class balance %s", len(split.train), len(held), balance)
    for name, counts in balance.items():
        if not counts["keep"] or not counts["reject"]:
            log.warning("tune-judge: the %s split has only %s examples; its agreement numbers say little",
                        name, "keep" if counts["keep"] else "reject")
    return split


def request_for(project: Project, e: Example) -> ChatRequest:
    store = project.store
    return keep_request(store.open_image(e.reference_sha256), store.open_image(e.sha256), kind=e.kind,
                        prompt=e.prompt, recipe=e.recipe)


def answer_for(e: Example) -> str:
    return keep_answer(e.keep, e.reason)
