"""``flywheel tune-judge``: fine-tune the Qwen-VL judge on human review decisions (Flywheel 2).

The judge learns one question from the people who review its verdicts: "should this candidate be kept
in the training set?", asked with the judge's own images (reference source, candidate) and the recipe
that made the candidate (``flywheel.judge_tuning.prompt``). The answer is the human decision as a
yes/no word followed by JSON with the human's reason; only the answer tokens are in the loss.

Reads top to bottom: plan (examples from the reviews, split by source image, data hash), record the
attempt, load the judge (4-bit NF4 on CUDA: QLoRA; float32 on CPU), measure the untrained judge on the
held-out decisions, train a LoRA with checkpoints, measure again, and save the adapter with its base
model id, data hash and metrics. The incumbent is the judge as it decides today: its recorded verdicts
on the held-out images (``judge_tuning.incumbent``). The adapter becomes the active judge only if the
bootstrap interval of its held-out kappa gain over those verdicts lies above zero. Held-out groups are
stored once and reused by every later attempt. Every attempt is recorded, promoted or not, with the
interval. Human decisions are read, never written; machine scores are untouched.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flywheel.config import Config, TuneJudgeConfig
from flywheel.errors import ConfigError, StageError
from flywheel.evaluation.stats import Comparison
from flywheel.judge_tuning import adapters
from flywheel.judge_tuning.dataset import (Example, answer_for, data_hash, load_examples, request_for,
                                        split_by_source, store_sides, stored_sides)
from flywheel.judge_tuning.incumbent import recorded_verdicts
from flywheel.judge_tuning.metrics import CONFIDENCE, RESAMPLES, agreement, kappa_gain_interval
from flywheel.judge_tuning.prompt import KEEP_OPTIONS
from flywheel.progress import ProgressFn, no_progress
from flywheel.project import Project

log = logging.getLogger(__name__)

EVAL_CHUNK = 32  # held-out requests opened at once (each holds two decoded images)


@dataclass
class TuneJudgeResult:
    attempt_id: int
    adapter_id: str
    adapter_path: Path
    base_model: str
    data_hash: str
    balance: dict[str, dict[str, int]]
    before: dict[str, Any]  # the untrained base judge on the held-out decisions
    after: dict[str, Any]  # this adapter on the same decisions
    incumbent: dict[str, Any]  # what it had to beat: the judge's recorded verdicts on the same decisions
    incumbent_policy: str  # the judge policy fingerprint those verdicts were recorded under
    gain: Comparison  # held-out kappa gain over the incumbent with its bootstrap interval (by source group)
    promoted: bool
    losses: list[dict[str, float]] = field(default_factory=list)


def tune_judge(project: Project, cfg: Config | None = None, *, resume: bool = False,
               progress: ProgressFn | None = None) -> TuneJudgeResult:
    """Train (or with ``resume``, continue the newest unfinished) judge adapter; promote it if it is better."""
    from flywheel.judge_tuning import train as tj_train
    from flywheel.models import load_vlm
    from flywheel.models.hub import pick_device

    config = cfg or project.config
    progress = progress or no_progress
    catalog = project.catalog
    base = config.models.judge
    if base == "none":
        raise ConfigError("tune-judge fine-tunes the judge VLM, but [models] judge = 'none'",
                          hint='set [models] judge to a Qwen-VL preset or folder, e.g. "qwen2-vl-2b"')

    # 1. Plan: one example per human accept/reject, split train / held-out by source image, hashed.
    #    A resumed attempt keeps its own settings (split included) and must see the same reviews.
    examples = load_examples(project)
    row, tcfg, resume_from = _unfinished_attempt(project, base, data_hash(examples)) if resume else \
        (None, config.tune_judge, None)
    #    Groups keep the side they got in the first attempt that saw them; new ones get theirs by hash.
    split = split_by_source(examples, tcfg.held_out_fraction, tcfg.split_seed, min_examples=tcfg.min_examples,
                            stored=stored_sides(project))
    balance = split.balance()
    # The incumbent: the judge as it decides today, i.e. its recorded verdicts on the held-out images.
    incumbent_p, incumbent_info = recorded_verdicts(project, config, [e.image_id for e in split.held_out])

    # 2. Record the attempt (a new row, or the unfinished one being resumed) and the sides of new groups.
    with catalog.transaction():
        if row is not None:
            attempt_id = row["id"]
        else:
            attempt_id = catalog.insert("judge_adapters", {
                "base_model": base, "path": "", "data_hash": split.data_hash,
                "config_json": json.dumps({"tune_judge": tcfg.model_dump(), "balance": balance,
                                           "held_out_ids": [e.image_id for e in split.held_out],
                                           "held_out_groups": sorted({e.group for e in split.held_out})})})
        store_sides(project, split, attempt_id)
    aid = adapters.adapter_id(attempt_id, split.data_hash)
    attempt_dir = project.workspace / adapters.FOLDER / f"{attempt_id:04d}"
    attempt_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.models.device)
    quantized = tcfg.quantize_base == "nf4" or (tcfg.quantize_base == "auto" and device == "cuda")
    params = {"attempt_id": attempt_id, "adapter_id": aid, "data_hash": split.data_hash, "resume": resume,
              "quantized": quantized, "balance": balance, **tcfg.model_dump()}
    try:
        with catalog.operation("tune_judge", kind="stage_run", model=base, params=params, seed=tcfg.seed) as run_id:
            with catalog.transaction():
                catalog.execute("UPDATE judge_adapters SET operation_id = ?, status = 'running' WHERE id = ?",
                                (run_id, attempt_id))
            # 3. Load the judge: 4-bit NF4 base on CUDA (QLoRA), float32 on CPU (plain LoRA).
            vlm = load_vlm(base, config.models, quantization="nf4" if quantized else "none")
            # 4. Before: the untrained judge on the held-out human decisions.
            before, p_before = _evaluate(project, vlm, split.held_out, run_id, "before (base judge)")
            # 5. Train: LoRA on the attention projections, answer tokens only, checkpoints every N steps.
            peft_model = tj_train.add_lora(vlm, tcfg, quantized=quantized)
            train_set = split.train
            with catalog.operation("tune_judge", model=vlm.model_id, params={"train": [e.image_id for e in train_set],
                                   "steps": tcfg.steps, "resume_from": str(resume_from or "")},
                                   seed=tcfg.seed, parent_id=run_id):
                losses = tj_train.fit(vlm, peft_model, lambda i: (request_for(project, train_set[i]),
                                                                  answer_for(train_set[i])),
                                      len(train_set), tcfg, attempt_dir, resume_from=resume_from, progress=progress)
            # 6. After: the same held-out decisions, through the very path `flywheel judge` takes.
            after, p_after = _evaluate(project, vlm, split.held_out, run_id, f"after ({aid})")
            # 7. Promote only when the kappa gain over the recorded verdicts is above zero with 95% confidence
            #    (bootstrap over held-out source groups); save the adapter with its base, data hash and metrics.
            human = [e.keep for e in split.held_out]
            incumbent = {**agreement(incumbent_p, human), **incumbent_info}
            gain = kappa_gain_interval(p_after, incumbent_p, human, [e.group for e in split.held_out], seed=tcfg.seed)
            promoted = gain.verdict == "better"
            adapter_dir = attempt_dir / "adapter"
            peft_model.save_pretrained(str(adapter_dir), safe_serialization=True, selected_adapters=["default"])
            metrics = {"before": before, "after": after, "incumbent": incumbent,
                       "kappa_gain": {"difference": gain.difference, "low": gain.low, "high": gain.high,
                                      "groups": gain.n, "confidence": CONFIDENCE, "resamples": RESAMPLES},
                       "promoted": promoted, "balance": balance, "final_loss": losses[-1]["loss"] if losses else None,
                       "held_out": [{"image_id": e.image_id, "group": e.group, "human_keep": e.keep,
                                     "p_keep_before": pb, "p_keep_after": pa, "p_keep_incumbent": pi}
                                    for e, pb, pa, pi in zip(split.held_out, p_before, p_after, incumbent_p)]}
            meta = {"adapter_id": aid, "base_model": base, "data_hash": split.data_hash, "attempt_id": attempt_id,
                    "question": "keep", "options": KEEP_OPTIONS, "config": tcfg.model_dump(), "metrics": metrics,
                    "quantized_base": quantized, "losses": losses}
            (adapter_dir / adapters.META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
            with catalog.transaction():
                catalog.execute(
                    "UPDATE judge_adapters SET path = ?, metrics_json = ?, status = 'ok', promoted = ?, "
                    "finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?",
                    (str(adapter_dir.relative_to(project.workspace)), json.dumps(metrics), int(promoted), attempt_id))
                catalog.insert("artifacts", {"kind": "judge_adapter", "operation_id": run_id,
                                             "path": str(adapter_dir.relative_to(project.workspace)),
                                             "step": tcfg.steps, "meta_json": json.dumps({"adapter_id": aid})})
    except BaseException:
        with catalog.transaction():
            catalog.execute("UPDATE judge_adapters SET status = 'failed' WHERE id = ? AND status = 'running'",
                            (attempt_id,))
        raise
    log.info("tune-judge: held-out kappa %.3f (base) -> %.3f, recorded verdicts %.3f, gain %.3f [%.3f, %.3f]: %s",
             before["kappa"], after["kappa"], incumbent["kappa"], gain.difference, gain.low, gain.high,
             "promoted" if promoted else "not promoted")
    return TuneJudgeResult(attempt_id, aid, adapter_dir, base, split.data_hash, balance, before, after, incumbent,
                           incumbent_info["policy"], gain, promoted, losses)


def _evaluate(project: Project, vlm, held_out: list[Example], run_id: int, label: str):
    """(agreement metrics, P(keep) per example) of ``vlm`` as it is now, recorded as one model call."""
    p_keep: list[float] = []
    with project.catalog.operation("tune_judge", model=vlm.model_id, parent_id=run_id,
                                   params={"evaluate": label, "image_ids": [e.image_id for e in held_out]}):
        for start in range(0, len(held_out), EVAL_CHUNK):
            requests = [request_for(project, e) for e in held_out[start:start + EVAL_CHUNK]]
            p_keep.extend(p[KEEP_OPTIONS[0]] for p in vlm.option_probabilities(requests, KEEP_OPTIONS))
    metrics = agreement(p_keep, [e.keep for e in held_out])
    log.info("tune-judge: %s: accuracy %.3f, kappa %.3f, reject P/R %.2f/%.2f, Brier %.3f, ECE %.3f", label,
             metrics["accuracy"], metrics["kappa"], metrics["reject_precision"], metrics["reject_recall"],
             metrics["brier"], metrics["ece"])
    return metrics, p_keep


def _unfinished_attempt(project: Project, base: str, data_hash: str):
    from flywheel.training.checkpoint import list_checkpoints

    rows = project.catalog.query("SELECT * FROM judge_adapters WHERE base_model = ? AND status != 'ok' "
                                 "ORDER BY id DESC LIMIT 1", (base,))
    if not rows:
        raise StageError(f"no unfinished tune-judge attempt for {base} to resume",
                         hint="run `flywheel tune-judge` without --resume to start one")
    row = rows[0]
    if row["data_hash"] != data_hash:
        raise StageError(f"the reviews changed since attempt {row['id']} started (its data hash differs), so "
                         "resuming it would train on a different set", hint="start a new attempt without --resume")
    tcfg = TuneJudgeConfig.model_validate(json.loads(row["config_json"])["tune_judge"])  # its own settings
    found = list_checkpoints(project.workspace / adapters.FOLDER / f"{row['id']:04d}")
    if not found:
        log.warning("tune-judge: attempt %d left no checkpoint; it starts again from step 0", row["id"])
    return row, tcfg, found[-1] if found else None
