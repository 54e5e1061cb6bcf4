"""flywheel calibrate: the judge's checks against human decisions, counted by hand on 8 images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flywheel.calibrate import calibrate, render
from flywheel.errors import StageError

# Eight edits of one source. Humans kept the first four and rejected the last four.
KEPT = [True] * 4 + [False] * 4
P_SAME = [0.9, 0.85, 0.7, 0.45, 0.65, 0.3, 0.25, 0.1]  # VLM P(same character); pass when >= 0.5
FACE = [0.3, 0.4, 0.5, 0.7, 0.35, 0.8, 0.9, None]  # dlib distance; pass when <= 0.6; the last has no face


def _scripted_project(project, add_image) -> list[int]:
    """Scores, verdicts and reviews written as judge and review write them (older rows superseded)."""
    rng = np.random.default_rng(0)
    src = add_image(Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)))
    ids = [add_image(Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)), kind="enriched", parent=src,
                     params={"prompt": "Put her on a beach."}) for _ in range(9)]
    cat = project.catalog
    with cat.transaction():
        cat.insert("scores", {"image_id": ids[3], "criterion": "identity", "scorer": "vlm_pairwise:tiny",
                              "value": 0.99})  # superseded by the newer row below
        for i, image_id in enumerate(ids[:8]):
            cat.insert("scores", {"image_id": image_id, "criterion": "identity", "scorer": "vlm_pairwise:tiny",
                                  "value": P_SAME[i]})
            cat.insert("scores", {"image_id": image_id, "criterion": "identity", "scorer": "face:dlib_resnet_v1",
                                  "value": FACE[i]})
            cat.insert("verdicts", {"image_id": image_id, "verdict": "rejected" if P_SAME[i] < 0.5 else "accepted",
                                    "reason": "scripted", "policy_json": "{}"})
        cat.insert("scores", {"image_id": ids[8], "criterion": "identity", "scorer": "vlm_pairwise:tiny", "value": 0.0})
        cat.insert("reviews", {"image_id": ids[4], "decision": "accepted", "reviewer": "t"})  # changed later
        for image_id, kept in zip(ids[:8], KEPT):
            cat.insert("reviews", {"image_id": image_id, "decision": "accepted" if kept else "rejected",
                                   "reviewer": "t"})
        cat.insert("reviews", {"image_id": ids[8], "decision": "skipped", "reviewer": "t"})  # not a decision
    return ids


def test_calibration_numbers_match_a_hand_count(project, add_image):
    _scripted_project(project, add_image)
    report = calibrate(project)
    assert (report.decisions, report.kept) == (8, 4)
    by_key = {c.check.key: c for c in report.checks}
    assert sorted(by_key) == ["max_face_distance", "min_same_character_prob"]

    vlm = by_key["min_same_character_prob"]
    # At 0.5 the VLM passes images 1-3 and 5: it wrongly keeps #5 and wrongly rejects #4 -> 6/8 agree.
    assert vlm.n == 8 and vlm.threshold == 0.5
    assert vlm.current["agreement"] == pytest.approx(6 / 8)
    assert vlm.current["kappa"] == pytest.approx(0.5)  # chance agreement 0.5
    assert vlm.current["reject_precision"] == pytest.approx(3 / 4) and vlm.current["reject_recall"] == pytest.approx(3 / 4)
    # 0.375 (between 0.3 and 0.45) and 0.675 both reach 7/8, kappa 0.75; 0.375 is nearer the configured 0.5.
    assert vlm.best_threshold == pytest.approx(0.375)
    assert vlm.best["agreement"] == pytest.approx(7 / 8) and vlm.best["kappa"] == pytest.approx(0.75)
    assert [(b["n"], b["kept"]) for b in vlm.reliability] == [(1, 0), (2, 0), (1, 1), (2, 1), (2, 2)]
    assert [b["low"] for b in vlm.reliability] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])

    face = by_key["max_face_distance"]
    # Image 8 has no face: 7 images, 4 kept. At 0.6 it keeps 1, 2, 3, 5: 5/7 agree, chance 25/49.
    assert (face.n, face.human_keep) == (7, 4)
    assert face.current["agreement"] == pytest.approx(5 / 7)
    assert face.current["kappa"] == pytest.approx(10 / 24)
    assert face.current["reject_precision"] == pytest.approx(2 / 3) and face.current["reject_recall"] == pytest.approx(2 / 3)
    # 0.75 keeps 1-5: 6/7 agree, chance 26/49, kappa 16/23.
    assert face.best_threshold == pytest.approx(0.75) and face.best["kappa"] == pytest.approx(16 / 23)
    assert [(b["n"], b["kept"]) for b in face.reliability] == [(3, 2), (1, 1), (0, 0), (1, 1), (2, 0)]

    assert report.verdicts["agreement"] == pytest.approx(6 / 8) and report.verdicts["kappa"] == pytest.approx(0.5)
    # Maximising agreement instead picks the same thresholds here; a tie is broken by kappa.
    assert {c.check.key: c.best_threshold for c in calibrate(project, objective="agreement").checks} == \
        pytest.approx({"max_face_distance": 0.75, "min_same_character_prob": 0.375})


def test_cli_prints_the_suggestion_and_never_changes_the_config(project, add_image):
    from click.testing import CliRunner

    from flywheel.cli import main

    _scripted_project(project, add_image)
    toml = (project.root / "flywheel.toml").read_bytes()
    scores = project.catalog.query("SELECT COUNT(*) FROM scores")[0][0]
    out = CliRunner().invoke(main, ["-C", str(project.root), "calibrate"])
    assert out.exit_code == 0, out.output
    assert "calibration against 8 human decisions (4 kept, 4 rejected)" in out.output
    assert "suggestion: set [judge] max_face_distance = 0.75 in flywheel.toml" in out.output
    assert "suggestion: set [judge] min_same_character_prob = 0.375 in flywheel.toml" in out.output
    assert "at min_same_character_prob = 0.5: agreement 0.750, kappa 0.500" in out.output
    assert "2     2  1.00 ####################" in out.output  # the top P(same) bin: both kept
    assert (project.root / "flywheel.toml").read_bytes() == toml
    assert project.catalog.query("SELECT COUNT(*) FROM scores")[0][0] == scores


def test_no_reviews_is_an_error_with_what_to_do_and_no_scores_says_judge_first(project, add_image):
    with pytest.raises(StageError, match="no human decisions") as err:
        calibrate(project)
    assert "flywheel review" in err.value.hint
    rng = np.random.default_rng(1)
    src = add_image(Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)))
    edit = add_image(Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)), kind="enriched", parent=src)
    project.catalog.insert("reviews", {"image_id": edit, "decision": "rejected", "reviewer": "t"})
    report = calibrate(project)
    assert report.checks == [] and report.verdicts is None
    assert render(report)[-1] == "no reviewed image has a score from a thresholded check yet: run `flywheel judge`"


def test_the_copy_check_is_calibrated_in_its_direction_too_close_fails(project, add_image):
    rng = np.random.default_rng(2)
    src = add_image(Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)))
    ids = [add_image(Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)), kind="enriched", parent=src)
           for _ in range(4)]
    # Structure SSIM to the nearest source; the two near copies were rejected. Passing means SSIM <= 0.9.
    for image_id, ssim, decision in zip(ids, [0.95, 0.97, 0.5, 0.92], ["rejected", "rejected", "accepted", "accepted"]):
        project.catalog.insert("scores", {"image_id": image_id, "criterion": "copy", "scorer": "pixels:ssim",
                                          "value": ssim})
        project.catalog.insert("reviews", {"image_id": image_id, "decision": decision, "reviewer": "t"})
    (copy,) = calibrate(project).checks
    assert copy.check.key == "max_copy_similarity" and copy.threshold == 0.9
    # At 0.9 only the 0.5 image passes: 3/4 agree, chance 0.5, kappa 0.5; 0.935 separates them all.
    assert copy.current["agreement"] == pytest.approx(3 / 4) and copy.current["kappa"] == pytest.approx(0.5)
    assert copy.current["reject_precision"] == pytest.approx(2 / 3) and copy.current["reject_recall"] == 1.0
    assert copy.best_threshold == pytest.approx(0.935) and copy.best["kappa"] == pytest.approx(1.0)
