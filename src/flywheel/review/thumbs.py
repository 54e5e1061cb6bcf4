"""Catalog images for the browser: by id only (no route takes a file name), thumbnails cached by hash."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from flywheel.project import Project
from flywheel.review.decisions import MAX_SQLITE_INT

THUMB_SIZE = 384


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
