"""flywheel tune-judge: the judge learns from human reviews and is promoted only when it agrees better.

The learning test plants a rule a tiny model can see in pixels: reviewers rejected every edit with a
large red patch and kept the rest. A tiny random Qwen2-VL (untrained: chance agreement) is fine-tuned
on the reviews of some sources and must agree with the reviews of sources it never saw.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flywheel.config import TuneJudgeConfig
from flywheel.errors import StageError
from flywheel.judge_tuning.dataset import load_examples, split_by_source, store_sides, stored_sides
from flywheel.judge_tuning.metrics import agreement, beats, kappa_gain_interval
from flywheel.project import init_project, open_project

SIDE = 112  # the tiny VLM's pixel budget: 8x8 patches, 16 vision tokens per image
REJECT_REASON = "a red patch covers the picture"
KEEP_REASON = "same character, clean edit"


# --- a project whose reviewers follow a pixel rule --------------------------------------------------
def _character(seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    a = np.zeros((SIDE, SIDE, 3), np.uint8)
    a[:] = r.integers(40, 200, 3)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    a[((yy - 56) / 30) ** 2 + ((xx - 56) / 22) ** 2 <= 1] = r.integers(60, 220, 3)  # the "character"
    return a


def _add(project, array: np.ndarray, kind: str, op: int | None = None, parent: int | None = None) -> int:
    from flywheel.images import phash, phash_hex, pixel_sha256

    image = Image.fromarray(array)
    sha, _ = project.store.put_image(image)
    with project.catalog.transaction():
        image_id = project.catalog.insert("images", {
            "sha256": sha, "pixel_sha256": pixel_sha256(image), "phash": phash_hex(phash(image)),
            "width": image.width, "height": image.height, "kind": kind, "operation_id": op})
        if parent is not None:
            project.catalog.insert("image_parents", {"image_id": image_id, "parent_id": parent, "role": "source"})
    return image_id


def review(project, image_id: int, decision: str, reason: str = "") -> None:
    project.catalog.insert("reviews", {"image_id": image_id, "decision": decision, "reason": reason,
                                       "reviewer": "tester"})


def build_reviewed_project(root: Path, sources: int = 10, edits: int = 8) -> Path:
    """``sources`` characters, ``edits`` tinted edits each; every second edit has a red patch and was rejected."""
    init_project(root, name="Test Character", trigger="fw_test")
    rng = np.random.default_rng(0)
    with open_project(root) as project:
        for s in range(sources):
            base = _character(s)
            source_id = _add(project, base, "source")
            for k in range(edits):
                edited = np.clip(base.astype(np.int16) + rng.integers(-60, 60, 3), 0, 255).astype(np.uint8)
                bad = k % 2 == 1
                if bad:
                    y0, x0 = rng.integers(0, SIDE - 72, 2)
                    edited[y0:y0 + 72, x0:x0 + 72] = (230, 20, 20)
                params = {"recipe": "forest", "prompt": "Change the background to a forest."}
                op = project.catalog.start_operation("enrich", model="composite", params=params)
                project.catalog.finish_operation(op, "ok", 1)
                image_id = _add(project, edited, "enriched", op, source_id)
                review(project, image_id, "rejected" if bad else "accepted", REJECT_REASON if bad else KEEP_REASON)
    return root


def record_verdicts(project, cfg, verdict_of) -> str:
    """Verdict rows for every reviewed image, as `flywheel judge` records them under ``cfg``'s current policy.

    ``verdict_of(example)`` says what the judge decided; returns the policy fingerprint.
    """
    from flywheel.judge_tuning.incumbent import current_policy

    policy = current_policy(project, cfg)
    with project.catalog.transaction():
        for e in load_examples(project):
            project.catalog.insert("verdicts", {"image_id": e.image_id, "verdict": verdict_of(e), "reason": "planted",
                                                "policy_json": json.dumps({"fingerprint": policy})})
    return policy


def misses_the_patch(e) -> str:
    """A pixel judge that does not see red patches: it accepts everything (kappa 0 against the reviewers)."""
    return "accepted"


def tuning_config(project, vlm_dir: Path, **overrides):
    cfg = project.config.model_copy(deep=True)
    cfg.models.judge = str(vlm_dir)
    cfg.models.device = "cpu"
    cfg.models.vlm_max_pixels = SIDE * SIDE
    settings = dict(steps=150, batch_size=8, learning_rate=3e-3, dropout=0.0, warmup_steps=5,
                    gradient_checkpointing=False, checkpoint_every=75, held_out_fraction=0.34)
    cfg.tune_judge = TuneJudgeConfig(**{**settings, **overrides})
    return cfg


@pytest.fixture(scope="module")
def learnable_vlm_dir(tmp_path_factory) -> Path:
    """The tiny Qwen2-VL with weights initialised at std 0.2 instead of 0.02.

    At 0.02 a 64-wide random model's logits cannot leave ~uniform (final RMSNorm x tiny lm_head rows),
    so no adapter could make it confident; real checkpoints have no such ceiling.
    """
    import torch
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from flywheel.testing.tiny.vlm import build_tiny_qwen2_vl

    base = build_tiny_qwen2_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2-vl")
    config = Qwen2VLConfig.from_pretrained(base)
    config.text_config.initializer_range = 0.2
    config.vision_config.initializer_range = 0.2
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "learnable-qwen2-vl"
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    AutoProcessor.from_pretrained(base).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reviewed_root(tmp_path_factory) -> Path:
    return build_reviewed_project(tmp_path_factory.mktemp("tj") / "proj")


@pytest.fixture(scope="module")
def tuned(reviewed_root, learnable_vlm_dir, tmp_path_factory):
    """(project root, TuneJudgeResult) of one tuning run, shared by the tests that read it."""
    from flywheel.tune_judge import tune_judge

    root = tmp_path_factory.mktemp("tuned") / "proj"
    shutil.copytree(reviewed_root, root)
    with open_project(root) as project:
        cfg = tuning_config(project, learnable_vlm_dir)
        record_verdicts(project, cfg, misses_the_patch)
        result = tune_judge(project, cfg)
    return root, result


def _copy(root: Path, tmp_path: Path) -> Path:
    shutil.copytree(root, tmp_path / "copy")
    return tmp_path / "copy"


# --- the SFT set --------------------------------------------------------------------------------------
def test_examples_follow_the_newest_human_decision_and_the_judges_reference(project):
    src = _add(project, _character(0), "source")
    params = {"recipe": "beach", "prompt": "Put her on a beach."}
    op = project.catalog.start_operation("enrich", model="m", params=params)
    ids = [_add(project, _character(10 + i), "enriched", op, src) for i in range(5)]
    review(project, ids[0], "accepted", "good")
    review(project, ids[1], "rejected", "wrong face")
    review(project, ids[1], "cleared")  # undo: no human decision any more
    review(project, ids[2], "accepted")
    review(project, ids[2], "rejected", "changed my mind")  # newest wins
    review(project, ids[3], "skipped")
    examples = {e.image_id: e for e in load_examples(project)}
    assert sorted(examples) == [ids[0], ids[2]]
    assert examples[ids[0]].keep and not examples[ids[2]].keep
    assert examples[ids[2]].reason == "changed my mind"
    src_sha = project.catalog.query("SELECT sha256 FROM images WHERE id = ?", (src,))[0][0]
    assert examples[ids[0]].reference_sha256 == src_sha
    assert examples[ids[0]].prompt == "Put her on a beach." and examples[ids[0]].group == f"source:{src}"
    # A generated image has no source: the judge compares it with the first source; its prompt is its group.
    gen = project.catalog.start_operation("generate", model="tiny", params={"prompt": "fw_test on a boat"})
    synth = _add(project, _character(30), "synthetic", gen)
    review(project, synth, "rejected", "not her")
    e = next(x for x in load_examples(project) if x.image_id == synth)
    assert (e.reference_sha256, e.group, e.kind) == (src_sha, "prompt:fw_test on a boat", "synthetic")


def test_split_keeps_each_source_on_one_side_reports_balance_and_hashes_the_data(reviewed_root, tmp_path):
    root = _copy(reviewed_root, tmp_path)
    with open_project(root) as project:
        examples = load_examples(project)
        split = split_by_source(examples, 0.34, seed=0)
        assert {e.group for e in split.train}.isdisjoint({e.group for e in split.held_out})
        assert len(split.train) + len(split.held_out) == len(examples) == 80
        assert 0.25 <= len(split.held_out) / 80 <= 0.45
        assert split_by_source(examples, 0.34, seed=0).held_out == split.held_out  # deterministic
        balance = split.balance()
        assert balance["held_out"]["keep"] + balance["held_out"]["reject"] == len(split.held_out)
        assert balance["train"]["reject"] == sum(1 for e in split.train if not e.keep)
        # A changed human decision is different training data: the hash says so.
        review(project, split.train[0].image_id, "rejected" if split.train[0].keep else "accepted", "fixed")
        assert split_by_source(load_examples(project), 0.34, seed=0).data_hash != split.data_hash


def test_too_few_reviews_or_one_source_is_an_error_that_says_what_to_do(project):
    src = _add(project, _character(0), "source")
    ids = [_add(project, _character(20 + i), "enriched", None, src) for i in range(3)]
    for i in ids:
        review(project, i, "accepted")
    with pytest.raises(StageError, match="at least 8") as err:
        split_by_source(load_examples(project), 0.25, 0, min_examples=8)
    assert "flywheel review" in err.value.hint
    with pytest.raises(StageError, match="one source"):
        split_by_source(load_examples(project), 0.25, 0, min_examples=2)


def test_agreement_metrics_match_hand_computed_values():
    # 4 keeps, 4 rejects; the judge keeps 3 of the keeps and 1 of the rejects.
    human = [True] * 4 + [False] * 4
    p = [0.9, 0.8, 0.7, 0.2, 0.6, 0.1, 0.3, 0.4]
    m = agreement(p, human)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["kappa"] == pytest.approx(0.5)  # chance agreement 0.5
    assert m["reject_precision"] == pytest.approx(3 / 4) and m["reject_recall"] == pytest.approx(3 / 4)
    assert m["brier"] == pytest.approx(np.mean([(x - h) ** 2 for x, h in zip(p, human)]))
    assert agreement([0.9] * 8, human)["kappa"] == 0.0  # "keep everything" is no better than chance
    assert beats({"kappa": 0.5, "accuracy": 0.7}, {"kappa": 0.4, "accuracy": 0.9})
    assert beats({"kappa": 0.5, "accuracy": 0.8}, {"kappa": 0.5, "accuracy": 0.7})
    assert not beats({"kappa": 0.5, "accuracy": 0.7}, {"kappa": 0.5, "accuracy": 0.7})  # a tie keeps the incumbent


def test_kappa_gain_interval_resamples_groups_and_needs_more_than_a_point_estimate():
    human = [True, False] * 8
    groups = [f"source:{i // 2}" for i in range(16)]  # 8 sources, one keep and one reject each
    perfect, keep_all = [0.9, 0.1] * 8, [0.9] * 16
    gain = kappa_gain_interval(perfect, keep_all, human, groups)
    assert (gain.baseline, gain.candidate, gain.n) == (0.0, 1.0, 8)
    assert gain.low == gain.high == 1.0 and gain.verdict == "better"  # every resample: kappa 1 vs 0
    same = kappa_gain_interval(perfect, perfect, human, groups)
    assert (same.difference, same.low, same.high) == (0.0, 0.0, 0.0) and same.verdict != "better"
    # Two sources: the candidate is right on A and keeps all of B; the incumbent keeps all of A and errs once on B.
    # Its pooled kappa is higher (a point-estimate win), but resampling B twice says it can be worse.
    human = [True, False, True, False] * 2
    groups = ["A"] * 4 + ["B"] * 4
    candidate = [0.9, 0.1, 0.9, 0.1] + [0.9] * 4
    incumbent = [0.9] * 4 + [0.9, 0.1, 0.1, 0.1]
    gain = kappa_gain_interval(candidate, incumbent, human, groups)
    assert gain.difference > 0 and agreement(candidate, human)["kappa"] > agreement(incumbent, human)["kappa"]
    assert gain.low < 0 < gain.high and gain.verdict == "no_significant_change" and gain.n == 2


def test_held_out_groups_are_stored_once_and_new_sources_never_move_old_ones(reviewed_root, tmp_path):
    from flywheel.judge_tuning.dataset import _hash_side

    root = _copy(reviewed_root, tmp_path)
    with open_project(root) as project:
        first = split_by_source(load_examples(project), 0.34, seed=0, stored=stored_sides(project))
        assert first.new_groups == first.sides and len(first.sides) == 10  # nothing stored yet
        with project.catalog.transaction():
            store_sides(project, first, None)
        stored = stored_sides(project)
        assert stored == first.sides
        # Three new sources are reviewed; the next attempt uses another seed and fraction.
        new_sources = []
        for s in range(10, 13):
            source_id = _add(project, _character(s), "source")
            new_sources.append(f"source:{source_id}")
            for k in range(2):
                edited = np.clip(_character(s).astype(np.int16) + 20 * (k + 1), 0, 255).astype(np.uint8)
                review(project, _add(project, edited, "enriched", None, source_id), "accepted" if k else "rejected")
        later = split_by_source(load_examples(project), 0.5, seed=9, stored=stored_sides(project))
        assert {g: later.sides[g] for g in stored} == stored  # no stored group moved
        assert {e.image_id for e in first.held_out} <= {e.image_id for e in later.held_out}
        assert sorted(later.new_groups) == sorted(new_sources)
        assert all(side == _hash_side(g, 9, 0.5) for g, side in later.new_groups.items())
        with project.catalog.transaction():
            store_sides(project, later, None)
            store_sides(project, later, None)  # idempotent: a side is written once
        assert len(stored_sides(project)) == 13
        # Every held-out group's reviews cleared: nothing left to measure on, said plainly.
        held_groups = {e.group for e in later.held_out}
        for e in later.held_out:
            review(project, e.image_id, "cleared")
        with pytest.raises(StageError, match=f"none of today's {13 - len(held_groups)} review groups in held_out"):
            split_by_source(load_examples(project), 0.34, seed=0, stored=stored_sides(project))


def test_the_incumbent_is_the_newest_verdict_under_todays_policy_and_unjudged_images_are_an_error(project):
    from flywheel.judge_tuning.incumbent import current_policy, recorded_verdicts

    src = _add(project, _character(0), "source")
    ids = [_add(project, _character(20 + i), "enriched", None, src) for i in range(3)]
    cfg = project.config.model_copy(deep=True)
    with pytest.raises(StageError, match="3 held-out reviewed image") as err:
        recorded_verdicts(project, cfg, ids)
    assert "flywheel judge" in err.value.hint
    policy = current_policy(project, cfg)
    old = {"fingerprint": "an-earlier-policy"}
    rows = [(ids[0], "rejected", old), (ids[0], "accepted", {"fingerprint": policy}), (ids[0], "rejected", old),
            (ids[1], "needs_review", {"fingerprint": policy}), (ids[2], "rejected", old)]
    for image_id, verdict, pol in rows:
        project.catalog.insert("verdicts", {"image_id": image_id, "verdict": verdict, "reason": "",
                                            "policy_json": json.dumps(pol)})
    p_keep, info = recorded_verdicts(project, cfg, ids)
    # #1: today's policy wins over a newer row of an earlier one; #3 was only judged under an earlier policy.
    assert p_keep == [1.0, 0.5, 0.0] and info["stale"] == 1 and info["policy"] == policy
    cfg.judge.max_face_distance = 0.55  # another threshold is another policy: every verdict is now stale
    assert recorded_verdicts(project, cfg, ids)[1]["stale"] == 3


def test_training_examples_are_the_judges_own_question_with_loss_only_on_the_answer(reviewed_root, learnable_vlm_dir):
    from flywheel.config import ModelsConfig
    from flywheel.judge_tuning.dataset import answer_for, request_for
    from flywheel.judge_tuning.train import encode
    from flywheel.models import load_vlm

    vlm = load_vlm(str(learnable_vlm_dir), ModelsConfig(device="cpu", vlm_max_pixels=SIDE * SIDE))
    with open_project(reviewed_root) as project:
        example = next(e for e in load_examples(project) if not e.keep)
        request = request_for(project, example)
        item = encode(vlm, request, answer_for(example))
        asked = vlm.encode([request])["input_ids"][0]  # what option_probabilities feeds the model
    n = asked.shape[0]
    assert item["input_ids"][0, :n].tolist() == asked.tolist()
    assert (item["labels"][0, :n] == -100).all()
    answer = vlm.processor.tokenizer.decode(item["labels"][0, n:])
    assert answer == 'no {"keep": false, "reasons": "' + REJECT_REASON + '"}<|im_end|>'
    assert "Change the background to a forest." in request.text and len(request.images) == 2


# --- learning, promotion, reload, resume -----------------------------------------------------------------
def test_tuned_judge_learns_the_reviewers_rule_and_is_promoted(tuned):
    root, r = tuned
    assert r.before["kappa"] < 0.3 and r.before["accuracy"] < 0.65  # the untrained judge: about chance
    assert r.after["kappa"] >= 0.6 and r.after["accuracy"] >= 0.8, r.after
    assert r.after["brier"] < r.before["brier"]
    assert r.losses[-1]["loss"] < r.losses[0]["loss"] / 5
    # The incumbent is the judge's recorded verdicts (it missed every patch), not the untrained VLM.
    assert r.incumbent["kappa"] == 0.0 and r.incumbent["verdicts"] == {"accepted": 32, "needs_review": 0, "rejected": 0}
    assert r.incumbent["stale"] == 0 and r.incumbent_policy == r.incumbent["policy"]
    # Promoted because the whole bootstrap interval of the kappa gain (over 4 held-out sources) is above 0.
    assert r.gain.n == 4 and r.gain.difference == pytest.approx(r.after["kappa"]) and r.gain.low > 0
    assert r.promoted
    assert (r.adapter_path / "adapter_model.safetensors").is_file()
    assert not list(r.adapter_path.glob("*.bin"))
    meta = json.loads((r.adapter_path / "adapter_meta.json").read_text())
    assert meta["data_hash"] == r.data_hash and meta["base_model"] == r.base_model
    assert meta["metrics"]["after"]["kappa"] == r.after["kappa"]
    with open_project(root) as project:
        row = project.catalog.query("SELECT * FROM judge_adapters")[0]
        assert (row["status"], row["promoted"], row["data_hash"]) == ("ok", 1, r.data_hash)
        gain = json.loads(row["metrics_json"])["kappa_gain"]
        assert (gain["low"], gain["high"], gain["groups"], gain["confidence"]) == (r.gain.low, r.gain.high, 4, 0.95)
        sides = project.catalog.query("SELECT group_key, side, attempt_id FROM judge_split_groups")
        assert len(sides) == 10 and {x["attempt_id"] for x in sides} == {1}
        held_groups = {x["group_key"] for x in sides if x["side"] == "held_out"}
        assert held_groups == set(json.loads(row["config_json"])["held_out_groups"]) and len(held_groups) == 4
        assert project.workspace / row["path"] == r.adapter_path
        ops = project.catalog.query("SELECT kind, status, params_json FROM operations WHERE stage = 'tune_judge'")
        assert {o["status"] for o in ops} == {"ok"} and len(ops) == 4  # run, before, train, after
        assert project.catalog.query("SELECT COUNT(*) FROM reviews")[0][0] == 80  # reviews only read


def test_saved_adapter_reloads_and_answers_as_it_did_when_measured(tuned):
    from flywheel.judge_tuning import adapters
    from flywheel.judge_tuning.dataset import request_for
    from flywheel.judge_tuning.prompt import KEEP_OPTIONS
    from flywheel.models import load_vlm

    root, r = tuned
    with open_project(root) as project:
        cfg = tuning_config(project, Path(r.base_model))
        ref = adapters.resolve(project, "active", r.base_model)
        assert ref is not None and ref.adapter_id == r.adapter_id
        vlm = load_vlm(cfg.models.judge, cfg.models)
        adapters.attach(vlm, ref)
        assert vlm.model_id.endswith("+" + r.adapter_id) and vlm.params()["adapter"] == r.adapter_id
        held = {e.image_id: e for e in load_examples(project)}
        measured = json.loads(project.catalog.query("SELECT metrics_json FROM judge_adapters")[0][0])["held_out"]
        probs = vlm.option_probabilities([request_for(project, held[m["image_id"]]) for m in measured], KEEP_OPTIONS)
    assert [p["yes"] for p in probs] == pytest.approx([m["p_keep_after"] for m in measured], abs=1e-4)


def test_adapters_for_another_base_or_without_safetensors_are_refused(tuned, tmp_path):
    from flywheel.errors import ConfigError, ModelLoadError
    from flywheel.judge_tuning import adapters
    from flywheel.models import load_vlm

    root, r = tuned
    with open_project(root) as project:
        with pytest.raises(ConfigError, match="was trained on") as err:
            adapters.resolve(project, str(r.adapter_path), "qwen2-vl-7b")
        assert "[models] judge" in err.value.hint
        assert adapters.resolve(project, "active", "qwen2-vl-7b") is None  # nothing tuned for that base
        assert adapters.resolve(project, "none", r.base_model) is None
        pickled = tmp_path / "pickled"
        shutil.copytree(r.adapter_path, pickled)
        (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
        vlm = load_vlm(r.base_model, tuning_config(project, Path(r.base_model)).models)
        with pytest.raises(ModelLoadError, match="no adapter_model.safetensors"):
            adapters.attach(vlm, adapters.resolve(project, str(pickled), r.base_model))
        assert vlm.adapter is None and vlm.model_id == r.base_model


def test_a_judge_that_only_matches_the_base_vlm_zero_shot_is_not_promoted_over_recorded_verdicts(
        reviewed_root, learnable_vlm_dir, tmp_path):
    from flywheel.tune_judge import tune_judge

    with open_project(_copy(reviewed_root, tmp_path)) as project:
        cfg = tuning_config(project, learnable_vlm_dir, steps=2)
        # Today's judge catches the patch on three of every four rejected edits (kappa 0.75 on the reviews).
        rejected = sorted(e.image_id for e in load_examples(project) if not e.keep)
        missed = set(rejected[::4])
        record_verdicts(project, cfg, lambda e: "accepted" if e.keep or e.image_id in missed else "rejected")
        r = tune_judge(project, cfg)
        measured = json.loads(project.catalog.query("SELECT metrics_json FROM judge_adapters")[0][0])["held_out"]
    # Two small steps leave the base VLM's zero-shot answers as they were: that is all this judge knows.
    assert max(abs(m["p_keep_after"] - m["p_keep_before"]) for m in measured) < 0.05
    assert r.incumbent["kappa"] > 0.5 and r.after["kappa"] < 0.3
    assert r.gain.high < 0 and not r.promoted  # the old rule compared it with the base VLM alone


def test_later_attempts_reuse_the_stored_held_out_groups_and_compare_with_todays_verdicts(tuned, tmp_path):
    from flywheel.judge_tuning import adapters
    from flywheel.tune_judge import tune_judge

    root, first = tuned
    with open_project(_copy(root, tmp_path)) as project:
        first_held = {m["image_id"] for m in json.loads(project.catalog.query(
            "SELECT metrics_json FROM judge_adapters")[0][0])["held_out"]}
        # Another split seed and fraction would pick other groups; the stored ones are kept.
        cfg = tuning_config(project, Path(first.base_model), steps=2, split_seed=7, held_out_fraction=0.6)
        # With the promoted adapter the judge decides differently today; it was re-run and agrees with the reviewers.
        policy = record_verdicts(project, cfg, lambda e: "accepted" if e.keep else "rejected")
        r = tune_judge(project, cfg)
        assert r.incumbent_policy == policy != first.incumbent_policy and r.incumbent["stale"] == 0
        assert {m["image_id"] for m in json.loads(project.catalog.query(
            "SELECT metrics_json FROM judge_adapters WHERE id = 2")[0][0])["held_out"]} == first_held
        assert r.incumbent["kappa"] == 1.0 and not r.promoted
        rows = project.catalog.query("SELECT id, promoted, status FROM judge_adapters ORDER BY id")
        assert [(x["promoted"], x["status"]) for x in rows] == [(1, "ok"), (0, "ok")]
        assert adapters.resolve(project, "active", first.base_model).adapter_id == first.adapter_id
        assert project.catalog.query("SELECT COUNT(*) FROM judge_split_groups")[0][0] == 10  # nothing added


def test_resume_continues_exactly_where_the_attempt_stopped(reviewed_root, learnable_vlm_dir, tmp_path):
    from flywheel.tune_judge import tune_judge

    settings = dict(steps=4, checkpoint_every=2, batch_size=4)
    with open_project(_copy(reviewed_root, tmp_path / "a")) as project:
        cfg = tuning_config(project, learnable_vlm_dir, **settings)
        record_verdicts(project, cfg, misses_the_patch)
        straight = tune_judge(project, cfg)

    def stop_after_step_3(done, total, label=""):
        if done == 3:
            raise KeyboardInterrupt

    with open_project(_copy(reviewed_root, tmp_path / "b")) as project:
        cfg = tuning_config(project, learnable_vlm_dir, **settings)
        record_verdicts(project, cfg, misses_the_patch)
        with pytest.raises(KeyboardInterrupt):
            tune_judge(project, cfg, progress=stop_after_step_3)
        assert project.catalog.query("SELECT status FROM judge_adapters")[0][0] == "failed"
        resumed = tune_judge(project, cfg, resume=True)
        assert resumed.attempt_id == 1
    assert [x["loss"] for x in resumed.losses] == pytest.approx([x["loss"] for x in straight.losses], rel=1e-5)
    assert resumed.after["mean_p_keep"] == pytest.approx(straight.after["mean_p_keep"], rel=1e-5)


# --- command line ---------------------------------------------------------------------------------------
def _point_config_at(root: Path, vlm_dir: Path) -> None:
    """Edit the project's flywheel.toml as a user would: the judge is the tiny folder, on the CPU."""
    path = root / "flywheel.toml"
    text = path.read_text()
    for old, new in (('# judge = "qwen3-vl-4b"', f'judge = "{vlm_dir}"'), ('device = "auto"', 'device = "cpu"'),
                     ("vlm_max_pixels = 1_048_576", f"vlm_max_pixels = {SIDE * SIDE}")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path.write_text(text)


def test_cli_tune_judge_reports_before_after_and_the_promotion_decision(reviewed_root, learnable_vlm_dir, tmp_path):
    from click.testing import CliRunner

    from flywheel.cli import main

    root = _copy(reviewed_root, tmp_path)
    _point_config_at(root, learnable_vlm_dir)
    out = CliRunner().invoke(main, ["-C", str(root), "tune-judge", "--steps", "2"])
    assert out.exit_code == 1 and "have no judge verdict" in out.output
    assert "Hint: run `flywheel judge` first" in out.output
    with open_project(root) as project:
        policy = record_verdicts(project, project.config, misses_the_patch)
    out = CliRunner().invoke(main, ["-C", str(root), "tune-judge", "--steps", "2"])
    assert out.exit_code == 0, out.output
    counts = re.findall(r"(train|held_out) *: (\d+) keep / (\d+) reject from (\d+) source group", out.output)
    assert [c[0] for c in counts] == ["train", "held_out"]
    assert sum(int(k) + int(r) for _, k, r, _ in counts) == 80 and sum(int(g) for *_, g in counts) == 10
    assert "kappa" in out.output and "judge-lora-1-" in out.output
    assert f"kappa gain over the judge's recorded verdicts (policy {policy}): " in out.output
    assert "95% interval [" in out.output and re.search(r"over \d+ held-out group\(s\)", out.output)
    # Two steps at the default learning rate change nothing measurable: it must not replace today's judge.
    assert "not promoted: its kappa gain over the recorded verdicts is not above zero with 95% confidence" \
        in out.output
    empty = tmp_path / "empty"
    init_project(empty, name="Empty", trigger="fw_empty")
    _point_config_at(empty, learnable_vlm_dir)
    out = CliRunner().invoke(main, ["-C", str(empty), "tune-judge"])
    assert out.exit_code == 1 and "at least 8" in out.output and "Hint: review more images" in out.output


def test_judge_uses_the_active_adapter_names_it_in_every_score_and_can_be_told_not_to(tuned, tmp_path):
    from click.testing import CliRunner

    from flywheel.cli import main
    from flywheel.judge import judge
    from flywheel.judge_tuning import adapters
    from flywheel.judge_tuning.dataset import request_for
    from flywheel.judge_tuning.prompt import KEEP_OPTIONS
    from flywheel.models import load_vlm

    _, r = tuned
    # A small project (8 new edits) with the tuned adapter registered as tune-judge registers a promoted one.
    root = build_reviewed_project(tmp_path / "small", sources=2, edits=4)
    tuned_id = f"{r.base_model}+{r.adapter_id}"
    with open_project(root) as project:
        shutil.copytree(r.adapter_path, project.workspace / "judge_adapters" / "0001" / "adapter")
        project.catalog.insert("judge_adapters", {"base_model": r.base_model, "path": "judge_adapters/0001/adapter",
                                                  "data_hash": r.data_hash, "status": "ok", "promoted": 1})
        cfg = tuning_config(project, Path(r.base_model))
        cfg.judge.structured_verdict = False  # the keep question is what this test is about
        result = judge(project, cfg)  # no --judge-adapter: the active one
        run = project.catalog.query("SELECT model FROM operations WHERE stage = 'judge' AND kind = 'stage_run'")
        assert [x["model"] for x in run] == [tuned_id]
        keep = {x["image_id"]: x["value"] for x in project.catalog.query(
            "SELECT image_id, value FROM scores WHERE criterion = 'keep' AND scorer = ?", (f"vlm_pairwise:{tuned_id}",))}
        assert len(keep) == len(result.verdicts) == 8
        assert not project.catalog.query("SELECT 1 FROM scores WHERE scorer LIKE 'vlm%' AND scorer NOT LIKE ?",
                                         (f"%+{r.adapter_id}",))
        # The judge asks exactly the question training encodes (same reference, recipe text, images).
        vlm = load_vlm(cfg.models.judge, cfg.models)
        adapters.attach(vlm, adapters.resolve(project, str(r.adapter_path), r.base_model))
        examples = load_examples(project)
        expected = vlm.option_probabilities([request_for(project, e) for e in examples], KEEP_OPTIONS)
        assert [keep[e.image_id] for e in examples] == pytest.approx([p["yes"] for p in expected], abs=1e-4)
        # The learned rule carries over to new images, and P(keep) is a policy check with its reason.
        patched = [e.image_id for e in examples if not e.keep]
        assert sum(keep[i] < 0.5 for i in patched) >= 3
        verdicts = {v[0]: (v[1], v[2]) for v in result.verdicts}
        dropped = [i for i, p in keep.items() if p < cfg.judge.min_keep_prob]
        assert all(verdicts[i][0] == "rejected" and "tuned judge: P(keep)" in verdicts[i][1] for i in dropped)
    _point_config_at(root, Path(r.base_model))
    out = CliRunner().invoke(main, ["-C", str(root), "judge", "--judge-adapter", "none"])
    assert out.exit_code == 0, out.output
    with open_project(root) as project:
        plain = project.catalog.query("SELECT model FROM operations WHERE stage = 'judge' AND kind = 'stage_run' "
                                      "ORDER BY id DESC LIMIT 1")[0]["model"]
        assert plain == r.base_model
        assert project.catalog.query("SELECT COUNT(*) FROM scores WHERE criterion = 'keep'")[0][0] == 8  # none new
        assert project.catalog.query("SELECT COUNT(*) FROM verdicts")[0][0] == 16  # old verdicts kept
