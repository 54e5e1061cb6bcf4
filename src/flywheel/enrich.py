"""``flywheel enrich``: identity-preserving edits of every source image, one per source x recipe x seed.

Every unit of work has a deterministic key, ``enrich:<source sha256>:<recipe id>:<seed>:<editor>`` (editor:
``composite``, or ``<backend>=<model>`` so switching from the tiny to the real model redoes the edits, plus
``+<hash>`` when ``[enrich]`` sets editor settings the preset does not: other steps or LoRAs, other edits),
stored as the UNIQUE ``work_key`` of its operation row. A unit is done when its operation is 'ok' with an
image (or 'skipped': the editor returned an image already in the catalog). Anything else, including
the 'running' rows a killed process leaves behind, is redone by reusing that row, so re-running never
duplicates an edit and a crash never loses one. The image row, its lineage and the operation's 'ok'
are written in one transaction.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from flywheel.catalog.queries import KEPT_SOURCES
from flywheel.compute import UnitFailed, map_calls
from flywheel.config import EnrichConfig, ModelsConfig
from flywheel.enrich_routes import (ROUTE_FAMILY, ROUTE_PRESET, ensure_description, load_route_editor, routed_config,
                                    routes, uses_describe)
from flywheel.enrich_settings import editor_settings, settings_tag
from flywheel.enrich_units import Recorder, done_keys, fail_units, start_unit
from flywheel.errors import ConfigError, ModelOutputError, StageError
from flywheel.models.base import EditRequest, ImageEditor
from flywheel.progress import ProgressFn, no_progress
from flywheel.project import Project
from flywheel.recipes import Recipe, load_recipes

log = logging.getLogger(__name__)

STAGE = "enrich"
# Model family and default preset per generative backend; references only where the pipeline takes them.
BACKEND_FAMILY = {"qwen-image-edit": "qwen_image_edit", "flux-kontext": "flux_kontext", "flux2-klein": "flux2_klein",
                  "longcat-image-edit": "longcat_edit", "instruct-pix2pix": "instruct_pix2pix",
                  "api": "openai_api"}
BACKEND_PRESET = {"qwen-image-edit": "qwen-image-edit-2511-lightning", "flux-kontext": "flux-kontext-dev",
                  "flux2-klein": "flux2-klein-4b", "longcat-image-edit": "longcat-image-edit-turbo",
                  "instruct-pix2pix": "instruct-pix2pix", "api": "api"}
BACKEND_FAMILY.update(ROUTE_FAMILY)  # inpainting and SDXL-Turbo + ControlNet (flywheel.enrich_routes)
BACKEND_PRESET.update(ROUTE_PRESET)
TAKES_REFERENCES = {"qwen-image-edit", "flux2-klein"}


@dataclass(frozen=True)
class EditUnit:
    source_id: int
    source_sha: str
    recipe: Recipe
    seed: int
    work_key: str


@dataclass
class EnrichResult:
    backend: str
    planned: int = 0
    already_done: int = 0
    made: list[int] = field(default_factory=list)  # new image ids
    identical: int = 0  # outputs that were already in the catalog (recorded as 'skipped')
    failed: list[tuple[str, str]] = field(default_factory=list)  # (work_key, error)
    mask_failed: list[int] = field(default_factory=list)  # composite edits on a failed person mask (judge rejects)

    def summary(self) -> str:
        parts = [f"{len(self.made)} new", f"{self.already_done} already done"]
        if self.identical:
            parts.append(f"{self.identical} identical to an existing image")
        if self.failed:
            parts.append(f"{len(self.failed)} failed (re-run to retry)")
        if self.mask_failed:
            parts.append(f"{len(self.mask_failed)} with a failed subject mask (the judge rejects them)")
        return f"enrich ({self.backend}): {self.planned} edits planned; " + ", ".join(parts)


def work_key(source_sha: str, recipe_id: str, seed: int, editor_id: str) -> str:
    return f"{STAGE}:{source_sha}:{recipe_id}:{seed}:{editor_id}"


def editor_id(cfg: EnrichConfig, models: ModelsConfig, editor: ImageEditor | None = None) -> str:
    """Which editor makes the edits, as it goes into work keys: another model, or [enrich] settings that
    differ from its preset's (steps, guidance, LoRAs...), means other edits."""
    if cfg.backend == "composite":
        return "composite"
    spec = editor.model_id if editor is not None else editor_spec(cfg, models)
    return f"{cfg.backend}={spec}{settings_tag(cfg, spec)}"


def plan(project: Project, cfg: EnrichConfig, editor: str | None = None, table: dict | None = None) -> list[EditUnit]:
    """Every edit this config asks for, in a stable order (source, recipe, seed); each recipe's editor id is
    its axis's route (``flywheel.enrich_routes``; ``editor``: the default backend's id, when known)."""
    table = table or routes(cfg, project.config.models, base=project.root, default_id=editor)
    book = load_recipes(cfg.extra_recipe_files, base=project.root)
    recipes = book.select(cfg.recipes)
    sources = project.catalog.query(KEPT_SOURCES)
    if not sources:
        raise StageError("there are no source images to edit (none ingested, or all left out on the review page)",
                         hint="add some first: flywheel ingest PATH... (or put a source back on the Sources page)")
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)
    return [
        EditUnit(src["id"], src["sha256"], recipe, seed,
                 work_key(src["sha256"], recipe.id, seed, table[recipe.axis].editor_id))
        for src in sources for recipe in recipes for seed in seeds
    ]


def enrich(project: Project, cfg: EnrichConfig | None = None, editor: ImageEditor | None = None,
           progress: ProgressFn | None = None, pool=None) -> EnrichResult:
    """Make every planned edit that is not in the catalog yet. ``editor`` overrides the configured backend's
    (the other backends of [enrich.routes] are loaded here)."""
    cfg = cfg or project.config.enrich
    progress = progress or no_progress
    result = EnrichResult(backend=cfg.backend + "".join(
        f", {axis}: {value}" for axis, value in cfg.routes.model_dump().items() if value))
    from flywheel.models.pool import stage_pool

    with stage_pool(project, pool, STAGE) as models:
        _enrich(project, cfg, editor, progress, models, result)
    log.info("%s", result.summary())
    return result


def _enrich(project: Project, cfg: EnrichConfig, editor: ImageEditor | None, progress: ProgressFn, models,
            result: EnrichResult) -> None:
    # 1. Plan sources x recipes x seeds up front, so progress can say "12/25 edits"; each axis's editor from
    #    [enrich.routes] (describe-then-generate's description first: its hash is part of its work keys).
    axes = {r.axis for r in load_recipes(cfg.extra_recipe_files, base=project.root).select(cfg.recipes)}
    description = ensure_description(project, cfg, models) if uses_describe(cfg, axes) else None
    given_id = editor_id(cfg, project.config.models, editor) if editor is not None else None
    table = routes(cfg, project.config.models, base=project.root, default_id=given_id)
    units = plan(project, cfg, table=table)
    result.planned = len(units)

    # 2. Skip what is done: an 'ok' operation with its image, or 'skipped' (identical output).
    done = done_keys(project, [u.work_key for u in units])
    todo = [u for u in units if u.work_key not in done]
    result.already_done = len(units) - len(todo)
    progress(result.already_done, result.planned, "edits")
    if not todo:
        log.info("enrich: all %d planned edits already exist", result.planned)
        return

    # 3. Per route (one editor id: all axes of one backend and model), load its editor once from the pool (one
    #    big model at a time; released before returning unless the caller's pool keeps it).
    for ident in dict.fromkeys(r.editor_id for r in table.values()):
        route = next(r for r in table.values() if r.editor_id == ident)
        group = [u for u in units if table[u.recipe.axis].editor_id == ident]
        group_todo = [u for u in group if u.work_key not in done]
        if not group_todo:
            continue
        # Batches are fixed slices of the route's plan; one an interrupted run finished in part is edited whole
        # again (a smaller batch would change the last bits of GPU editors' outputs), recording only what is missing.
        batches = [group[i:i + cfg.batch_size] for i in range(0, len(group), cfg.batch_size)]
        batches = [b for b in batches if any(u.work_key not in done for u in b)]
        given = editor if route.default else None
        composite = given is None and route.backend == "composite"  # not a pooled model: closed here
        if composite and project.config.compute.backend == "ray":  # a CPU model: replicas on Ray actors
            from flywheel.compute import remote
            from flywheel.models.composite import CompositeEditor

            given = remote(project.config.compute, CompositeEditor, "composite")
        route_editor = given or load_route_editor(project, cfg, route, models, description)
        try:
            _edit_all(project, routed_config(cfg, route), route_editor, group, group_todo, batches, done, result,
                      progress)
        finally:
            if composite:
                route_editor.close()


def _edit_all(project: Project, cfg: EnrichConfig, editor: ImageEditor, units, todo, batches, done,
              result: EnrichResult, progress: ProgressFn) -> None:
    """Steps 3-4 of ``enrich``: references, then the batches, each unit recorded before and after its edit."""
    catalog = project.catalog
    n_refs = min(cfg.references, getattr(editor, "max_references", cfg.references))
    if cfg.backend not in TAKES_REFERENCES:
        n_refs = 0
    sources = {r["id"]: r["sha256"] for r in catalog.query(KEPT_SOURCES)}  # left-out sources are no references
    images: dict[int, Image.Image] = {}

    def load(image_id: int) -> Image.Image:
        if image_id not in images:
            images[image_id] = project.store.open_image(sources[image_id])
        return images[image_id]

    # 4. Run in batches; each unit's operation row is written before the call and finished with its image.
    with catalog.operation(STAGE, kind="stage_run", model=editor.model_id, params={
        "backend": cfg.backend, "planned": result.planned, "todo": len(todo), "recipes": cfg.recipes,
        "seeds": cfg.seeds, "batch_size": cfg.batch_size, "references": n_refs,
    }) as run_id:
        running = {}

        def calls():  # each batch's 'running' rows and inputs, made just before it runs (here or on Ray)
            for batch in batches:
                missing = [u for u in batch if u.work_key not in done]
                refs = {u.work_key: [i for i in sources if i != u.source_id][:n_refs] for u in batch}
                running[batch[0].work_key] = ops = [
                    start_unit(project, u, editor, cfg, run_id, refs[u.work_key], len(batch)) for u in missing]
                requests = [EditRequest(image=load(u.source_id), prompt=u.recipe.full_prompt, seed=u.seed,
                                        references=[load(i) for i in refs[u.work_key]], recipe=u.recipe) for u in batch]
                yield (batch, missing, refs, ops), (requests,)

        def recorded(label: str) -> None:  # result counts every recorded edit (new, identical, done before)
            progress(result.already_done + len(result.made) + result.identical, result.planned, label)

        try:
            # Finished batches are stored one behind: the PNG / hashes of one while the editor makes the next.
            with Recorder(project, result, recorded) as recorder:
                for out in map_calls(editor, "edit", calls()):
                    (batch, missing, refs, ops), outputs, err = out.item, out.value, out.error
                    running.pop(batch[0].work_key)  # from here on its rows are finished here, or left for a re-run
                    t0 = time.perf_counter() - out.seconds
                    if err is None and len(outputs) != len(batch):
                        err = ModelOutputError(f"the editor returned {len(outputs)} images for {len(batch)} requests")
                    if isinstance(err, (ModelOutputError, UnitFailed)):  # this batch's inputs are unusable: go on
                        fail_units(project, ops, t0, err)
                        result.failed.extend((u.work_key, str(err).split("\n")[0]) for u in missing)
                        log.warning("enrich: %d edit(s) failed: %s", len(missing), str(err).split("\n")[0])
                    elif err is not None:
                        fail_units(project, ops, t0, err)
                        raise err
                    else:
                        by_key = {u.work_key: image for u, image in zip(batch, outputs)}
                        recorder.add(missing, ops, [by_key[u.work_key] for u in missing], refs,
                                     int(out.seconds * 1000 / len(batch)), f"edits ({batch[-1].recipe.id})")
        except BaseException as err:  # anything else stops the run; a re-run redoes the units not recorded
            for ops in running.values():
                fail_units(project, ops, time.perf_counter(), err)
            raise


def load_enrich_editor(cfg: EnrichConfig, models: ModelsConfig, pool=None, base: Path | None = None) -> ImageEditor:
    """The composite editor, or [models] editor for a generative backend (checked against the backend),
    loaded through ``pool`` when given (``flywheel.models.pool``), with [enrich]'s editor settings on top of
    the preset's (LoRA paths relative to ``base``, the project folder)."""
    if cfg.backend == "composite":
        from flywheel.models.composite import CompositeEditor

        return CompositeEditor()
    if pool is not None:
        return pool.editor(editor_spec(cfg, models), **editor_settings(cfg, base))
    from flywheel.models import load_editor

    return load_editor(editor_spec(cfg, models), models, **editor_settings(cfg, base))


def editor_spec(cfg: EnrichConfig, models: ModelsConfig) -> str:
    """[models] editor for a generative backend, or the backend's default when none was chosen."""
    from flywheel.models.presets import get_preset

    spec = models.editor
    preset = get_preset(spec, role="editor")
    if preset is not None and preset.family != BACKEND_FAMILY[cfg.backend]:
        # Chosen = set in flywheel.toml and not the default; an editor the [models] stack filled in was not chosen.
        if "editor" in models.model_fields_set and spec != ModelsConfig.model_fields["editor"].default:
            raise ConfigError(
                f"[enrich] backend = '{cfg.backend}', but [models] editor = '{spec}' is a {preset.family} model",
                hint=f"set [models] editor to a {cfg.backend} model (e.g. '{BACKEND_PRESET[cfg.backend]}'; "
                "`flywheel models list`), or change [enrich] backend",
            )
        spec = BACKEND_PRESET[cfg.backend]  # the default editor was never chosen: use the backend's default
    return spec
