"""Stage 1: ingest source images safely into the catalog.

``ingest(project, paths)`` reads files, folders and globs; decodes each file under a pixel limit
(``flywheel.images.decode_image``); drops exact and near duplicates; detects faces when the ``face``
extra is installed; and stores the user's original bytes plus a normalised RGB PNG. Every file ends in
exactly one of added / skipped / rejected with a one-line reason; FIFOs, devices, sockets and symlink
loops are reported as skipped and never opened. The user's folder is only ever read. Re-running with the
same paths adds nothing, and so does a second ingest of the same files running at the same moment: the
duplicate checks are repeated under the catalog's write lock before a row is written.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from flywheel import captions
from flywheel.catalog.store import sha256_bytes
from flywheel.errors import ImageRejected, StageError, StorageError
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

    by_original: dict[str, tuple[int, str, str]] = field(default_factory=dict)  # original sha -> (id, name, path)
    by_pixels: dict[str, tuple[int, str]] = field(default_factory=dict)  # pixel sha -> (id, name)
    hashes: list[tuple[int, int, str]] = field(default_factory=list)  # (phash, id, name)
    last_id: int = 0  # rows up to this id are loaded; a refresh reads only newer ones


def not_regular(path: Path) -> str | None:
    """What ``path`` is when it is neither a regular file nor a folder ('fifo', 'symlink loop', ...), else None.
    Such files are never opened: reading a FIFO blocks forever, and a device can stream without end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop"
        return "broken symlink" if path.is_symlink() else None  # vanished or unreadable: the read says so
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, name in ((stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def one_line(text: str) -> str:
    """``text`` with control and format characters escaped (``\\n``, ``\\x1b``, ``\\u202e``), so a file name
    can neither break a one-line report nor reorder or recolour the terminal."""
    if not any(unicodedata.category(ch) in ("Cc", "Cf") for ch in text):
        return text
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch) in ("Cc", "Cf") else ch
                   for ch in text)


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
                for f in sorted(m.rglob("*")):
                    if any(part.startswith(".") for part in f.relative_to(m).parts):
                        continue  # hidden files and folders (.DS_Store, .git)
                    if f.is_dir():
                        if f.is_symlink():  # never followed: it may lead back up (a loop) or out of the folder
                            skipped.append(IngestItem(str(f), "symlink to a folder (not followed)"))
                        continue
                    special = not_regular(f)
                    if special:
                        skipped.append(IngestItem(str(f), f"not a regular file ({special})"))
                    elif f.suffix.lower() in IMAGE_EXTENSIONS:
                        files.append(f)
                    else:
                        skipped.append(IngestItem(str(f), f"not an image file extension ({f.suffix or 'none'})"))
            elif special := not_regular(m):
                skipped.append(IngestItem(str(m), f"not a regular file ({special})"))
            elif m.is_file():
                files.append(m)
            else:
                raise StageError(f"not found: {one_line(str(m))}", hint="pass existing files, folders or a quoted glob")
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    # A special file named twice (in its folder, and alone) is reported once.
    return unique, list({item.path: item for item in skipped}.values())


def _refresh(project: Project, known: _Known) -> bool:
    """Load the sources added since ``known`` was last read (all of them the first time). True if any."""
    rows = project.catalog.query(
        "SELECT id, original_sha256, original_name, original_path, pixel_sha256, phash FROM images "
        "WHERE kind = 'source' AND id > ? ORDER BY id", (known.last_id,))
    for r in rows:
        known.by_original[r["original_sha256"]] = (r["id"], r["original_name"], r["original_path"])
        known.by_pixels[r["pixel_sha256"]] = (r["id"], r["original_name"])
        known.hashes.append((int(r["phash"], 16), r["id"], r["original_name"]))
        known.last_id = r["id"]
    return bool(rows)


def _same_bytes(known: _Known, path: Path, original_sha: str) -> tuple[str, IngestItem] | None:
    """('skipped', this very file again) or ('rejected', the same bytes under another name), or None."""
    if original_sha not in known.by_original:
        return None
    _, name, where = known.by_original[original_sha]
    if where == str(path.resolve()):
        return "skipped", IngestItem(str(path), "already in the catalog")
    return "rejected", IngestItem(str(path), f"exact duplicate of {name} (same bytes)")


def _same_picture(known: _Known, path: Path, pixels: str, ph: int, max_distance: int) -> tuple[str, IngestItem] | None:
    """('rejected', the same pixels or a near-duplicate by perceptual hash of a source), or None."""
    if pixels in known.by_pixels:
        return "rejected", IngestItem(str(path), f"exact duplicate of {known.by_pixels[pixels][1]} (same pixels)")
    near = min(((hamming(ph, h), name) for h, _, name in known.hashes), default=None)
    if near is not None and near[0] <= max_distance:
        return "rejected", IngestItem(
            str(path), f"near-duplicate of {near[1]} (perceptual hash distance {near[0]} <= {max_distance})")
    return None


def ingest(project: Project, paths: list[str], *, progress: ProgressFn | None = None) -> IngestResult:
    """Ingest source images. Returns what was added, skipped and rejected (with reasons)."""
    progress = progress or no_progress
    cfg = project.config.ingest
    result = IngestResult()

    # 1. Expand the arguments into files; nothing in the user's folders is written or moved.
    files, skipped = expand_paths(paths)
    result.skipped.extend(s for s in skipped if not captions.is_sidecar(Path(s.path), files))  # read in step 8
    detect = cfg.detect_faces and faces.available()
    if cfg.detect_faces and not detect:
        result.notes.append("face detection skipped: install the 'face' extra (dlib) to store face boxes")

    with project.catalog.operation("ingest", kind="stage_run", model=faces.DETECTOR if detect else None,
                                   params={"paths": list(paths), "config": cfg.model_dump()}) as op_id:
        # 2. Know what is already in the catalog so a re-run is a no-op.
        known = _Known()
        _refresh(project, known)
        for i, path in enumerate(files):
            progress(i, len(files), path.name)
            # 3. Read once; identical bytes already ingested are skipped without decoding.
            try:
                data = path.read_bytes()
            except OSError as err:
                result.rejected.append(IngestItem(str(path), f"cannot read the file ({err.strerror})"))
                continue
            original_sha = sha256_bytes(data)
            if dup := _same_bytes(known, path, original_sha):
                getattr(result, dup[0]).append(dup[1])
                continue
            # 4. Decode safely (pixel limit, orientation, mode, animation, size floor).
            try:
                decoded = decode_image(data, max_pixels=cfg.max_pixels, min_side=cfg.min_side,
                                       animated=cfg.animated, alpha_background=tuple(cfg.alpha_background))
            except ImageRejected as err:
                result.rejected.append(IngestItem(str(path), err.args[0]))
                continue
            # 5. Duplicates by pixels (same picture, other file) and by perceptual hash (near).
            pixels, ph = pixel_sha256(decoded.image), phash(decoded.image)
            if dup := _same_picture(known, path, pixels, ph, cfg.near_duplicate_distance):
                getattr(result, dup[0]).append(dup[1])
                continue
            # 6. Faces (boxes only; the judge adds identity embeddings when it needs them).
            boxes = faces.detect_faces(decoded.image) if detect else []
            # 7. Store original bytes + normalised PNG, then the catalog rows, in one transaction. Under its
            #    write lock, look again: another ingest of the same files may have added this one meanwhile.
            try:
                project.store.put_original(data, path.suffix)
                sha, _ = project.store.put_image(decoded.image)
                with project.catalog.transaction():
                    if _refresh(project, known) and (dup := _same_bytes(known, path, original_sha) or _same_picture(
                            known, path, pixels, ph, cfg.near_duplicate_distance)):
                        getattr(result, dup[0]).append(dup[1])
                        continue
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
            except StorageError as err:  # disk full / read-only: say where ingest stopped and what it kept
                raise StorageError(f"{err.args[0]} (ingest stopped at {one_line(path.name)}; the "
                                   f"{len(result.added)} file(s) added before it are kept)", hint=err.hint) from err
            _refresh(project, known)
            face_note = f"{len(boxes)} face(s)" if detect else ""
            # 8. A caption file beside the image (hero.png + hero.txt) becomes its human caption.
            caption_note = captions.import_sidecar(project, image_id, path, op_id)
            reason = "; ".join(x for x in [*decoded.notes, face_note, caption_note] if x)
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
