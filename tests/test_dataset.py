"""Freezing a dataset version: who is in, with which caption, and that it is recorded atomically."""

from __future__ import annotations

import pytest
from PIL import Image

from flywheel.dataset import freeze_dataset, load_dataset
from flywheel.errors import StageError


def add_image(project, kind: str, round: int = 0, *, color=(10, 20, 30), size=(64, 64)) -> int:
    sha, _ = project.store.put_image(Image.new("RGB", size, color))
    return project.catalog.insert("images", {
        "sha256": sha, "pixel_sha256": sha, "phash": "0" * 16, "width": size[0], "height": size[1],
        "kind": kind, "round": round,
    })


def verdict(project, image_id: int, v: str) -> None:
    project.catalog.insert("verdicts", {"image_id": image_id, "verdict": v, "reason": "test"})


def review(project, image_id: int, d: str) -> None:
    project.catalog.insert("reviews", {"image_id": image_id, "decision": d, "reviewer": "tester"})


def caption(project, image_id: int, text: str) -> int:
    return project.catalog.insert("captions", {"image_id": image_id, "text": text, "source": "vlm"})


def test_membership_follows_human_over_machine_and_newest_rows(project):
    src = add_image(project, "source", color=(1, 1, 1))
    rejected_src = add_image(project, "source", color=(2, 2, 2))
    review(project, rejected_src, "rejected")  # a human left this source out (the Sources tab of the review page)
    kept_src = add_image(project, "source", color=(2, 3, 4))
    verdict(project, kept_src, "rejected")  # ...but the machine never does
    machine_ok = add_image(project, "enriched", color=(3, 3, 3))
    verdict(project, machine_ok, "rejected")
    verdict(project, machine_ok, "accepted")  # newest verdict wins
    human_no = add_image(project, "enriched", color=(4, 4, 4))
    verdict(project, human_no, "accepted")
    review(project, human_no, "rejected")  # human beats machine
    human_yes = add_image(project, "enriched", color=(5, 5, 5))
    verdict(project, human_yes, "rejected")
    review(project, human_yes, "accepted")
    cleared = add_image(project, "enriched", color=(6, 6, 6))
    verdict(project, cleared, "accepted")
    review(project, cleared, "rejected")
    review(project, cleared, "cleared")  # undo: back to the machine verdict
    undecided = add_image(project, "enriched", color=(7, 7, 7))
    verdict(project, undecided, "needs_review")
    later_round = add_image(project, "synthetic", round=1, color=(8, 8, 8))
    verdict(project, later_round, "accepted")
    caption(project, src, "old caption")
    newest = caption(project, src, "fw_test on a beach")

    ds = freeze_dataset(project, 1)
    assert {m.image_id for m in ds.members} == {src, kept_src, machine_ok, human_yes, cleared}
    by_id = {m.image_id: m for m in ds.members}
    assert by_id[src].caption_id == newest and by_id[src].caption == "fw_test on a beach"
    assert by_id[machine_ok].caption is None
    assert by_id[src].path.is_file()
    # round 2 sees the round-1 synthetic image; versions count up
    ds2 = freeze_dataset(project, 2)
    assert later_round in {m.image_id for m in ds2.members}
    assert (ds.version, ds2.version) == (1, 2)
    assert load_dataset(project).version == 2 and len(load_dataset(project, 1).members) == 5
    review(project, rejected_src, "cleared")  # undo: the source is back in
    assert rejected_src in {m.image_id for m in freeze_dataset(project, 1).members}


def test_frozen_version_does_not_move_when_reviews_change(project):
    img = add_image(project, "enriched", color=(9, 9, 9))
    add_image(project, "source")
    verdict(project, img, "accepted")
    ds = freeze_dataset(project, 1)
    review(project, img, "rejected")
    assert {m.image_id for m in load_dataset(project, ds.version).members} == {m.image_id for m in ds.members}
    assert img not in {m.image_id for m in freeze_dataset(project, 1).members}


def test_empty_catalog_and_bad_round_are_explained(project):
    with pytest.raises(StageError, match="no sources"):
        freeze_dataset(project, 1)
    assert project.catalog.query("SELECT COUNT(*) AS n FROM dataset_versions")[0]["n"] == 0  # rolled back
    with pytest.raises(StageError, match="round"):
        freeze_dataset(project, 0)
    with pytest.raises(StageError, match="no dataset version v3"):
        load_dataset(project, 3)


def test_evaluation_images_never_enter_a_training_set(project):
    add_image(project, "source", color=(1, 1, 1))
    kept = add_image(project, "synthetic", 1, color=(5, 5, 5))
    held_out = add_image(project, "synthetic", 1, color=(6, 6, 6))
    project.catalog.execute("UPDATE images SET purpose = 'eval' WHERE id = ?", (held_out,))
    for image_id in (kept, held_out):
        verdict(project, image_id, "accepted")
        review(project, image_id, "accepted")
    members = {m.image_id for m in freeze_dataset(project, 2).members}
    assert kept in members and held_out not in members


def test_summary_says_what_a_set_holds_and_what_it_waits_for(project):
    from flywheel.dataset import ensure_trainable, summarize

    src = add_image(project, "source", color=(1, 1, 1))
    add_image(project, "source", color=(2, 2, 2))
    summary = summarize(project, round=1)
    assert summary.describe() == "the round-1 set: 2 images (2 source); 0 captioned, 2 uncaptioned; no edits yet (sources only)"
    assert summary.blockers() == [("no edits yet, only the sources", "flywheel enrich"),
                                  ("2 uncaptioned", "flywheel caption")]
    for image_id in (src, src + 1):
        caption(project, image_id, "a photo of fw_test")
    judged = add_image(project, "enriched", color=(3, 3, 3))
    verdict(project, judged, "accepted")
    caption(project, judged, "fw_test in a forest")
    waiting = add_image(project, "enriched", color=(4, 4, 4))
    verdict(project, waiting, "needs_review")
    review(project, waiting, "skipped")  # skipping is not deciding
    add_image(project, "enriched", color=(5, 5, 5))  # made, not judged yet
    with pytest.raises(StageError) as err:
        ensure_trainable(project, 1)
    assert err.value.args[0] == ("the round-1 set is not ready to train: 3 images (2 source, 1 enriched); "
                                 "1 not judged; 1 waiting for your review")
    assert err.value.hint == "run `flywheel judge`, `flywheel review`; or pass --force to train on it as it is"
    assert project.catalog.query("SELECT COUNT(*) FROM dataset_versions")[0][0] == 0  # a refusal writes nothing

    review(project, waiting, "rejected")
    verdict(project, waiting + 1, "accepted")
    assert summarize(project, round=1).describe() == (
        "the round-1 set: 4 images (2 source, 2 enriched); 3 captioned, 1 uncaptioned; accepted: 0 by you, "
        "2 by the judge; left out: 1 rejected")
    v1 = freeze_dataset(project, 1)  # frozen with the newly accepted edit still uncaptioned
    caption(project, waiting + 1, "fw_test on a beach")
    assert ensure_trainable(project, 1).images == 4  # a new freeze would be ready...
    with pytest.raises(StageError) as err:
        ensure_trainable(project, 1, v1.version)  # ...v1 keeps the captions it was frozen with
    assert err.value.args[0] == "dataset v1 (round 1) is not ready to train: 4 images (2 source, 2 enriched); 1 uncaptioned"


def test_train_refuses_an_unvetted_set_before_loading_anything(project, monkeypatch):
    from click.testing import CliRunner

    import flywheel.train as train_mod
    from flywheel.cli import main

    def never(*args, **kwargs):
        raise AssertionError("the model was about to load")

    monkeypatch.setattr(train_mod, "_run", never)  # where the FLUX pipeline loads
    cfg = project.root / "flywheel.toml"  # the tiny base: this machine has no GPU for klein-base
    cfg.write_text(cfg.read_text(encoding="utf-8").replace('# base = "flux2-klein-base-4b"', 'base = "tiny"'), encoding="utf-8")
    add_image(project, "source", color=(1, 1, 1))
    r = CliRunner().invoke(main, ["-C", str(project.root), "train"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.splitlines()[-2:] == [
        "Error: the round-1 set is not ready to train: 1 image (1 source); no edits yet, only the sources; 1 uncaptioned",
        "Hint: run `flywheel enrich`, `flywheel caption`; or pass --force to train on it as it is"]
    counts = project.catalog.query("SELECT (SELECT COUNT(*) FROM dataset_versions), (SELECT COUNT(*) FROM lora_runs)")
    assert tuple(counts[0]) == (0, 0)
    r = CliRunner().invoke(main, ["-C", str(project.root), "train", "--force"])
    assert isinstance(r.exception, AssertionError) and "about to load" in str(r.exception)  # --force goes on
