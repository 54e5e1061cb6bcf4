"""The evaluation report: a self-contained folder (index.html, metrics.json, plots/, training/, images/).

Open ``index.html`` from disk; it references only files in its own folder. It reads top to bottom as a
LoRA maker asks: which round is better (one plain word for the primary metric, with the bootstrap
interval that backs it), what changed between the rounds and why (``story``), the metrics, the training
sets with the judge's reasons, each run's loss curve, training samples and LoRA files, and the held-out
renders side by side. ``metrics.json`` is strict JSON: a value that could not be measured is ``null``,
never NaN, so every parser reads it.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.evaluation.metrics import METRICS, EvalImage
from flywheel.evaluation.stats import Comparison
from flywheel.evaluation.story import RunFacts, Story, outcomes

SHARES = {"recognisable", "judge_pass"}  # metrics that are shares of images: plotted on a 0-1 axis


@dataclass
class RoundData:
    label: str  # e.g. "v1 (LoRA run 3)"
    run_id: int | None
    images: list[EvalImage]
    scores: dict[str, dict[str, float]]
    composition: dict[str, int] = field(default_factory=dict)  # dataset members by kind


def finite(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _mean(values: dict[str, float]) -> float | None:
    vals = [v for v in values.values() if finite(v) is not None]
    return sum(vals) / len(vals) if vals else None


def strict(obj):
    """``obj`` with every NaN / infinity replaced by None, so ``json.dumps(allow_nan=False)`` accepts it."""
    if isinstance(obj, float):
        return finite(obj)
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def write_report(
    folder: Path, baseline: RoundData, candidate: RoundData, comparisons: dict[str, Comparison], primary: str,
    *, title: str = "Flywheel evaluation", story: Story | None = None,
) -> Path:
    from flywheel.evaluation.report_html import page

    folder.mkdir(parents=True, exist_ok=True)
    verdict = comparisons[primary].verdict if primary in comparisons else "no_significant_change"
    # 1. Why some metrics have no plot, or read as zero (said on the page next to the plots).
    notes = metric_notes(baseline, candidate, comparisons, story)
    # 2. Metrics as strict JSON (the numbers behind every plot and sentence).
    payload = {
        "primary_metric": primary,
        "verdict": verdict,
        "rounds": {r.label: {"run_id": r.run_id, "n_images": len(r.images), "composition": r.composition,
                             "means": {m: _mean(v) for m, v in r.scores.items()}} for r in (baseline, candidate)},
        "comparisons": {m: {"higher_is_better": METRICS[m][0], "baseline": c.baseline, "candidate": c.candidate,
                            "improvement": c.difference, "ci95": [c.low, c.high], "n_pairs": c.n, "verdict": c.verdict}
                        for m, c in comparisons.items()},
        "metric_notes": notes,
        "per_image": {r.label: r.scores for r in (baseline, candidate)},
    }
    if story is not None:
        payload["what_changed"] = story.sentences()
        payload["runs"] = {f"run {r.run_id}": _run_json(r) for r in (story.baseline, story.candidate)}
        if story.coverage is not None:  # the candidate's dataset: which views, framings... it has and lacks
            payload["coverage"] = story.coverage.as_dict()
    (folder / "metrics.json").write_text(json.dumps(strict(payload), indent=2, allow_nan=False), encoding="utf-8")
    # 3. Plots, training files copied in, image grids.
    plots = _plots(folder / "plots", baseline, candidate, comparisons)
    training = {r.run_id: _training_files(folder, r) for r in (story.baseline, story.candidate)} if story else {}
    grids = {r.label: _thumbs(folder / "images", r) for r in (baseline, candidate)}
    # 4. The page.
    (folder / "index.html").write_text(
        page(title, baseline, candidate, comparisons, primary, verdict, plots, notes, grids, story, training),
        encoding="utf-8")
    return folder / "index.html"


def _run_json(r: RunFacts) -> dict:
    return {"round": r.round, "dataset_version": r.dataset_version, "members": r.by_kind(),
            "lora_files": [str(p) for p in r.lora_files], "final_loss": r.final_loss, "steps": r.steps,
            "sample_steps": sorted({s.step for s in r.samples})}


def metric_notes(baseline: RoundData, candidate: RoundData, comparisons: dict[str, Comparison],
                 story: Story | None) -> dict[str, str]:
    """metric -> why it is not plotted, or why it reads as it does (all zero, ...)."""
    notes = {}
    for m, c in comparisons.items():
        if finite(c.baseline) is None and finite(c.candidate) is None:
            notes[m] = "not plotted: no image of either round could be measured"
        elif not _plotted(c):
            notes[m] = "not plotted: 0 in both rounds"
            if m == "recognisable":
                faces = [sum(1 for v in r.scores.get("face_distance", {}).values() if finite(v) is not None)
                         for r in (baseline, candidate)]
                notes[m] += ("; dlib found a face in " + " and ".join(
                    f"{n} of {len(r.images)} renders of {r.label}" for n, r in zip(faces, (baseline, candidate)))
                    + (" (no face, so nothing to recognise)" if not any(faces) else ""))
            elif m == "judge_pass":
                why = []
                for r in (baseline, candidate):
                    judged = story.renders.get(r.run_id) if story else None
                    why.append(f"{r.label}: {outcomes(judged)}" if judged else f"{r.label}: none accepted")
                notes[m] += "; the judge accepted none of the renders (" + "; ".join(why) + ")"
    for m in METRICS:
        if m not in comparisons:
            notes.setdefault(m, "not measured: " + _why_unmeasured(m))
    return notes


def _plotted(c: Comparison) -> bool:
    """A bar chart of two zero (or unmeasured) values is empty axes: those are said in words instead."""
    return bool(finite(c.baseline)) or bool(finite(c.candidate))


def _why_unmeasured(metric: str) -> str:
    return {"recognisable": "no source image has a face dlib finds", "face_distance": "no render has a face",
            "dino": "set [evaluate] image_embedder to a DINOv2 model", "clip_i": "set [evaluate] image_embedder to "
            "a CLIP model", "clip_t": "set [evaluate] clip_model", "judge_pass": "[evaluate] judge_images = false",
            "diversity": "fewer than two renders per round"}.get(metric, "no data")


def _plots(folder: Path, baseline: RoundData, candidate: RoundData, comparisons: dict[str, Comparison]) -> list[str]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    shown = {m: c for m, c in comparisons.items() if _plotted(c)}
    if shown:
        fig = Figure(figsize=(3.2 * len(shown), 3.4))  # no pyplot: no global figure state in a library
        FigureCanvasAgg(fig)
        for i, (metric, c) in enumerate(shown.items()):
            ax = fig.add_subplot(1, len(shown), i + 1)
            values = [finite(c.baseline) or 0.0, finite(c.candidate) or 0.0]
            bars = ax.bar([baseline.label, candidate.label], values, color=["#8a9bb0", "#2f7ed8"])
            ax.bar_label(bars, labels=[f"{v:.3f}" if finite(v) is not None else "n/a"
                                       for v in (c.baseline, c.candidate)], fontsize=8)
            if finite(c.low) is not None and finite(c.candidate) is not None:
                # Interval of the candidate's mean implied by the paired bootstrap of the difference.
                sign = 1 if METRICS[metric][0] else -1
                lo, hi = sorted((c.baseline + sign * c.low, c.baseline + sign * c.high))
                ax.errorbar([1], [c.candidate], yerr=[[max(0.0, c.candidate - lo)], [max(0.0, hi - c.candidate)]],
                            fmt="none", ecolor="black", capsize=4)
            top = max(values + [1e-9])
            ax.set_ylim(0, 1.1 if metric in SHARES else top * 1.25)
            ax.set_title(METRICS[metric][1], fontsize=8, wrap=True)
            ax.tick_params(labelsize=8)
        fig.tight_layout()
        fig.savefig(folder / "metrics.png", dpi=110)
        names.append("plots/metrics.png")
    kinds = sorted(set(baseline.composition) | set(candidate.composition))
    if kinds:
        fig = Figure(figsize=(4.5, 3))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        bottom = [0, 0]
        for kind in kinds:
            vals = [baseline.composition.get(kind, 0), candidate.composition.get(kind, 0)]
            ax.bar([baseline.label, candidate.label], vals, bottom=bottom, label=kind)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title("Training set composition", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "composition.png", dpi=110)
        names.append("plots/composition.png")
    return names


def _training_files(folder: Path, run: RunFacts) -> dict:
    """Copy a run's loss curve and sample thumbnails into the report; returns their relative paths."""
    from PIL import Image

    out_dir = folder / "training" / f"run-{run.run_id}"
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict = {"loss": None, "samples": {}}
    if run.loss_curve is not None:
        shutil.copyfile(run.loss_curve, out_dir / "loss.png")
        files["loss"] = f"training/run-{run.run_id}/loss.png"
    columns = list(dict.fromkeys((s.prompt, s.seed) for s in run.samples))
    for s in run.samples:
        name = f"step{s.step:06d}-{columns.index((s.prompt, s.seed)):02d}.jpg"
        with Image.open(s.path) as im:
            thumb = im.convert("RGB")
        thumb.thumbnail((256, 256))
        thumb.save(out_dir / name, quality=88)
        files["samples"][(s.step, s.prompt, s.seed)] = f"training/run-{run.run_id}/{name}"
    return files


def _thumbs(folder: Path, r: RoundData) -> dict[str, str]:
    """Held-out renders as thumbnails: key ('prompt|seed') -> relative path."""
    safe = "".join(ch if ch.isalnum() else "_" for ch in r.label)
    (folder / safe).mkdir(parents=True, exist_ok=True)
    out = {}
    for i, im in enumerate(r.images):
        rel = f"images/{safe}/{i:03d}.jpg"
        thumb = im.image.convert("RGB")
        thumb.thumbnail((256, 256))
        thumb.save(folder.parent / rel, quality=88)
        out[im.key] = rel
    return out
