"""``flywheel export``: a frozen dataset version as a folder other trainers read.

Formats:
- ``kohya``: ``DEST/<repeats>_<trigger>/`` with ``NNNN.png`` + ``NNNN.txt`` (kohya sd-scripts' DreamBooth
  layout; point ai-toolkit or OneTrainer at the inner folder, they read the same image + .txt pairs);
- ``ai-toolkit``: the same pairs directly in ``DEST/``;
- ``imagefolder``: ``DEST/NNNN.png`` + ``metadata.jsonl`` (``file_name``, ``text``), which
  ``datasets.load_dataset("imagefolder", data_dir=DEST)`` loads with a caption column.
Images are the normalised PNGs from the store; a member without a caption gets the trigger word.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from flywheel.dataset import load_dataset
from flywheel.errors import StageError

log = logging.getLogger(__name__)

FORMATS = ("kohya", "ai-toolkit", "imagefolder")


@dataclass
class ExportResult:
    folder: Path
    images: int
    dataset_version: int


def export_dataset(project, dest: Path, *, fmt: str = "kohya", version: int | None = None, repeats: int = 10,
                   overwrite: bool = False) -> ExportResult:
    """Write dataset ``version`` (default: the newest) to ``dest`` in format ``fmt``."""
    # 1. Plan: the version, the format, a destination that is empty (or may be replaced).
    if fmt not in FORMATS:
        raise StageError(f"unknown export format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    ds = load_dataset(project, version)
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and any(dest.iterdir()):
        if not overwrite:
            raise StageError(f"{dest} is not empty", hint="pick an empty folder, or pass --overwrite to replace it")
        shutil.rmtree(dest)
    trigger = project.config.project.trigger
    folder = dest / f"{repeats}_{trigger}" if fmt == "kohya" else dest
    folder.mkdir(parents=True, exist_ok=True)
    # 2. Copy each member's image with its caption.
    metadata = []
    for n, m in enumerate(ds.members, start=1):
        name = f"{n:04d}.png"
        shutil.copyfile(m.path, folder / name)
        caption = m.caption or trigger
        if fmt == "imagefolder":
            metadata.append({"file_name": name, "text": caption, "flywheel_image_id": m.image_id, "kind": m.kind})
        else:
            (folder / f"{n:04d}.txt").write_text(caption + "\n", encoding="utf-8")
    if fmt == "imagefolder":
        with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
            for row in metadata:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    log.info("exported dataset v%d (%d images) as %s to %s", ds.version, len(ds.members), fmt, folder)
    return ExportResult(folder=folder, images=len(ds.members), dataset_version=ds.version)
