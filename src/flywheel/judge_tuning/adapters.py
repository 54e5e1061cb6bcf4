"""Judge adapters: where they live, which one is active, and putting one on a loaded judge VLM.

Every ``tune-judge`` attempt is a row in ``judge_adapters`` and a folder
``.flywheel/judge_adapters/<id>/`` holding ``adapter/`` (peft: ``adapter_config.json`` +
``adapter_model.safetensors`` + ``adapter_meta.json``) and its checkpoints. The active adapter of a
base model is its newest promoted row: the newest attempt that beat the judge before it on held-out
human decisions. ``flywheel judge`` uses it unless told otherwise (``--judge-adapter PATH|active|none``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flywheel.errors import ConfigError, ModelLoadError
from flywheel.project import Project

log = logging.getLogger(__name__)

FOLDER = "judge_adapters"
META = "adapter_meta.json"


@dataclass(frozen=True)
class AdapterRef:
    path: Path  # the peft folder
    adapter_id: str  # e.g. "judge-lora-3-1a2b3c4d": recorded in scorer names and operation params
    meta: dict[str, Any]


def adapter_id(attempt_id: int, data_hash: str) -> str:
    return f"judge-lora-{attempt_id}-{data_hash[:8]}"


def active_row(project: Project, base_model: str):
    rows = project.catalog.query(
        "SELECT * FROM judge_adapters WHERE base_model = ? AND promoted = 1 AND status = 'ok' ORDER BY id DESC LIMIT 1",
        (base_model,))
    return rows[0] if rows else None


def read_meta(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{folder} is not a judge adapter folder (no {META})",
                             hint="pass a folder written by `flywheel tune-judge` "
                                  "(.flywheel/judge_adapters/<id>/adapter)") from None


def resolve(project: Project, spec: str, base_model: str) -> AdapterRef | None:
    """``"none"`` -> None; ``"active"`` -> the active adapter of ``base_model`` (or None); else a folder."""
    if spec == "none":
        return None
    if spec == "active":
        row = active_row(project, base_model)
        if row is None:
            return None
        folder = project.workspace / row["path"]
        return AdapterRef(folder, adapter_id(row["id"], row["data_hash"]), read_meta(folder))
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"judge adapter folder not found: {folder}",
                          hint="use 'active', 'none' or a folder written by `flywheel tune-judge`")
    meta = read_meta(folder)
    if meta.get("base_model") != base_model:
        raise ConfigError(f"the adapter in {folder} was trained on {meta.get('base_model')!r}, "
                          f"but the judge is {base_model!r}",
                          hint="set [models] judge to the adapter's base model, or tune the judge again")
    return AdapterRef(folder, str(meta["adapter_id"]), meta)


def attach(vlm, ref: AdapterRef) -> None:
    """Load ``ref`` onto a judge VLM (only model adapters with ``load_adapter`` can take one)."""
    if not hasattr(vlm, "load_adapter"):
        raise ConfigError(f"the judge {vlm.model_id} cannot load a LoRA adapter",
                          hint="judge adapters need a Qwen-VL judge; pass --judge-adapter none")
    vlm.load_adapter(ref.path, adapter_id=ref.adapter_id)
