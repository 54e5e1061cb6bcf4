"""Variants and the editor-call measurement of ``benchmarks/enrich.py`` (kept apart so that file stays short).

A variant is ``NAME[:STEPS[:TRUE_CFG]][:key=value...]``, keys:

- ``refs=N``: other sources given as references (Qwen-Image-Edit, klein); default ``--references``;
- ``ref_area=PIXELS``: klein's ``reference_area`` (each reference resized to about that many pixels);
- ``speed=none|compile|compile-fp8|auto``: ``flywheel.models.editor_speed`` on the editor's denoiser.

Variants with the same backend, steps, true CFG and speed share one built editor (built once, compiled
once); only one editor is in memory at a time.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

KNOBS = ("refs", "ref_area", "speed")


@dataclass(frozen=True)
class Variant:
    entry: str  # as written on the command line
    backend: str
    steps: int | None
    true_cfg: float | None
    refs: int
    ref_area: int | None
    speed: str

    @property
    def build_key(self) -> tuple:
        return self.backend, self.steps, self.true_cfg, self.speed


def parse_variant(entry: str, args: argparse.Namespace) -> Variant:
    name, *tokens = entry.strip().split(":")
    positional = [t for t in tokens if "=" not in t]
    knobs = dict(t.split("=", 1) for t in tokens if "=" in t)
    unknown = set(knobs) - set(KNOBS)
    if unknown:
        raise ValueError(f"{entry}: unknown key(s) {', '.join(sorted(unknown))} (use {', '.join(KNOBS)})")
    return Variant(entry.strip(), name, int(positional[0]) if positional else args.steps,
                   float(positional[1]) if len(positional) > 1 else args.true_cfg,
                   int(knobs.get("refs", args.references)), int(knobs["ref_area"]) if "ref_area" in knobs else None,
                   knobs.get("speed", args.speed))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure_calls(editor, project, recipes: list[str], n_refs: int, device: str) -> dict:
    """The editor call alone: the same requests ``flywheel enrich`` builds (each kept source x recipe, the other
    sources as references), one edit per call, timed with the GPU synchronised; nothing is stored."""
    from flywheel.catalog.queries import KEPT_SOURCES
    from flywheel.models.base import EditRequest
    from flywheel.recipes import load_recipes

    sources = {r["id"]: project.store.open_image(r["sha256"]) for r in project.catalog.query(KEPT_SOURCES)}
    seconds = []
    for source_id, image in sources.items():
        refs = [im for i, im in sources.items() if i != source_id][:n_refs]
        for recipe in load_recipes().select(recipes):
            sync(device)
            t0 = time.perf_counter()
            editor.edit([EditRequest(image=image, prompt=recipe.full_prompt, seed=0, references=refs, recipe=recipe)])
            sync(device)
            seconds.append(time.perf_counter() - t0)
    after_first = seconds[1:] or seconds
    return {"call_s_per_edit": round(sum(after_first) / len(after_first), 3), "call_first_s": round(seconds[0], 2),
            "call_edits": len(seconds)}
