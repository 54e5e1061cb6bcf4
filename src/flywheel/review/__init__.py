"""``flywheel review``: what a human reviewer sees and decides, read from and appended to the catalog.

The web app (``flywheel.web``) is a thin layer over these modules:

- ``items``: the reviewable images of a filter, each with what explains it (parents, scores as readable
  labels with their thresholds, verdict, caption, recipe), and counts (``list_items``, ``count_items``).
- ``decisions``: human decisions appended to ``reviews`` (``record_review``; ``record_filter_review``
  decides every image of a filter, one row each). Nothing is ever updated or deleted.
- ``sources``: the sources with per-source statistics; a source a human rejects is left out of training.
- ``labels``: "identity: face distance 0.42 (accept ≤ 0.60)" instead of raw numbers.
- ``thumbs``: a cached, downscaled copy of a catalog image; only catalog ids reach the store.

Everything a caller needs is importable from ``flywheel.review``.
"""

from __future__ import annotations

from flywheel.review.decisions import (
    DECISIONS,
    MAX_SQLITE_INT,
    SelectionChanged,
    default_person,
    latest_decisions,
    parse_image_id,
    record_filter_review,
    record_review,
)
from flywheel.review.items import (
    DEFAULT_VIEW,
    PAGE_SIZE,
    REVIEW_FILTERS,
    REVIEWABLE_KINDS,
    VERDICT_FILTERS,
    Counts,
    Filters,
    Item,
    Parent,
    Score,
    count_items,
    filter_options,
    list_items,
    matching_ids,
    verdict_tally,
)
from flywheel.review.sources import SourceItem, list_sources
from flywheel.review.thumbs import THUMB_SIZE, image_sha, thumbnail

__all__ = [
    "DECISIONS", "DEFAULT_VIEW", "MAX_SQLITE_INT", "PAGE_SIZE", "REVIEWABLE_KINDS", "REVIEW_FILTERS", "THUMB_SIZE",
    "VERDICT_FILTERS", "Counts", "Filters", "Item", "Parent", "Score", "SelectionChanged", "SourceItem",
    "count_items", "default_person", "filter_options", "image_sha", "latest_decisions", "list_items",
    "list_sources", "matching_ids", "parse_image_id", "record_filter_review", "record_review", "thumbnail",
    "verdict_tally",
]
