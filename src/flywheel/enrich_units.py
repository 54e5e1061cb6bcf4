"""The catalog rows of one ``flywheel enrich`` unit: which keys are done, the operation row started before the
edit, and the image, its lineage and the operation's 'ok' written in one transaction after it (or 'failed').

``Recorder`` records finished edits one batch behind, so the editor is never idle while an edit is stored:
the PNG encoding, file write and hashes of batch N (pure CPU, ~0.1-0.3 s at 1024²) run on a worker thread
while the editor makes batch N+1; the catalog rows are written on the stage's own thread (SQLite connections
belong to the thread that opened them), in the order the edits finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from flywheel.config import EnrichConfig
from flywheel.enrich_routes import record_edit_mask
from flywheel.images import phash, phash_hex, pixel_sha256
from flywheel.models.base import ImageEditor
from flywheel.project import Project
from flywheel.signals.segmentation import record_mask_report

if TYPE_CHECKING:
    from flywheel.enrich import EditUnit, EnrichResult

STAGE = "enrich"
log = logging.getLogger(__name__)


def done_keys(project: Project, keys: list[str]) -> set[str]:
    done: set[str] = set()
    for i in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
        chunk = keys[i:i + 500]
        rows = project.catalog.query(
            f"SELECT o.work_key FROM operations o WHERE o.work_key IN ({','.join('?' * len(chunk))}) AND "
            "(o.status = 'skipped' OR (o.status = 'ok' AND EXISTS (SELECT 1 FROM images i WHERE i.operation_id = o.id)))",
            tuple(chunk),
        )
        done.update(r[0] for r in rows)
    return done


def start_unit(project: Project, unit: EditUnit, editor: ImageEditor, cfg: EnrichConfig, run_id: int,
                refs: list[int], batch_size: int) -> int:
    """The unit's operation row, status 'running' (new, or the one a failed or killed attempt left)."""
    params: dict[str, Any] = {
        "prompt": unit.recipe.full_prompt, "recipe": unit.recipe.id, "axis": unit.recipe.axis,
        "backend": cfg.backend, "source_image_id": unit.source_id, "reference_image_ids": refs,
        "batch_size": batch_size, "editor": editor.params(),
    }
    if unit.recipe.caption_for(cfg.backend):  # read by template captions (flywheel.caption)
        params["caption"] = unit.recipe.caption_for(cfg.backend)  # the composite editor's own, if it has one
    route = getattr(cfg.routes, unit.recipe.axis)
    if route is not None:  # this axis has its own backend
        params["route"] = f"[enrich.routes] {unit.recipe.axis} = {route}"
    recipe_prompt = getattr(editor, "recipe_prompt", None)  # text-to-image editors: the scene, not an instruction
    if callable(recipe_prompt):
        params["pipeline_prompt"] = recipe_prompt(unit.recipe)
    final_prompt = getattr(editor, "pipeline_prompt", None)  # e.g. Qwen's "Picture 1" wording with references
    if callable(final_prompt) and final_prompt(unit.recipe.full_prompt, len(refs)) != unit.recipe.full_prompt:
        params["pipeline_prompt"] = final_prompt(unit.recipe.full_prompt, len(refs))
    if cfg.backend == "composite":  # the composite editor follows the spec, not the prompt: record it
        params["composite"] = unit.recipe.composite.model_dump(mode="json")
    # A killed or failed earlier attempt's row is taken over by the catalog: nothing is duplicated.
    return project.catalog.start_operation(STAGE, model=editor.model_id, params=params, seed=unit.seed,
                                           parent_id=run_id, work_key=unit.work_key)


def fail_units(project: Project, ops: list[int], t0: float, err: BaseException) -> None:
    ms = int((time.perf_counter() - t0) * 1000)
    for op_id in ops:
        project.catalog.finish_operation(op_id, "failed", ms, f"{type(err).__name__}: {err}")


@dataclass(frozen=True)
class Stored:
    """An edit's image, written to the content store, and its hashes (no catalog row yet)."""

    image: Image.Image
    sha256: str
    pixel_sha256: str
    phash: str


def store_output(project: Project, out: Image.Image) -> Stored:
    """The CPU part of recording an edit: RGB, PNG file in the store, hashes. Touches no catalog row, so it
    can run on any thread."""
    image = out.convert("RGB")
    sha, _ = project.store.put_image(image)  # file first: an orphan file is harmless, a dangling row is not
    return Stored(image, sha, pixel_sha256(image), phash_hex(phash(image)))


def record_unit(project: Project, unit: EditUnit, op_id: int, out: Image.Image, refs: list[int], ms: int,
                result: EnrichResult, stored: Stored | None = None) -> None:
    """The unit's image row, lineage and 'ok' in one transaction (``stored``: ``store_output(out)`` done already)."""
    stored = stored or store_output(project, out)
    image, sha = stored.image, stored.sha256
    catalog = project.catalog
    with catalog.transaction():
        same = catalog.query("SELECT id FROM images WHERE sha256 = ?", (sha,))
        if same:
            catalog.finish_operation(op_id, "skipped", ms, f"output identical to image {same[0]['id']}",
                                     output_image_id=same[0]["id"])
            result.identical += 1
            return
        image_id = catalog.insert("images", {
            "sha256": sha, "pixel_sha256": stored.pixel_sha256, "phash": stored.phash,
            "width": image.width, "height": image.height, "kind": "enriched", "round": 0, "operation_id": op_id,
        })
        catalog.insert("image_parents", {"image_id": image_id, "parent_id": unit.source_id, "role": "source"})
        for ref in refs:
            catalog.insert("image_parents", {"image_id": image_id, "parent_id": ref, "role": "reference"})
        if record_mask_report(catalog, image_id, out, op_id) is False:  # the composite / inpainting person mask
            result.mask_failed.append(image_id)
        record_edit_mask(project, image_id, out, op_id)  # the inpainting editors' mask, with the image's lineage
        catalog.finish_operation(op_id, "ok", ms, output_image_id=image_id)
    result.made.append(image_id)


@dataclass
class _Finished:
    units: list[EditUnit]
    ops: list[int]
    outputs: list[Image.Image]
    refs: dict[str, list[int]]
    ms: int
    stored: list[Future]
    label: str


class Recorder:
    """Records finished batches one behind the editor (see the module docstring). ``on_recorded(label)`` is
    called on the stage's thread after each batch's rows are written. Use as a context manager: leaving it
    records the last batch (also when the stage stops on an error: a finished edit is never thrown away)."""

    def __init__(self, project: Project, result: EnrichResult, on_recorded: Callable[[str], None]):
        self.project, self.result, self.on_recorded = project, result, on_recorded
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="enrich-store")
        self._pending: _Finished | None = None

    def add(self, units: list[EditUnit], ops: list[int], outputs: list[Image.Image], refs: dict[str, list[int]],
            ms: int, label: str) -> None:
        """Start storing a finished batch, then write the previous one's rows (its files are ready by now)."""
        stored = [self._pool.submit(store_output, self.project, out) for out in outputs]
        previous, self._pending = self._pending, _Finished(units, ops, outputs, refs, ms, stored, label)
        if previous is not None:
            self._record(previous)

    def flush(self) -> None:
        previous, self._pending = self._pending, None
        if previous is not None:
            self._record(previous)

    def _record(self, batch: _Finished) -> None:
        for i, (unit, op_id, out, future) in enumerate(zip(batch.units, batch.ops, batch.outputs, batch.stored)):
            try:
                stored = future.result()
            except BaseException as err:  # e.g. a full disk: this unit and the batch's rest stay redoable
                fail_units(self.project, batch.ops[i:], time.perf_counter(), err)
                raise
            record_unit(self.project, unit, op_id, out, batch.refs[unit.work_key], batch.ms, self.result, stored)
        self.on_recorded(batch.label)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.flush()
            else:  # the stage is stopping: keep the finished batch, but never hide the stage's own error
                try:
                    self.flush()
                except Exception:  # its rows stay 'running' or 'failed': a re-run redoes them
                    log.exception("enrich: could not record the last finished edits (a re-run redoes them)")
        finally:
            self._pool.shutdown(wait=True)
