"""Stage 1: ingest source images safely into the catalog.

``ingest(project, paths)`` reads files, folders and globs; decodes each file under a pixel limit
(``flywheel.images.decode_image``); drops exact and near duplicates; detects faces when the ``face``
extra is installed; and stores the user's original bytes plus a normalised RGB PNG. Every file ends in
exactly one of added / skipped / rejected with a one-line reason. The user's folder is only ever read.
Re-running with the same paths adds nothing.
"""

from __future__ import annotations

import glob
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.catalog.store import sha256_bytes
from flywheel.errors import ImageRejected, StageError
from flywheel.images import IMAGE_EXTENSIONS, decode_image, hamming, phash, phash_hex, pixel_sha256
from flywheel.progress import ProgressFn, no_progress
from flywheel.project import Project
from flywheel.signals import faces

log = logging.getLogger(__name__)


@dataclass
class IngestItem:
    path: str
    reason: str = ""
    image_id: int | None = None


@dataclass
class IngestResult:
    added: list[IngestItem] = field(default_factory=list)
    skipped: list[IngestItem] = field(default_factory=list)
    rejected: list[IngestItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Known:
    """What the catalog already holds, to recognise duplicates without decoding twice."""

    by_original: dict[str, tuple[int, str, str]]  # original sha -> (id, name, path)
    by_pixels: dict[str, tuple[int, str]]  # pixel sha -> (id, name)
    hashes: list[tuple[int, int, str]]  # (phash, id, name)


def expand_paths(paths: list[str]) -> tuple[list[Path], list[IngestItem]]:
    """Files, folders (recursive, image extensions only) and globs -> sorted unique files."""
    files: list[Path] = []
    skipped: list[IngestItem] = []
    for raw in paths:
        matches = [Path(m) for m in sorted(glob.glob(raw, recursive=True))] if glob.has_magic(raw) else [Path(raw)]
        if not matches:
            raise StageError(f"no file matches {raw!r}", hint="check the pattern; quote globs so the shell keeps them")
        for m in matches:
            if m.is_dir():
                for f in sorted(p for p in m.rglob("*") if p.is_file()):
                    if any(part.startswith(".") for part in f.relative_to(m).parts):
                        continue  # hidden files and folders (.DS_Store, .git)
                    if f.suffix.lower() in IMAGE_EXTENSIONS:
                        files.append(f)
                    else:
                        skipped.append(IngestItem(str(f), f"not an image file extension ({f.suffix or 'none'})"))
            elif m.is_file():
                files.append(m)
            else:
                raise StageError(f"not found: {m}", hint="pass existing files, folders or a quoted glob")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique, skipped


def _known(project: Project) -> _Known:
    rows = project.catalog.query(
        "SELECT id, original_sha256, original_name, original_path, pixel_sha256, phash FROM images WHERE kind = 'source'"
    )
    return _Known(
        by_original={r["original_sha256"]: (r["id"], r["original_name"], r["original_path"]) for r in rows},
        by_pixels={r["pixel_sha256"]: (r["id"], r["original_name"]) for r in rows},
        hashes=[(int(r["phash"], 16), r["id"], r["original_name"]) for r in rows],
    )


def ingest(project: Project, paths: list[str], *, progress: ProgressFn | None = None) -> IngestResult:
    """Ingest source images. Returns what was added, skipped and rejected (with reasons)."""
    progress = progress or no_progress
    cfg = project.config.ingest
    result = IngestResult()

    # 1. Expand the arguments into files; nothing in the user's folders is written or moved.
    files, skipped = expand_paths(paths)
    result.skipped.extend(skipped)
    detect = cfg.detect_faces and faces.available()
    if cfg.detect_faces and not detect:
        result.notes.append("face detection skipped: install the 'face' extra (dlib) to store face boxes")

    with project.catalog.operation("ingest", kind="stage_run", model=faces.DETECTOR if detect else None,
                                   params={"paths": list(paths), "config": cfg.model_dump()}) as op_id:
        # 2. Know what is already in the catalog so a re-run is a no-op.
        known = _known(project)
        for i, path in enumerate(files):
            progress(i, len(files), path.name)
            # 3. Read once; identical bytes already ingested are skipped without decoding.
            try:
                data = path.read_bytes()
            except OSError as err:
                result.rejected.append(IngestItem(str(path), f"cannot read the file ({err.strerror})"))
                continue
            original_sha = sha256_bytes(data)
            if original_sha in known.by_original:
                _, name, where = known.by_original[original_sha]
                if where == str(path.resolve()):
                    result.skipped.append(IngestItem(str(path), "already in the catalog"))
                else:
                    result.rejected.append(IngestItem(str(path), f"exact duplicate of {name} (same bytes)"))
                continue
            # 4. Decode safely (pixel limit, orientation, mode, animation, size floor).
            try:
                decoded = decode_image(data, max_pixels=cfg.max_pixels, min_side=cfg.min_side,
                                       animated=cfg.animated, alpha_background=tuple(cfg.alpha_background))
            except ImageRejected as err:
                result.rejected.append(IngestItem(str(path), err.args[0]))
                continue
            # 5. Duplicates by pixels (same picture, other file) and by perceptual hash (near).
            pixels = pixel_sha256(decoded.image)
            if pixels in known.by_pixels:
                result.rejected.append(IngestItem(str(path), f"exact duplicate of {known.by_pixels[pixels][1]} (same pixels)"))
                continue
            ph = phash(decoded.image)
            near = min(((hamming(ph, h), name) for h, _, name in known.hashes), default=None)
            if near is not None and near[0] <= cfg.near_duplicate_distance:
                result.rejected.append(
                    IngestItem(str(path), f"near-duplicate of {near[1]} (perceptual hash distance {near[0]} <= {cfg.near_duplicate_distance})")
                )
                continue
            # 6. Faces (boxes only; the judge adds identity embeddings when it needs them).
            boxes = faces.detect_faces(decoded.image) if detect else []
            # 7. Store original bytes + normalised PNG, then the catalog rows, in one transaction.
            project.store.put_original(data, path.suffix)
            sha, _ = project.store.put_image(decoded.image)
            with project.catalog.transaction():
                image_id = project.catalog.insert("images", {
                    "sha256": sha, "pixel_sha256": pixels, "phash": phash_hex(ph),
                    "width": decoded.image.width, "height": decoded.image.height, "kind": "source", "round": 0,
                    "original_name": path.name, "original_path": str(path.resolve()),
                    "original_sha256": original_sha, "notes": "; ".join(decoded.notes) or None,
                })
                for b in boxes:
                    project.catalog.insert("faces", {
                        "image_id": image_id, "detector": faces.DETECTOR, "left_px": b.left, "top_px": b.top,
                        "right_px": b.right, "bottom_px": b.bottom, "score": b.score, "operation_id": op_id,
                    })
            known.by_original[original_sha] = (image_id, path.name, str(path.resolve()))
            known.by_pixels[pixels] = (image_id, path.name)
            known.hashes.append((ph, image_id, path.name))
            face_note = f"{len(boxes)} face(s)" if detect else ""
            reason = "; ".join(x for x in [*decoded.notes, face_note] if x)
            result.added.append(IngestItem(str(path), reason, image_id))
        progress(len(files), len(files), "done")
        _record_outcome(project, op_id, result)
    log.info("ingest: %d added, %d skipped, %d rejected", len(result.added), len(result.skipped), len(result.rejected))
    return result


def _record_outcome(project: Project, op_id: int, result: IngestResult) -> None:
    """Keep the per-file outcome with the stage run, so a rejection is auditable later."""
    row = project.catalog.query("SELECT params_json FROM operations WHERE id = ?", (op_id,))[0]
    params = json.loads(row["params_json"])
    params["outcome"] = {
        "added": [i.path for i in result.added],
        "skipped": [[i.path, i.reason] for i in result.skipped],
        "rejected": [[i.path, i.reason] for i in result.rejected],
    }
    with project.catalog.transaction():
        project.catalog.execute("UPDATE operations SET params_json = ? WHERE id = ?", (json.dumps(params), op_id))
