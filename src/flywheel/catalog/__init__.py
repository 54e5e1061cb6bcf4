"""The embedded SQLite catalog: every image, its lineage, every model call, score, verdict and review."""

from flywheel.catalog.db import Catalog, open_catalog

__all__ = ["Catalog", "open_catalog"]
