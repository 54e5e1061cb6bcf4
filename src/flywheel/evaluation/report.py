"""The evaluation report: a self-contained folder (index.html, metrics.json, plots/, images/).

Open ``index.html`` from disk; it references only files in its own folder. The verdict at the top is
one plain word for the primary metric, with the bootstrap interval that backs it.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from flywheel.evaluation.metrics import METRICS, EvalImage
from flywheel.evaluation.stats import Comparison

RECOGNISABLE_BAR = 0.70  # the original plan: "Character recognizable in 70%+ of outputs"

VERDICT_TEXT = {
    "better": "better",
    "worse": "worse",
    "no_significant_change": "no significant change",
}


@dataclass
class RoundData:
    label: str  # e.g. "v1 (LoRA run 3)"
    run_id: int | None
    images: list[EvalImage]
    scores: dict[str, dict[str, float]]
    composition: dict[str, int] = field(default_factory=dict)  # dataset members by kind


def _mean(values: dict[str, float]) -> float:
    finite = [v for v in values.values() if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _fmt(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3f}"


def write_report(
    folder: Path, baseline: RoundData, candidate: RoundData, comparisons: dict[str, Comparison], primary: str,
    *, title: str = "Flywheel evaluation",
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    verdict = comparisons[primary].verdict if primary in comparisons else "no_significant_change"
    # 1. Metrics as JSON (the numbers behind every plot and sentence).
    payload = {
        "primary_metric": primary,
        "verdict": verdict,
        "rounds": {r.label: {"run_id": r.run_id, "n_images": len(r.images), "composition": r.composition,
                             "means": {m: _mean(v) for m, v in r.scores.items()}} for r in (baseline, candidate)},
        "comparisons": {m: {"higher_is_better": METRICS[m][0], "baseline": c.baseline, "candidate": c.candidate,
                            "improvement": c.difference, "ci95": [c.low, c.high], "n_pairs": c.n, "verdict": c.verdict}
                        for m, c in comparisons.items()},
        "per_image": {r.label: r.scores for r in (baseline, candidate)},
    }
    (folder / "metrics.json").write_text(json.dumps(payload, indent=2, allow_nan=True), encoding="utf-8")
    # 2. Plots and image grids.
    plots = _plots(folder / "plots", baseline, candidate, comparisons)
    grids = {r.label: _grid(folder / "images", r) for r in (baseline, candidate)}
    # 3. The page.
    (folder / "index.html").write_text(
        _page(title, baseline, candidate, comparisons, primary, verdict, plots, grids), encoding="utf-8")
    return folder / "index.html"


def _plots(folder: Path, baseline: RoundData, candidate: RoundData, comparisons: dict[str, Comparison]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # no display; never touch the user's GUI backend
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    if comparisons:
        fig, axes = plt.subplots(1, len(comparisons), figsize=(3.2 * len(comparisons), 3.2), squeeze=False)
        for ax, (metric, c) in zip(axes[0], comparisons.items()):
            ax.bar([baseline.label, candidate.label], [c.baseline, c.candidate], color=["#8a9bb0", "#2f7ed8"])
            # Interval of the candidate's mean implied by the paired bootstrap of the difference.
            sign = 1 if METRICS[metric][0] else -1
            lo, hi = c.baseline + sign * c.low, c.baseline + sign * c.high
            ax.errorbar([1], [c.candidate], yerr=[[max(0.0, c.candidate - min(lo, hi))], [max(0.0, max(lo, hi) - c.candidate)]],
                        fmt="none", ecolor="black", capsize=4)
            ax.set_title(METRICS[metric][1], fontsize=8, wrap=True)
            ax.tick_params(labelsize=8)
        fig.tight_layout()
        fig.savefig(folder / "metrics.png", dpi=110)
        plt.close(fig)
        names.append("plots/metrics.png")
    kinds = sorted(set(baseline.composition) | set(candidate.composition))
    if kinds:
        fig, ax = plt.subplots(figsize=(4.5, 3))
        bottom = [0, 0]
        for kind in kinds:
            vals = [baseline.composition.get(kind, 0), candidate.composition.get(kind, 0)]
            ax.bar([baseline.label, candidate.label], vals, bottom=bottom, label=kind)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title("Training set composition", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "composition.png", dpi=110)
        plt.close(fig)
        names.append("plots/composition.png")
    return names


def _grid(folder: Path, r: RoundData) -> list[tuple[str, str, str]]:
    safe = "".join(ch if ch.isalnum() else "_" for ch in r.label)
    (folder / safe).mkdir(parents=True, exist_ok=True)
    cells = []
    for i, im in enumerate(r.images):
        rel = f"images/{safe}/{i:03d}.jpg"
        thumb = im.image.convert("RGB")
        thumb.thumbnail((256, 256))
        thumb.save(folder.parent / rel, quality=88)
        rec = r.scores.get("recognisable", {}).get(im.key, float("nan"))
        badge = "" if not math.isfinite(rec) else ("recognisable" if rec >= 1 else "not recognisable")
        cells.append((rel, f"{im.prompt} (seed {im.seed})", badge))
    return cells


def _page(title, baseline, candidate, comparisons, primary, verdict, plots, grids) -> str:
    e = html.escape
    c = comparisons.get(primary)
    headline = (f"<p class='verdict {verdict}'>{e(candidate.label)} vs {e(baseline.label)}: "
                f"<b>{VERDICT_TEXT[verdict]}</b> on {e(METRICS[primary][1].lower())}"
                + (f": {_fmt(c.baseline)} → {_fmt(c.candidate)}, improvement {_fmt(c.difference)} "
                   f"(95% bootstrap interval {_fmt(c.low)} to {_fmt(c.high)}, {c.n} paired prompts×seeds)</p>" if c else "</p>"))
    bar = ""
    if "recognisable" in comparisons:  # the original plan's success bar: the character recognisable in 70%+
        r = comparisons["recognisable"]
        bar = "<p>Recognisable share vs the plan's 70% bar: " + ", ".join(
            f"{e(lbl)} {v:.0%} ({'met' if v >= RECOGNISABLE_BAR else 'missed'})"
            for lbl, v in ((baseline.label, r.baseline), (candidate.label, r.candidate)) if math.isfinite(v)) + "</p>"
    rows = "".join(
        f"<tr><td>{e(METRICS[m][1])}</td><td>{_fmt(x.baseline)}</td><td>{_fmt(x.candidate)}</td>"
        f"<td>{_fmt(x.difference)}</td><td>[{_fmt(x.low)}, {_fmt(x.high)}]</td><td>{VERDICT_TEXT[x.verdict]}</td></tr>"
        for m, x in comparisons.items())
    imgs = "".join(f"<img src='{p}' alt='{p}'>" for p in plots)
    sections = ""
    for label, cells in grids.items():
        figs = "".join(f"<figure><img src='{rel}' alt=''><figcaption>{e(cap)}<br><i>{e(badge)}</i></figcaption></figure>"
                       for rel, cap, badge in cells)
        sections += f"<h2>{e(label)}</h2><div class='grid'>{figs}</div>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:14px}}
.verdict{{font-size:20px;padding:10px;border-radius:6px;background:#eef}}.better{{background:#e3f6e3}}.worse{{background:#fbe3e3}}
.grid{{display:flex;flex-wrap:wrap;gap:8px}}figure{{margin:0;width:200px;font-size:12px}}figure img{{width:200px}}
</style></head><body><h1>{e(title)}</h1>{headline}{bar}
<p>Improvement is candidate minus baseline, sign-flipped for metrics where lower is better, so positive always
means the candidate is better. Intervals: paired bootstrap over (prompt, seed) pairs.</p>
<table><tr><th>metric</th><th>{e(baseline.label)}</th><th>{e(candidate.label)}</th><th>improvement</th><th>95% interval</th><th>verdict</th></tr>{rows}</table>
{imgs}{sections}<p><a href="metrics.json">metrics.json</a></p></body></html>"""
