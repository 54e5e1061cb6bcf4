"""Human decisions: appended to ``reviews``, never updated or deleted.

The newest review per image is the current one; 'cleared' is an undo (back to "no human decision").
Machine verdicts are never touched: training reads human-over-machine at dataset time
(``flywheel.dataset``). A decision on a source is about the source itself: 'rejected' leaves it out of
training, and needs a reason.
"""

from __future__ import annotations

import getpass
import logging
import re
from typing import Any

from flywheel.errors import ReviewError
from flywheel.project import Project

log = logging.getLogger(__name__)

DECISIONS = ("accepted", "rejected", "skipped", "cleared")
MAX_SQLITE_INT = 2**63 - 1
MAX_REASON_CHARS = 2000
_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII only: str.isdigit() also accepts '²', which int() refuses
_CHUNK = 500  # ids per IN (...) list: far below SQLite's variable limit however large the selection


class SelectionChanged(ReviewError):
    """A filter action was confirmed for N images but the filter now selects a different number."""


def record_review(project: Project, image_ids: list[int], decision: str, reviewer: str,
                  reason: str | None = None) -> list[int]:
    """Append one review row per image (all or none). Returns the new rows' ids.

    ``decision`` is accepted / rejected / skipped, or 'cleared' to undo (the image is undecided again).
    Leaving a source out of training (rejecting it) needs a reason.
    """
    # 1. Validate everything before writing anything.
    if not isinstance(decision, str) or decision not in DECISIONS:
        raise ReviewError(f"unknown decision {_short(decision)}", hint=f"use one of: {', '.join(DECISIONS)}")
    reviewer = (reviewer or "").strip()
    if not reviewer:
        raise ReviewError("a review needs a reviewer name", hint="pass --reviewer NAME to `flywheel review`")
    ids = list(dict.fromkeys(parse_image_id(i) for i in image_ids))  # de-duplicated, order kept
    if not ids:
        raise ReviewError("no images to review", hint="select at least one image")
    kinds = _kinds(project, ids)
    missing = [i for i in ids if i not in kinds]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ReviewError(f"no image with id {shown} in the catalog",
                          hint="reload the page: the catalog may have changed")
    reason = (reason or "").strip() or None
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        raise ReviewError(f"the reason is {len(reason)} characters long (at most {MAX_REASON_CHARS})")
    if decision == "rejected" and not reason and "source" in kinds.values():
        raise ReviewError("leaving a source out of training needs a reason",
                          hint="say why (e.g. 'another person', 'heavy motion blur'); it is shown with the source")
    # 2. Append, in one transaction: a bulk decision is recorded for every image or for none.
    with project.catalog.transaction():
        rows = [project.catalog.insert("reviews", {"image_id": i, "decision": decision, "reason": reason,
                                                   "reviewer": reviewer}) for i in ids]
    log.info("review: %s %d image(s) by %s", decision, len(ids), reviewer)
    return rows


def record_filter_review(project: Project, filters: Any, decision: str, reviewer: str, *, expected: int,
                         reason: str | None = None) -> list[int]:
    """Decide every image the filter selects (all pages), one review row each. ``expected`` is the count
    the reviewer confirmed; if the filter now selects a different number, nothing is written."""
    from flywheel.review.items import matching_ids

    ids = matching_ids(project, filters)
    if len(ids) != expected:
        raise SelectionChanged(f"this filter now selects {len(ids)} images, not the {expected} you confirmed",
                               hint="reload the page and confirm again")
    return record_review(project, ids, decision, reviewer, reason)


def latest_decisions(project: Project, image_ids: list[int]) -> dict[int, str | None]:
    """Each image's newest human decision (None: never reviewed), e.g. to undo an action."""
    out: dict[int, str | None] = dict.fromkeys(image_ids)
    for chunk in _chunks(list(out)):
        marks = ", ".join("?" for _ in chunk)
        for r in project.catalog.query(
                f"SELECT image_id, decision FROM reviews WHERE id IN "
                f"(SELECT MAX(id) FROM reviews WHERE image_id IN ({marks}) GROUP BY image_id)", tuple(chunk)):
            out[r["image_id"]] = r["decision"]
    return out


def _kinds(project: Project, ids: list[int]) -> dict[int, str]:
    kinds: dict[int, str] = {}
    for chunk in _chunks(ids):
        rows = project.catalog.query(
            f"SELECT id, kind FROM images WHERE id IN ({', '.join('?' for _ in chunk)})", tuple(chunk))
        kinds.update({r["id"]: r["kind"] for r in rows})
    return kinds


def _chunks(ids: list[int]) -> list[list[int]]:
    return [ids[i:i + _CHUNK] for i in range(0, len(ids), _CHUNK)]


def parse_image_id(value: Any, *, error: type[Exception] = ReviewError) -> int:
    """A catalog image id from user input (JSON, a form, the command line), or ``error`` saying why not.

    Only 1 to 19 ASCII digits: a negative, fractional, enormous or non-numeric id is refused here, before
    it reaches int() (whose digit limit raises ValueError) or SQLite (whose integers stop at 2**63 - 1).
    """
    # bool is an int subclass; a JSON `true` is not an image id.
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not _DIGITS.fullmatch(
            value if isinstance(value, str) else str(value) if abs(value) < 10**20 else "x"):
        raise error(f"not an image id: {_short(value)}", hint="image ids are whole numbers from the catalog")
    number = int(value)
    if not 0 < number <= MAX_SQLITE_INT:
        raise error(f"no image with id {number} in the catalog")
    return number


def _short(value: Any, limit: int = 40) -> str:
    """repr() of user input, cut short: an error message stays one readable line."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**40 else f"<a {len(str(abs(value)))}-digit number>"
    return text if len(text) <= limit else text[:limit] + "…"


def default_person() -> str:
    """The login name, recorded with reviews and hand-written captions."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (some containers)
        return "reviewer"
