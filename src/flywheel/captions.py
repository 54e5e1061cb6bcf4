"""Captions a human owns: typed in the review page or with ``flywheel caption --set``, or imported from
``.txt`` sidecar files at ingest (the kohya / ai-toolkit convention: ``hero.png`` + ``hero.txt``).

- ``clean_text`` makes one clean line: control, invisible and bidi-override characters are removed, line
  breaks become spaces, runs of whitespace collapse; the trigger word is put at the start when missing.
  An empty result is refused.
- ``set_caption`` appends the cleaned text as a new ``human`` caption row (with an operation row saying
  who wrote it and how). Nothing is overwritten: earlier machine and human captions stay as history, the
  newest row is the one a dataset uses, and ``flywheel caption`` never replaces a human caption.
- ``import_sidecar`` is ingest's call: a sidecar becomes the image's human caption, or a one-line note
  says why it was ignored (ingest never fails over a caption file).
- ``variants`` gives the short (first sentence) and long (full) forms of a caption, for export.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.caption import has_trigger
from flywheel.errors import CaptionError
from flywheel.project import Project

log = logging.getLogger(__name__)

MAX_CHARS = 2000  # well past what FLUX's T5 encoder reads (512 tokens); longer is a pasted file, not a caption
MAX_SIDECAR_BYTES = 64 * 1024
SIDECAR_SUFFIXES = (".txt", ".TXT")
# Unicode categories with no place in a caption: controls (NUL, C0, C1), format characters (zero-width
# spaces and joiners, bidi embeddings/overrides/isolates, BOM, soft hyphen, tag characters), surrogates,
# private use and unassigned code points. Whitespace among them is turned into a space first.
_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
_DROP_CHARS = frozenset({"\ufffd"})  # the replacement character: the remains of a decoding error
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


@dataclass
class Cleaned:
    text: str
    notes: list[str] = field(default_factory=list)  # what cleaning changed, for the user


@dataclass
class CaptionEdit:
    image_id: int
    text: str
    caption_id: int  # the new row (or the current one when nothing changed)
    previous: str | None  # the caption before this edit
    changed: bool  # False: the image's newest caption was already this human caption; nothing written
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "caption": self.text, "caption_id": self.caption_id,
                "previous": self.previous, "changed": self.changed, "notes": self.notes}


def clean_text(raw: str, trigger: str) -> Cleaned:
    """One clean line with the trigger word in it. Raises CaptionError when nothing usable is left."""
    if not isinstance(raw, str):
        raise CaptionError(f"a caption must be text, got {type(raw).__name__}")
    text = unicodedata.normalize("NFC", raw)
    kept, dropped, broke_lines = [], 0, False
    for ch in text:
        if ch.isspace():
            broke_lines = broke_lines or ch in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
            kept.append(" ")
        elif unicodedata.category(ch) in _DROP_CATEGORIES or ch in _DROP_CHARS:
            dropped += 1
        else:
            kept.append(ch)
    text = " ".join("".join(kept).split())
    notes = []
    if broke_lines:
        notes.append("joined the lines into one")
    if dropped:
        notes.append(f"removed {dropped} control or invisible character(s)")
    if not text:
        raise CaptionError("the caption is empty after cleaning",
                           hint="write a few words about what varies in the picture (setting, light, pose, style)")
    if len(text) > MAX_CHARS:
        raise CaptionError(f"the caption is {len(text)} characters long (at most {MAX_CHARS})",
                           hint="a training caption is a line or two; the text encoder reads no further")
    if not has_trigger(text, trigger):
        text = f"{trigger}, {text}"
        notes.append(f"added the trigger word {trigger!r} at the start")
    return Cleaned(text, notes)


def set_caption(project: Project, image_id: int | str, text: str, *, author: str | None = None,
                via: str = "api", operation_id: int | None = None) -> CaptionEdit:
    """Append ``text`` (cleaned) as the human caption of ``image_id``. Returns what was written.

    ``via`` says where the edit came from (review / cli / sidecar / api). ``operation_id`` attaches the
    row to a running stage (ingest); without one an operation row records the author and the cleaning.
    """
    from flywheel.review import parse_image_id

    # 1. The image must exist; the text must survive cleaning.
    number = parse_image_id(image_id, error=CaptionError)
    if not project.catalog.query("SELECT 1 FROM images WHERE id = ?", (number,)):
        raise CaptionError(f"no image with id {number} in the catalog",
                           hint="`flywheel status` counts the images; the review page shows each id")
    cleaned = clean_text(text, project.config.project.trigger)
    # 2. Re-saving the current human caption is not an edit: history stays free of no-op rows.
    current = project.catalog.query(
        "SELECT id, text, source FROM captions WHERE image_id = ? ORDER BY id DESC LIMIT 1", (number,))
    previous = current[0]["text"] if current else None
    if current and current[0]["source"] == "human" and previous == cleaned.text:
        return CaptionEdit(number, cleaned.text, current[0]["id"], previous, False, cleaned.notes)
    # 3. Append (never update): the operation row says who wrote it and how it was cleaned.
    with project.catalog.transaction():
        op_id = operation_id
        if op_id is None:
            op_id = project.catalog.insert("operations", {
                "stage": "caption", "kind": "stage_run", "model": None, "status": "ok", "duration_ms": 0,
                "params_json": _json({"source": "human", "via": via, "author": author, "image_id": number,
                                      "notes": cleaned.notes})})
        caption_id = project.catalog.insert("captions", {"image_id": number, "text": cleaned.text,
                                                         "source": "human", "operation_id": op_id})
    log.info("caption: image %d captioned by %s via %s%s", number, author or "a human", via,
             f" ({'; '.join(cleaned.notes)})" if cleaned.notes else "")
    return CaptionEdit(number, cleaned.text, caption_id, previous, True, cleaned.notes)


def history(project: Project, image_id: int | str) -> list[dict[str, Any]]:
    """Every caption of an image, oldest first, with who wrote the human ones."""
    from flywheel.review import parse_image_id

    number = parse_image_id(image_id, error=CaptionError)
    rows = project.catalog.query(
        """SELECT c.id, c.text, c.source, c.created_at,
                  CASE WHEN c.source = 'human' THEN json_extract(o.params_json, '$.author') END AS author,
                  CASE WHEN c.source = 'human' THEN COALESCE(json_extract(o.params_json, '$.via'),
                       CASE o.stage WHEN 'ingest' THEN 'sidecar' END) END AS via
           FROM captions c LEFT JOIN operations o ON o.id = c.operation_id
           WHERE c.image_id = ? ORDER BY c.id""", (number,))
    return [dict(r) for r in rows]


def sidecar_of(image_path: Path) -> Path | None:
    """The caption file next to an image (``hero.png`` -> ``hero.txt``), when there is a regular file."""
    for suffix in SIDECAR_SUFFIXES:
        candidate = image_path.with_suffix(suffix)
        if candidate != image_path and candidate.is_file():  # is_file(): never a FIFO or a device
            return candidate
    return None


def is_sidecar(path: Path, images: list[Path]) -> bool:
    """Whether ``path`` is the caption file of one of ``images`` (so ingest does not call it 'skipped')."""
    if path.suffix not in SIDECAR_SUFFIXES:
        return False
    stems = {p.with_suffix("") for p in images}
    return path.with_suffix("") in stems


def read_sidecar(path: Path) -> str:
    """The text of a caption file (UTF-8, BOM allowed). Raises CaptionError with a one-line reason."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIDECAR_BYTES + 1)
    except OSError as err:
        raise CaptionError(f"cannot read it ({err.strerror})") from None
    if len(data) > MAX_SIDECAR_BYTES:
        raise CaptionError(f"larger than {MAX_SIDECAR_BYTES // 1024} KiB: not a caption")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CaptionError("not UTF-8 text", hint="save the caption file as UTF-8") from None


def import_sidecar(project: Project, image_id: int, image_path: Path, operation_id: int | None) -> str | None:
    """Ingest's step: the image's sidecar becomes its human caption. Returns a note for the ingest report
    (None when there is no sidecar). Never raises for a bad caption file: the image is ingested anyway."""
    from flywheel.ingest import one_line  # file names are shown escaped: a newline must not break the report

    path = sidecar_of(image_path)
    if path is None:
        return None
    try:
        edit = set_caption(project, image_id, read_sidecar(path), via="sidecar", operation_id=operation_id)
    except CaptionError as err:
        log.info("ingest: caption file %s ignored: %s", one_line(str(path)), err.args[0])
        return f"caption file {one_line(path.name)} ignored: {err.args[0]}"
    extra = f" ({'; '.join(edit.notes)})" if edit.notes else ""
    return f"caption from {one_line(path.name)}{extra}"


def variants(text: str, trigger: str | None = None) -> dict[str, str]:
    """``{"short": first sentence, "long": the whole caption}``, both one line, both with the trigger word.

    Exporters write the short form where a trainer wants brief captions (or alternates the two).
    """
    long = " ".join(text.split())
    short = _SENTENCE_END.split(long, maxsplit=1)[0]
    if trigger and not has_trigger(short, trigger):
        short = f"{trigger}, {short}"
    return {"short": short, "long": long}


def _json(value: dict[str, Any]) -> str:
    import json

    return json.dumps(value, sort_keys=True, ensure_ascii=False)
