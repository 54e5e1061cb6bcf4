"""``flywheel evaluate``: is LoRA round k+1 better than round k? Measured, with an interval.

Both rounds render the same held-out prompts (never in the generation bank) with the same seeds; the
images are stored with ``purpose = 'eval'`` so no dataset ever trains on them. Metrics are
DreamBench-style (``flywheel.evaluation.metrics``); the verdict on the primary metric comes from a
paired bootstrap over (prompt, seed) pairs; the report is a self-contained folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from flywheel.config import EvaluateConfig
from flywheel.errors import StageError
from flywheel.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    evaluation_id: int
    baseline_run: int
    candidate_run: int
    verdict: str
    primary: str
    report: Path
    metrics: dict


def eval_prompts(cfg: EvaluateConfig) -> list[str]:
    from flywheel.generate import shipped_prompts

    return list(cfg.prompts) if cfg.prompts else shipped_prompts("eval_prompts.toml")


def evaluate(project, cfg: EvaluateConfig | None = None, *, baseline_run: int | None = None,
             candidate_run: int | None = None, device: str | None = None, progress: ProgressFn | None = None,
             pool=None, **model_kwargs) -> EvaluationResult:
    """Render both rounds (one loaded base, LoRAs swapped: ``flywheel.models.pool``), judge, measure, report."""
    from flywheel.evaluation.metrics import METRICS, source_face_embeddings
    from flywheel.evaluation.report import write_report
    from flywheel.evaluation.stats import paired_bootstrap
    from flywheel.evaluation.story import collect_story
    from flywheel.models.pool import stage_pool
    from flywheel.signals.embeddings import ImageEmbedder

    cfg = cfg or project.config.evaluate
    progress = progress or no_progress
    cat = project.catalog
    # 1. Which rounds: the two newest finished LoRA runs unless named.
    baseline, candidate = _runs(cat, baseline_run, candidate_run)
    with cat.operation("evaluate", kind="stage_run", params={"baseline_run": baseline["id"],
                                                              "candidate_run": candidate["id"], **cfg.model_dump()}) as op:
        # 2. Held-out images of both rounds (generated once; a re-run reuses them), from one loaded base.
        with stage_pool(project, pool, "evaluate") as models:
            for i, run in enumerate((baseline, candidate)):
                _render(project, cfg, run["id"], device, model_kwargs, models, progress)
                progress(i + 1, 3, f"rendered round {run['round']}")
            # 3. Judge them (for the judge pass rate); the judge skips what it already judged. The pool
            #    releases the base before the judge's VLM loads.
            if cfg.judge_images:
                from flywheel.judge import judge

                judge(project, pool=models, progress=progress)
        # 4. Metrics per image, per round.
        sources = [project.store.open_image(r["sha256"]) for r in
                   cat.query("SELECT sha256 FROM images WHERE kind = 'source' ORDER BY id")]
        source_faces = source_face_embeddings(sources)
        embedder = ImageEmbedder.from_pretrained(cfg.image_embedder) if cfg.image_embedder else None
        clip = ImageEmbedder.from_pretrained(cfg.clip_model) if cfg.clip_model else None
        rounds = [_round_data(project, run, source_faces, sources, embedder, clip) for run in (baseline, candidate)]
        # 5. Paired comparison per metric and the verdict on the primary one.
        comparisons = {m: paired_bootstrap(rounds[0].scores[m], rounds[1].scores[m], higher_is_better=METRICS[m][0],
                                           resamples=cfg.resamples)
                       for m in METRICS if m in rounds[0].scores and m in rounds[1].scores}
        primary = _primary(cfg, comparisons, source_faces)
        # 6. Report folder + catalog rows.
        folder = project.workspace / "reports" / f"eval-run{baseline['id']}-vs-run{candidate['id']}"
        story = collect_story(project, baseline, candidate,  # what changed between the rounds, and why
                              {r.run_id: [im.image_id for im in r.images if im.image_id] for r in rounds})
        index = write_report(folder, rounds[0], rounds[1], comparisons, primary, story=story,
                             title=f"{project.config.project.name}: round {candidate['round']} vs round {baseline['round']}")
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        verdict = metrics["verdict"]
        with cat.transaction():
            eval_id = cat.insert("evaluations", {
                "baseline_run_id": baseline["id"], "candidate_run_id": candidate["id"],
                "metrics_json": json.dumps({k: metrics[k] for k in ("primary_metric", "verdict", "comparisons", "rounds")}),
                "verdict": verdict, "report_path": str(index.relative_to(project.workspace)), "operation_id": op})
            cat.insert("artifacts", {"kind": "report", "path": str(index.relative_to(project.workspace)),
                                     "operation_id": op, "meta_json": json.dumps({"evaluation_id": eval_id})})
        progress(3, 3, "report")
    log.info("evaluate: round %d vs %d: %s on %s", candidate["round"], baseline["round"], verdict, primary)
    return EvaluationResult(eval_id, baseline["id"], candidate["id"], verdict, primary, index, metrics)


def _runs(cat, baseline_run: int | None, candidate_run: int | None):
    ok = {r["id"]: r for r in cat.query("SELECT * FROM lora_runs WHERE status = 'ok' ORDER BY id")}
    for rid in (baseline_run, candidate_run):
        if rid is not None and rid not in ok:
            raise StageError(f"LoRA run {rid} is not a finished run", hint="list runs with `flywheel status`")
    if candidate_run is None:
        rest = [r for r in ok if r != baseline_run]
        candidate_run = rest[-1] if rest else None
    if baseline_run is None:
        rest = [r for r in ok if r < (candidate_run or 0)]
        baseline_run = rest[-1] if rest else None
    if baseline_run is None or candidate_run is None or baseline_run == candidate_run:
        raise StageError(f"evaluation compares two finished LoRA runs; this project has {len(ok)}",
                         hint="train another round (`flywheel train`) or name both with --baseline/--candidate")
    return ok[baseline_run], ok[candidate_run]


def _render(project, cfg: EvaluateConfig, run_id: int, device, model_kwargs, pool, progress) -> None:
    from flywheel.generate import generate

    # [generate]'s sampler settings as set (steps / guidance left unset follow the rendering model's preset:
    # 4 steps on the distilled klein), the held-out prompts and seeds instead of the bank.
    gcfg = project.config.generate.model_copy(update={
        "prompts": 0, "seeds_per_prompt": cfg.seeds_per_prompt, "extra_prompts": eval_prompts(cfg),
        "use_shipped_prompts": False, "seed": cfg.seed})
    generate(project, gcfg, lora_run_id=run_id, device=device, purpose="eval", pool=pool, progress=progress,
             **model_kwargs)  # per image: the renders are most of evaluate's time


def _round_data(project, run, source_faces, sources, embedder, clip):
    from flywheel.catalog.queries import LATEST_VERDICT
    from flywheel.evaluation.metrics import EvalImage, score_round
    from flywheel.evaluation.report import RoundData

    rows = project.catalog.query(
        # Through operations.output_image_id: two rounds may render a prompt identically (one image row).
        f"""SELECT i.id, i.sha256, o.params_json, lv.verdict FROM operations o JOIN images i ON i.id = o.output_image_id
            LEFT JOIN ({LATEST_VERDICT}) lv ON lv.image_id = i.id
            WHERE o.stage = 'evaluate' AND o.status = 'ok' AND i.purpose = 'eval'
              AND json_extract(o.params_json, '$.lora_run_id') = ? ORDER BY o.id""", (run["id"],))
    images = []
    for r in rows:
        p = json.loads(r["params_json"])
        images.append(EvalImage(f"{p['prompt']}|{p['seed']}", p["prompt"], p["seed"], project.store.open_image(r["sha256"]),
                                r["id"], None if r["verdict"] is None else r["verdict"] == "accepted"))
    composition = {row["kind"]: row["n"] for row in project.catalog.query(
        "SELECT i.kind, COUNT(*) AS n FROM dataset_members m JOIN images i ON i.id = m.image_id "
        "WHERE m.dataset_id = ? GROUP BY i.kind", (run["dataset_id"],))}
    scores = score_round(images, source_faces=source_faces, sources=sources, embedder=embedder, clip=clip,
                         trigger=project.config.project.trigger)
    return RoundData(f"round {run['round']} (run {run['id']})", run["id"], images, scores, composition)


def _primary(cfg: EvaluateConfig, comparisons: dict, source_faces) -> str:
    if cfg.primary != "auto":
        if cfg.primary not in comparisons:
            raise StageError(f"evaluate.primary = '{cfg.primary}' could not be measured for these rounds",
                             hint="configure the model it needs (image_embedder / clip_model) or pick another metric")
        return cfg.primary
    order = (["recognisable"] if len(source_faces) else []) + ["dino", "clip_i", "judge_pass", "diversity"]
    return next((m for m in order if m in comparisons), next(iter(comparisons)))
