"""``flywheel export``: a frozen dataset version as a folder other trainers read, with their configs.

Formats:
- ``kohya``: ``DEST/<repeats>_<trigger>/`` with ``NNNN.png`` + ``NNNN.txt`` (kohya sd-scripts' DreamBooth
  layout; point ai-toolkit or OneTrainer at the inner folder, they read the same image + .txt pairs);
- ``ai-toolkit``: the same pairs directly in ``DEST/``;
- ``imagefolder``: ``DEST/NNNN.png`` + ``metadata.jsonl`` (``file_name``, ``text``), which
  ``datasets.load_dataset("imagefolder", data_dir=DEST)`` loads with a caption column.
Images are the normalised PNGs from the store; a member without a caption gets the trigger word. Next to
image + .txt pairs go a ready ai-toolkit job and a kohya dataset config (``flywheel.export_configs``).
Options: ``freeze`` freezes a new version first (nothing else needs training for a CPU-built set);
``class_word`` turns the trigger into "trigger class" in captions and prompts; ``short_captions`` adds
``NNNN.short.txt`` (the caption's first sentence) beside each long caption.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.captions import variants
from flywheel.dataset import freeze_dataset, load_dataset, next_round
from flywheel.errors import StageError
from flywheel.export_configs import AI_TOOLKIT_FILE, KOHYA_FILE, SHORT_SUFFIX, write_ai_toolkit, write_kohya

log = logging.getLogger(__name__)

FORMATS = ("kohya", "ai-toolkit", "imagefolder")
_CLASS_WORD = re.compile(r"^[^\W_][\w' -]{0,62}$")  # "woman", "black cat", "robot-dog": words, no punctuation runs


@dataclass
class ExportResult:
    folder: Path
    images: int
    dataset_version: int
    frozen: bool = False  # this export froze the version
    configs: list[Path] = field(default_factory=list)  # the ai-toolkit YAML and kohya TOML written beside the data


def export_dataset(project, dest: Path, *, fmt: str = "kohya", version: int | None = None, repeats: int = 10,
                   overwrite: bool = False, freeze: bool = False, class_word: str | None = None,
                   short_captions: bool = False) -> ExportResult:
    """Write dataset ``version`` (default: the newest; with ``freeze``: a new one) to ``dest`` in format ``fmt``."""
    # 1. Plan: the format, the class word, a destination that is empty (or may be replaced), the version.
    if fmt not in FORMATS:
        raise StageError(f"unknown export format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    if freeze and version is not None:
        raise StageError("--freeze makes a new version; it cannot export an existing one too",
                         hint="drop --dataset to freeze and export, or drop --freeze to export that version")
    trigger = project.config.project.trigger
    phrase = trigger
    if class_word is not None:
        class_word = " ".join(class_word.split())
        if not _CLASS_WORD.match(class_word):
            raise StageError(f"class word {class_word!r} is not a word or two",
                             hint="pass what the character is, e.g. --class-word woman (letters, digits, spaces, -)")
        phrase = f"{trigger} {class_word}"
    dest = Path(dest).expanduser().resolve()
    if dest == project.root or dest in project.root.parents:
        raise StageError(f"{dest} holds the project itself", hint="export to a folder outside the project, e.g. ./export")
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise StageError(f"{dest} is not empty", hint="pick an empty folder, or pass --overwrite to replace it")
    ds = freeze_dataset(project, next_round(project)) if freeze else load_dataset(project, version)
    if dest.exists() and any(dest.iterdir()):
        shutil.rmtree(dest)
    folder = dest / f"{repeats}_{trigger}" if fmt == "kohya" else dest
    folder.mkdir(parents=True, exist_ok=True)

    # 2. Copy each member's image with its caption (and its short form when asked).
    metadata = []
    for n, m in enumerate(ds.members, start=1):
        name = f"{n:04d}.png"
        shutil.copyfile(m.path, folder / name)
        forms = variants(m.caption or trigger, trigger)
        long, short = (_with_class(forms[k], trigger, phrase) for k in ("long", "short"))
        if fmt == "imagefolder":
            row = {"file_name": name, "text": long, "flywheel_image_id": m.image_id, "kind": m.kind}
            metadata.append({**row, "text_short": short} if short_captions else row)
            continue
        (folder / f"{n:04d}.txt").write_text(long + "\n", encoding="utf-8")
        if short_captions:
            (folder / f"{n:04d}{SHORT_SUFFIX}").write_text(short + "\n", encoding="utf-8")
    if fmt == "imagefolder":
        with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
            for row in metadata:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    # 3. Trainer configs beside image + .txt pairs, pointing at the folder that holds them.
    configs = []
    if fmt != "imagefolder":
        common = {"trigger_phrase": phrase, "version": ds.version, "images": len(ds.members),
                  "short_captions": short_captions}
        configs = [write_ai_toolkit(dest / AI_TOOLKIT_FILE, project, folder, **common),
                   write_kohya(dest / KOHYA_FILE, project, folder, repeats=repeats, **common)]
    log.info("exported dataset v%d (%d images) as %s to %s", ds.version, len(ds.members), fmt, folder)
    return ExportResult(folder=folder, images=len(ds.members), dataset_version=ds.version, frozen=freeze,
                        configs=configs)


def _with_class(caption: str, trigger: str, phrase: str) -> str:
    """The first whole-word trigger becomes the phrase ("fw_hero, in a forest" -> "fw_hero woman, in a forest")."""
    if phrase == trigger:
        return caption
    return re.sub(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])", phrase, caption, count=1)
