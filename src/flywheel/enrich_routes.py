"""Which editor makes each recipe axis (``[enrich.routes]``), and what the non-instruction editors leave behind.

``routes`` turns ``[enrich] backend`` and ``[enrich.routes]`` into one ``Route`` per axis: the backend, the model
it loads and its editor id (the editor part of enrich's work keys, so moving an axis to another backend makes
its edits anew while the other axes' edits stay done). ``[enrich]``'s editor settings (steps, guidance, LoRAs...)
apply to the default backend; ``[enrich.inpaint]`` and ``[enrich.controlnet]`` apply wherever their backends run.

Describe-then-generate needs the character's description before its work keys exist (its hash is part of
them, so an edited description means new renders): ``ensure_description`` reads ``[enrich.describe] file`` or,
when it is missing, has the captioner write it (an operation row, and an ``artifacts`` row per version).
``record_edit_mask`` stores an inpainting edit's mask in the content store, as an artifact of its operation.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.config import EnrichConfig, ModelsConfig
from flywheel.enrich_settings import EDITOR_KEYS, editor_settings, settings_tag
from flywheel.errors import ConfigError
from flywheel.recipes import AXES

log = logging.getLogger(__name__)

# The routes' editor backends: model family and default preset (merged into flywheel.enrich's tables).
ROUTE_FAMILY = {"inpaint-sdxl": "sdxl_inpaint", "inpaint-flux-fill": "flux_fill",
                "sdxl-turbo-controlnet": "sdxl_controlnet"}
ROUTE_PRESET = {"inpaint-sdxl": "sdxl-inpainting", "inpaint-flux-fill": "flux-fill-dev",
                "sdxl-turbo-controlnet": "sdxl-turbo-canny"}
DESCRIPTION_ARTIFACT = "character_description"


@dataclass(frozen=True)
class Route:
    axis: str
    backend: str
    spec: str | None  # the model it loads (None: composite)
    editor_id: str  # as in work keys
    default: bool  # the [enrich] backend itself: [enrich]'s editor settings apply


def routed_config(cfg: EnrichConfig, route: Route) -> EnrichConfig:
    """``cfg`` as the route's backend sees it: its backend, and [enrich]'s editor settings only if it is the default."""
    if route.default:
        return cfg
    return cfg.model_copy(update={"backend": route.backend, **{key: None for key in EDITOR_KEYS}})


def routes(cfg: EnrichConfig, models: ModelsConfig, *, base: Path | None = None, default_id: str | None = None,
           axes: tuple[str, ...] = AXES) -> dict[str, Route]:
    """One route per axis. ``default_id``: the default backend's editor id when the caller already has it."""
    from flywheel.enrich import editor_id

    out = {}
    for axis in axes:
        value = getattr(cfg.routes, axis)
        if value is None or value == cfg.backend:  # the default backend, as enrich always ran it
            spec = _default_spec(cfg, models)
            ident = default_id or (_describe_id(cfg, spec, base) if cfg.backend == "describe-generate"
                                   else editor_id(cfg, models))
            out[axis] = Route(axis, cfg.backend, spec, ident, True)
            continue
        backend, _, model = value.partition("=")
        spec = model or _backend_default(backend, models)
        route = Route(axis, backend, spec, "", False)
        sub = routed_config(cfg, route)
        if backend == "composite":
            ident = "composite"
        elif backend == "describe-generate":
            ident = _describe_id(cfg, spec, base)
        else:
            ident = f"{backend}={spec}{settings_tag(sub, spec)}"
        out[axis] = Route(axis, backend, spec, ident, False)
    return out


def _default_spec(cfg: EnrichConfig, models: ModelsConfig) -> str | None:
    from flywheel.enrich import editor_spec

    if cfg.backend == "composite":
        return None
    if cfg.backend == "describe-generate":
        return models.base
    return editor_spec(cfg, models)


def _backend_default(backend: str, models: ModelsConfig) -> str | None:
    """A routed backend's model: [models] editor when it is of the backend's family, else its default preset."""
    from flywheel.enrich import BACKEND_FAMILY, BACKEND_PRESET
    from flywheel.models.presets import get_preset

    if backend == "composite":
        return None
    if backend == "describe-generate":
        return models.base
    preset = get_preset(models.editor, role="editor")
    return models.editor if preset is not None and preset.family == BACKEND_FAMILY[backend] else BACKEND_PRESET[backend]


def _describe_id(cfg: EnrichConfig, spec: str | None, base: Path | None) -> str:
    """``describe-generate=<base>#<description hash>`` ('#none' until the description is written)."""
    from flywheel.models.describe_generate import description_sha

    text = read_description(cfg, base)
    size = f"@{cfg.describe.max_area}" if cfg.describe.max_area else ""
    return f"describe-generate={spec}{size}#{description_sha(text)[:10] if text else 'none'}"


def description_path(cfg: EnrichConfig, base: Path | None) -> Path:
    path = Path(cfg.describe.file).expanduser()
    return path if path.is_absolute() or base is None else base / path


def read_description(cfg: EnrichConfig, base: Path | None) -> str | None:
    path = description_path(cfg, base)
    if not path.is_file():
        return None
    text = " ".join(path.read_text(encoding="utf-8").split())
    if not text:
        raise ConfigError(f"the character description {path} is empty",
                          hint="write the description into it, or delete the file to have the captioner write one")
    return text


def uses_describe(cfg: EnrichConfig, axes: set[str]) -> bool:
    return any(getattr(cfg.routes, a) and getattr(cfg.routes, a).startswith("describe-generate") for a in axes) or (
        cfg.backend == "describe-generate" and any(getattr(cfg.routes, a) is None for a in axes))


def ensure_description(project, cfg: EnrichConfig, pool) -> str | None:
    """The character's description: the file's (recorded as an artifact when it is new or was edited), or the
    captioner's, written to the file first (None: no file and no source to describe)."""
    from flywheel.catalog.queries import KEPT_SOURCES
    from flywheel.models.describe_generate import (
        DESCRIBE_PROMPT,
        describe_character,
        description_sha,
    )

    catalog, path = project.catalog, description_path(cfg, project.root)
    text = read_description(cfg, project.root)
    written_by = "file"
    if text is None:
        sources = catalog.query(KEPT_SOURCES)[: cfg.describe.sources]
        if not sources:  # nothing to describe; planning says so in one line
            return None
        spec = project.config.models.captioner
        vlm = pool.vlm(spec)
        with catalog.operation("enrich", kind="model_call", model=vlm.model_id, params={
                "action": "describe_character", "prompt": DESCRIBE_PROMPT, "source_image_ids": [s["id"] for s in sources],
                "max_new_tokens": cfg.describe.max_new_tokens, "file": str(cfg.describe.file)}) as op_id:
            t0 = time.perf_counter()
            text = describe_character(vlm, [project.store.open_image(s["sha256"]) for s in sources],
                                      max_new_tokens=cfg.describe.max_new_tokens)
            if not text:
                raise ConfigError("the captioner wrote an empty character description",
                                  hint=f"write one yourself into {path}, then run enrich again")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text + "\n", encoding="utf-8")
            log.info("enrich: the character's description (%d words, %.1f s) is in %s: edit it to change the renders",
                     len(text.split()), time.perf_counter() - t0, path)
        written_by = "captioner"
    else:
        op_id = None
    sha = description_sha(text)
    seen = catalog.query("SELECT 1 FROM artifacts WHERE kind = ? AND sha256 = ?", (DESCRIPTION_ARTIFACT, sha))
    if not seen:  # a new version (the captioner's, or the user's edit): kept in the catalog with its text
        with catalog.transaction():
            catalog.insert("artifacts", {"kind": DESCRIPTION_ARTIFACT, "path": os.path.relpath(path, project.workspace),
                                         "sha256": sha, "operation_id": op_id,
                                         "meta_json": json.dumps({"text": text, "written_by": written_by})})
    return text


def load_route_editor(project, cfg: EnrichConfig, route: Route, pool, description: str | None):
    """The editor of a route that ``flywheel.enrich.load_enrich_editor`` does not load (a routed backend,
    or describe-then-generate), through ``pool``."""
    from flywheel.enrich import load_enrich_editor

    sub = routed_config(cfg, route)
    if route.backend == "describe-generate":
        from flywheel.models.describe_generate import DescribeGenerateEditor

        if description is None:
            raise ConfigError("describe-generate has no character description", hint="run enrich again")
        return DescribeGenerateEditor(pool.text_to_image(route.spec), description,
                                      max_area=cfg.describe.max_area or 1024 * 1024)
    if route.default or route.backend == "composite":
        return load_enrich_editor(sub, project.config.models, pool, base=project.root)
    return pool.editor(route.spec, **editor_settings(sub, project.root))


def record_edit_mask(project, image_id: int, image, op_id: int) -> str | None:
    """Store the edit's mask (``image.info["edit_mask"]``, 255 = the source's pixels kept) in the content store,
    as an ``edit_mask`` artifact of the edit's operation; returns its sha256 (None: the edit had no mask).
    Called inside the transaction that records the image."""
    mask = getattr(image, "info", {}).get("edit_mask")
    if mask is None:
        return None
    sha, path = project.store.put_image(mask.convert("RGB"))
    meta: dict[str, Any] = {"image_id": image_id, "meaning": "255 = the source's pixels kept, 0 = repainted"}
    project.catalog.insert("artifacts", {"kind": "edit_mask", "path": os.path.relpath(path, project.workspace),
                                         "sha256": sha, "operation_id": op_id, "meta_json": json.dumps(meta)})
    return sha
