"""The evaluation report's page (``report.write_report`` writes the files it links to).

Sections, in the order a LoRA maker reads them: the verdict, what changed between the rounds, the
metrics (with a note for every metric that is missing or reads as zero), the training sets with the
judge's reasons, each run's LoRA files, loss curve and training samples per step, and the held-out
renders of both rounds side by side. Every text from the catalog or a prompt is HTML-escaped.
"""

from __future__ import annotations

import html
import math

from flywheel.evaluation.metrics import METRICS
from flywheel.evaluation.story import KIND_WORDS, RunFacts, Story, outcomes

VERDICT_TEXT = {"better": "better", "worse": "worse", "no_significant_change": "no significant change"}
RECOGNISABLE_BAR = 0.70  # the original plan: "Character recognizable in 70%+ of outputs"
e = html.escape

STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px;text-align:left}
.verdict{font-size:20px;padding:10px;border-radius:6px;background:#eef}.better{background:#e3f6e3}.worse{background:#fbe3e3}
.changed{font-size:16px;background:#fff8e1;padding:8px 12px;border-left:4px solid #f0b400}
.note{color:#555;font-size:13px}.runs{display:flex;flex-wrap:wrap;gap:24px}.run{flex:1 1 520px}
.run img.loss{width:100%;max-width:560px}td img{width:128px;display:block}code{font-size:12px;word-break:break-all}
.pairs td{vertical-align:top}.pairs img{width:160px}"""


def _fmt(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def page(title, baseline, candidate, comparisons, primary, verdict, plots, notes, grids, story: Story | None,
         training: dict) -> str:
    parts = [f"<h1>{e(title)}</h1>", _headline(baseline, candidate, comparisons, primary, verdict)]
    if story is not None:
        parts.append("<h2>What changed</h2>" + "".join(f"<p class='changed'>{e(s)}</p>" for s in story.sentences()))
    parts += [_bar(baseline, candidate, comparisons), "<h2>Metrics</h2>",
              _metrics_table(baseline, candidate, comparisons)]
    parts += [f"<img src='{p}' alt='{p}'>" for p in plots]
    if notes:
        parts.append("<ul class='note'>" + "".join(f"<li><b>{e(METRICS[m][1])}</b>: {e(t)}</li>"
                                                  for m, t in notes.items()) + "</ul>")
    if story is not None:
        parts += ["<h2>Training sets</h2>", _composition(story)]
        if story.coverage is not None:
            parts += [f"<h2>Coverage of {e(story.candidate.label)}</h2>", _coverage(story.coverage)]
        parts += ["<h2>Training</h2>",
                  "<div class='runs'>" + "".join(_run(r, training.get(r.run_id, {}))
                                                 for r in (story.baseline, story.candidate)) + "</div>"]
    parts += ["<h2>Held-out renders</h2>", _pairs(baseline, candidate, grids),
              "<p><a href='metrics.json'>metrics.json</a> holds every number on this page.</p>"]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{STYLE}</style>"
            f"</head><body>{''.join(parts)}</body></html>")


def _headline(baseline, candidate, comparisons, primary, verdict) -> str:
    c = comparisons.get(primary)
    text = (f"{e(candidate.label)} vs {e(baseline.label)}: <b>{VERDICT_TEXT[verdict]}</b> on "
            f"{e(METRICS[primary][1].lower())}")
    if c:
        text += (f": {_fmt(c.baseline)} → {_fmt(c.candidate)}, improvement {_fmt(c.difference)} (95% bootstrap "
                 f"interval {_fmt(c.low)} to {_fmt(c.high)}, {c.n} paired prompts×seeds)")
    return f"<p class='verdict {verdict}'>{text}</p>"


def _bar(baseline, candidate, comparisons) -> str:
    if "recognisable" not in comparisons:  # the original plan's success bar: the character recognisable in 70%+
        return ""
    r = comparisons["recognisable"]
    shares = [(lbl, v) for lbl, v in ((baseline.label, r.baseline), (candidate.label, r.candidate))
              if v is not None and math.isfinite(v)]
    return "<p>Recognisable share vs the plan's 70% bar: " + ", ".join(
        f"{e(lbl)} {v:.0%} ({'met' if v >= RECOGNISABLE_BAR else 'missed'})" for lbl, v in shares) + "</p>"


def _metrics_table(baseline, candidate, comparisons) -> str:
    rows = "".join(
        f"<tr><td>{e(METRICS[m][1])}</td><td>{_fmt(x.baseline)}</td><td>{_fmt(x.candidate)}</td>"
        f"<td>{_fmt(x.difference)}</td><td>[{_fmt(x.low)}, {_fmt(x.high)}]</td><td>{VERDICT_TEXT[x.verdict]}</td></tr>"
        for m, x in comparisons.items())
    return ("<p class='note'>Improvement is candidate minus baseline, sign-flipped for metrics where lower is "
            "better, so positive always means the candidate is better. Intervals: paired bootstrap over "
            "(prompt, seed) pairs.</p>"
            f"<table><tr><th>metric</th><th>{e(baseline.label)}</th><th>{e(candidate.label)}</th><th>improvement</th>"
            f"<th>95% interval</th><th>verdict</th></tr>{rows}</table>")


def _composition(story: Story) -> str:
    b, c = story.baseline, story.candidate
    kinds = [k for k in KIND_WORDS if k in b.by_kind() or k in c.by_kind() or
             any(x.kind == k for x in story.candidates)]
    rows = ""
    for kind in kinds:
        left = [x for x in story.candidates if x.kind == kind and x.image_id not in c.members]
        example = next((x for x in left if x.decision == "rejected"), left[0] if left else None)
        rows += (f"<tr><td>{e(KIND_WORDS[kind][1])}</td><td>{b.by_kind().get(kind, 0)}</td>"
                 f"<td>{c.by_kind().get(kind, 0)}</td><td>{len(left)}</td>"
                 f"<td>{e(outcomes(left)) if left else '-'}</td>"
                 f"<td class='note'>{_example(example) if example else ''}</td></tr>")
    return (f"<table><tr><th>kind</th><th>in {e(b.label)} (round {b.round})</th><th>in {e(c.label)} "
            f"(round {c.round})</th><th>left out of {e(c.label)}</th><th>why (newest decision; a rejection counts "
            f"under every criterion it names)</th><th>for example</th></tr>{rows}</table>"
            "<p class='note'>Sources are in unless a reviewer left one out. Other images are in when a reviewer "
            "accepted them, or when no reviewer decided and the judge accepted them.</p>")


def _coverage(table) -> str:
    """Views, framings, expressions and lighting the candidate's set holds (flywheel.coverage), and its gaps."""
    rows = "".join(f"<tr><td>{e(axis)}</td><td>{e(text)}</td></tr>" for axis, text in table.rows())
    gaps = table.gap_messages()
    missing = (f"<p class='changed'>Missing: {e(', '.join(gaps))}. `flywheel enrich --fill-gaps` plans recipes for "
               "them.</p>") if gaps else "<p class='note'>No empty cells.</p>"
    return f"<table><tr><th>axis</th><th>images per tag</th></tr>{rows}</table>{missing}"


def _example(x) -> str:
    reason = x.reason if len(x.reason) <= 220 else x.reason[:217] + "..."
    by = f" by the {x.decided_by}" if x.decided_by in ("judge", "reviewer") else ""
    return f"#{x.image_id} ({e(x.decision.replace('_', ' '))}{by}): {e(reason)}"


def _run(run: RunFacts, files: dict) -> str:
    out = [f"<div class='run'><h3>LoRA run {run.run_id}: round {run.round}, trained on {e(run.label)} "
           f"({len(run.members)} images)</h3>"]
    if run.lora_files:
        out.append("<p>LoRA files:</p><ul>" + "".join(f"<li><code>{e(str(p))}</code></li>" for p in run.lora_files)
                   + "</ul>")
    else:
        out.append("<p class='note'>No LoRA file found in the run folder.</p>")
    if run.steps:
        out.append(f"<p>{run.steps} steps; final loss {_fmt(run.final_loss)} (mean of the last 10% of steps).</p>")
    if files.get("loss"):
        out.append(f"<img class='loss' src='{files['loss']}' alt='loss curve of run {run.run_id}'>")
    else:
        out.append("<p class='note'>No loss curve (matplotlib missing when it trained, or the file was removed).</p>")
    samples = files.get("samples", {})
    if samples:
        cols = list(dict.fromkeys((p, s) for _, p, s in samples))
        steps = sorted({step for step, _, _ in samples})
        head = "".join(f"<th>{e(p)} (seed {s})</th>" for p, s in cols)
        body = "".join("<tr><th>step " + str(step) + "</th>" + "".join(
            f"<td><img src='{samples[(step, p, s)]}' alt=''></td>" if (step, p, s) in samples else "<td>-</td>"
            for p, s in cols) + "</tr>" for step in steps)
        out.append(f"<p>Training samples (fixed prompts and seeds, per step):</p><table><tr><th></th>{head}</tr>"
                   f"{body}</table>")
    else:
        out.append("<p class='note'>No training samples ([train] sample_prompts is empty).</p>")
    return "".join(out) + "</div>"


def _pairs(baseline, candidate, grids) -> str:
    """One row per held-out (prompt, seed): both rounds' renders side by side, with the face badge."""
    def cell(r, key):
        rel = grids[r.label].get(key)
        if rel is None:
            return "<td>-</td>"
        rec = r.scores.get("recognisable", {}).get(key, float("nan"))
        badge = "" if not math.isfinite(rec) else ("recognisable" if rec >= 1 else "not recognisable")
        return f"<td><img src='{rel}' alt=''><i>{badge}</i></td>"

    keys = list(dict.fromkeys([im.key for im in baseline.images] + [im.key for im in candidate.images]))
    prompts = {im.key: (im.prompt, im.seed) for im in [*baseline.images, *candidate.images]}
    rows = "".join(f"<tr><td>{e(prompts[k][0])}<br><span class='note'>seed {prompts[k][1]}</span></td>"
                   f"{cell(baseline, k)}{cell(candidate, k)}</tr>" for k in keys)
    return (f"<table class='pairs'><tr><th>prompt</th><th>{e(baseline.label)}</th><th>{e(candidate.label)}</th></tr>"
            f"{rows}</table>")
