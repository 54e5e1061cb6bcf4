"""Say a non-commercial model's licence once per project, the first time the project loads it.

``licence_notice`` is called by every recorded model load (``pool.recorded_load``). For a preset whose
licence forbids commercial use (or a hub id that is such a preset's) it logs one WARNING line with the
licence's name and URL, unless this project's catalog already has a load row that carries the notice; the
returned keys go into the new load row, which is how the project remembers it (no extra table).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from flywheel.models.presets import PRESETS, Preset, get_preset

if TYPE_CHECKING:
    from flywheel.catalog.db import Catalog

log = logging.getLogger(__name__)
KEY = "licence_notice"  # in a load row's params: the preset whose licence was shown


def preset_for(spec: str, role: str | None = None) -> Preset | None:
    """The preset ``spec`` names, or the first preset with that hub id."""
    role = "text_to_image" if role == "base" else role  # the trainer records its base load as role "base"
    preset = get_preset(spec, role if role in ("vlm", "editor", "text_to_image") else None)  # type: ignore[arg-type]
    if preset is None and spec.count("/") == 1:
        preset = next((p for p in PRESETS.values() if p.hub_id == spec), None)
    return preset


def licence_notice(catalog: Catalog | None, spec: str, role: str | None = None) -> dict[str, Any]:
    """Log the licence of a non-commercial ``spec`` unless this project was told before; the keys to record."""
    preset = preset_for(spec, role)
    if preset is None or preset.licence is None or preset.licence.commercial:
        return {}
    if catalog is not None and catalog.query(
            "SELECT 1 FROM operations WHERE kind = 'model_call' AND json_extract(params_json, '$.licence_notice') = ? "
            "LIMIT 1", (preset.name,)):
        return {}
    licence = preset.licence
    log.warning("model '%s' is under the %s licence, which does not allow commercial use of the model: %s "
                "(shown once per project)", preset.name, licence.name, licence.url)
    return {KEY: preset.name}
