"""Evaluation metrics, the paired bootstrap and the report, on real pixels and real face signals."""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageFilter

from flywheel.evaluation.metrics import EvalImage, score_round, source_face_embeddings
from flywheel.evaluation.report import RoundData, write_report
from flywheel.evaluation.stats import paired_bootstrap
from flywheel.sample import astronaut, sample_images


def test_bootstrap_verdicts():
    keys = [f"p{i}|0" for i in range(40)]
    rng = np.random.default_rng(0)
    base = {k: float(v) for k, v in zip(keys, rng.normal(0.5, 0.1, 40))}
    better = {k: v + 0.2 for k, v in base.items()}
    same = {k: v + float(rng.normal(0, 0.01)) for k, v in base.items()}
    assert paired_bootstrap(base, better).verdict == "better"
    assert paired_bootstrap(better, base).verdict == "worse"
    assert paired_bootstrap(base, same).verdict == "no_significant_change"
    # Lower-is-better metrics: a lower candidate is an improvement.
    c = paired_bootstrap(better, base, higher_is_better=False)
    assert c.verdict == "better" and c.difference == pytest.approx(0.2)
    # Only keys present (and finite) in both rounds are paired.
    assert paired_bootstrap(base, {**better, "extra|1": 1.0, keys[0]: float("nan")}).n == 39


@pytest.fixture(scope="module")
def rounds():
    sources = [im for _, im in sample_images()]
    faces_ref = source_face_embeddings(sources)
    # "v2": the character is there (real photo variants); "v1": it is not (blurred beyond recognition).
    good = [EvalImage(f"p{i}|{i}", f"fw_astro photo {i}", i, im, judge_accepted=True) for i, im in enumerate(sources)]
    bad = [EvalImage(e.key, e.prompt, e.seed, e.image.filter(ImageFilter.GaussianBlur(12)), judge_accepted=False)
           for e in good]
    return sources, faces_ref, good, bad


def test_face_metrics_separate_recognisable_from_not(rounds):
    sources, faces_ref, good, bad = rounds
    assert len(faces_ref) == 5
    s_good = score_round(good, source_faces=faces_ref, sources=sources)
    s_bad = score_round(bad, source_faces=faces_ref, sources=sources)
    assert set(s_good["recognisable"].values()) == {1.0}
    assert set(s_bad["recognisable"].values()) == {0.0}
    assert all(v < 0.6 for v in s_good["face_distance"].values())
    assert s_good["judge_pass"]["p0|0"] == 1.0 and s_bad["judge_pass"]["p0|0"] == 0.0
    assert 0.0 < np.mean(list(s_good["diversity"].values())) <= 1.0


def test_report_is_self_contained_with_verdict(rounds, tmp_path):
    sources, faces_ref, good, bad = rounds
    v1 = RoundData("v1", 1, bad, score_round(bad, source_faces=faces_ref, sources=sources), {"source": 5, "enriched": 10})
    v2 = RoundData("v2", 2, good, score_round(good, source_faces=faces_ref, sources=sources),
                   {"source": 5, "enriched": 10, "synthetic": 7})
    comps = {m: paired_bootstrap(v1.scores[m], v2.scores[m], higher_is_better=m != "face_distance")
             for m in ("recognisable", "judge_pass", "diversity")}
    index = write_report(tmp_path / "report", v1, v2, comps, "recognisable")
    page = index.read_text()
    assert "<b>better</b>" in page and "0.000 → 1.000" in page
    assert "70% bar: v1 0% (missed), v2 100% (met)" in page
    metrics = _strict_json((tmp_path / "report" / "metrics.json").read_text())  # blurred faces: NaN -> null
    assert metrics["verdict"] == "better" and metrics["comparisons"]["recognisable"]["ci95"][0] > 0
    for rel in ["plots/metrics.png", "plots/composition.png", "images/v1/000.jpg", "images/v2/004.jpg"]:
        assert (tmp_path / "report" / rel).stat().st_size > 1000
        assert rel in page
    assert "http" not in page  # self-contained: nothing fetched from elsewhere


def test_embedding_metrics_with_tiny_clip_and_dino(rounds, tmp_path):
    from flywheel.signals.embeddings import ImageEmbedder
    from flywheel.testing.tiny.embeddings import build_tiny_clip, build_tiny_dinov2

    sources, faces_ref, good, _ = rounds
    clip = ImageEmbedder.from_pretrained(str(build_tiny_clip(tmp_path / "clip")))
    dino = ImageEmbedder.from_pretrained(str(build_tiny_dinov2(tmp_path / "dino")))
    assert clip.is_clip and not dino.is_clip
    s = score_round(good[:3], source_faces=faces_ref, sources=sources, embedder=dino, clip=clip, trigger="fw_astro")
    assert set(s) >= {"dino", "clip_t", "diversity", "recognisable"}
    assert all(-1.0 <= v <= 1.0 for v in s["dino"].values())
    # The same image embeds identically: its similarity to itself is 1.
    e = dino.embed([astronaut(), astronaut()])
    assert float(e[0] @ e[1]) == pytest.approx(1.0, abs=1e-5)


def test_missing_embedding_model_names_the_download_command(tmp_path):
    from flywheel.errors import ModelNotFoundError
    from flywheel.signals.embeddings import ImageEmbedder

    with pytest.raises(ModelNotFoundError) as err:
        ImageEmbedder.from_pretrained("facebook/dinov2-small")
    assert "hf download facebook/dinov2-small" in err.value.hint


# --- the report a LoRA maker reads: two rounds as the loop leaves them in the catalog and run folders ----
def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"metrics.json holds {name}: not valid JSON")

    return json.loads(text, parse_constant=refuse)


def _noise(rng, size=64):
    from PIL import Image

    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def _train_run(project, dataset_version: int, round_: int, seed: int) -> int:
    """A finished LoRA run with the files `flywheel train` leaves: LoRA, loss.csv/.png, samples at 2 steps."""
    from flywheel.training import losses as losses_io

    cat = project.catalog
    dataset_id = cat.query("SELECT id FROM dataset_versions WHERE version = ?", (dataset_version,))[0][0]
    run_id = cat.insert("lora_runs", {"round": round_, "dataset_id": dataset_id, "base_model": "tiny",
                                      "config_json": "{}", "output_dir": "pending", "status": "ok"})
    run_dir = project.workspace / "runs" / f"run-{run_id:04d}"
    (run_dir / "samples").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    losses = [{"step": s, "loss": float(1.0 / s + rng.random() * 0.1), "lr": 1e-4, "epoch": 0} for s in range(1, 9)]
    (run_dir / "pytorch_lora_weights.safetensors").write_bytes(rng.bytes(64))
    files = [("lora", "pytorch_lora_weights.safetensors", 8, {}),
             ("loss_csv", losses_io.save_csv(losses, run_dir / "loss.csv").name, 8, {}),
             ("loss_curve", losses_io.plot(losses, run_dir / "loss.png").name, 8, {})]
    for step in (4, 8):
        for p, prompt in enumerate(["a photo of fw_test", "fw_test at night"]):
            _noise(rng).save(run_dir / "samples" / f"step{step:06d}-p{p}-s0.png")
            files.append(("sample", f"samples/step{step:06d}-p{p}-s0.png", step, {"prompt": prompt, "seed": 0}))
    for kind, name, step, meta in files:
        sha = hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
        cat.insert("artifacts", {"kind": kind, "path": f"runs/run-{run_id:04d}/{name}", "sha256": sha,
                                 "lora_run_id": run_id, "step": step, "meta_json": json.dumps(meta)})
    return run_id


@pytest.fixture
def two_rounds(project, add_image):
    """Sources, three edits (one rejected), round 1 trained; its 12 synthetic images all rejected by the
    judge (8 for identity, 4 for quality); round 2 trained on the same set. Returns (project, runs, synthetic ids)."""
    from flywheel.dataset import freeze_dataset

    rng = np.random.default_rng(0)
    cat = project.catalog
    for im in sample_images()[:2]:
        add_image(im[1])
    for i, verdict in enumerate(["accepted", "accepted", "rejected"]):
        edit = add_image(_noise(rng), "enriched")
        cat.insert("verdicts", {"image_id": edit, "verdict": verdict, "reason": "passed: ..." if i < 2 else
                                "quality: sharpness 0.00031 < 0.0005 (blurred)"})
    freeze_dataset(project, 1)
    run1 = _train_run(project, 1, 1, seed=1)
    synthetic = []
    for i in range(12):
        img = add_image(_noise(rng), "synthetic", round_=1)
        reason = ("identity: face distance 0.81 > 0.6 (closest source #1)" if i < 8 else
                  "quality: noise sigma 0.061 > 0.04 (noisy); also: identity: no face found in the image")
        cat.insert("verdicts", {"image_id": img, "verdict": "rejected", "reason": reason})
        synthetic.append(img)
    freeze_dataset(project, 2)
    run2 = _train_run(project, 2, 2, seed=2)
    return project, (run1, run2), synthetic


def _rounds_for(runs):
    """Held-out scores as the metrics leave them: no face anywhere (NaN distances), judge rejects all."""
    nan = float("nan")
    out = []
    for run in runs:
        images = [EvalImage(f"p{i}|0", f"prompt {i}", 0, astronaut(), 100 + i) for i in range(3)]
        scores = {"recognisable": {im.key: 0.0 for im in images}, "face_distance": {im.key: nan for im in images},
                  "judge_pass": {im.key: 0.0 for im in images}, "diversity": {im.key: 0.1 * run for im in images}}
        out.append(RoundData(f"round {run} (run {run})", run, images, scores, {"source": 2, "enriched": 2}))
    return out


def _report(project, runs, tmp_path, candidate_run=None):
    from flywheel.evaluation.story import collect_story

    rows = {r["id"]: r for r in project.catalog.query("SELECT * FROM lora_runs")}
    base, cand = rows[runs[0]], rows[candidate_run or runs[1]]
    story = collect_story(project, base, cand)
    rounds = _rounds_for([base["id"], cand["id"]])
    comps = {m: paired_bootstrap(rounds[0].scores[m], rounds[1].scores[m]) for m in rounds[0].scores}
    index = write_report(tmp_path / "report", rounds[0], rounds[1], comps, "recognisable", story=story)
    return story, index


def test_report_says_what_changed_with_reasons_and_shows_training(two_rounds, tmp_path):
    project, runs, _ = two_rounds
    story, index = _report(project, runs, tmp_path)
    said = story.sentences()
    assert said == [
        "Dataset v2 (trained in round 2) has the same 4 images as v1 (round 1): 2 sources, 2 edits. Both LoRAs "
        "trained on the same set, so any difference between them comes from training alone.",
        "v2 added 0 synthetic images of the 12 that LoRA round 1 generated: all 12 rejected, 8 for identity, "
        "4 for quality.",
    ]
    page = index.read_text()
    assert all(html.escape(s) in page for s in said)
    # Why the left-out images are out, with an example reason, per kind.
    assert "<td>1 rejected, 1 for quality</td>" in page and "<td>all 12 rejected, 8 for identity, 4 for quality</td>" in page
    assert "identity: face distance 0.81 &gt; 0.6 (closest source #1)" in page
    # Each run's loss curve and samples per step, copied into the self-contained folder; its LoRA path.
    for run in runs:
        assert f"src='training/run-{run}/loss.png'" in page
        assert (tmp_path / "report" / f"training/run-{run}/loss.png").stat().st_size > 5000
        for rel in (f"training/run-{run}/step000004-00.jpg", f"training/run-{run}/step000008-01.jpg"):
            assert rel in page and (tmp_path / "report" / rel).is_file()
        assert str(project.workspace / "runs" / f"run-{run:04d}" / "pytorch_lora_weights.safetensors") in page
    assert page.count("<th>step 4</th>") == 2 and page.count("<th>step 8</th>") == 2
    assert "http" not in page  # still self-contained
    # Strict JSON: NaN is null; all-zero metrics are said in words, not drawn as empty axes.
    metrics = _strict_json((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["per_image"]["round 1 (run 1)"]["face_distance"]["p0|0"] is None
    assert metrics["comparisons"]["face_distance"]["baseline"] is None
    assert metrics["what_changed"] == said
    assert metrics["metric_notes"]["recognisable"].startswith("not plotted: 0 in both rounds; dlib found a face "
                                                              "in 0 of 3 renders")
    assert metrics["metric_notes"]["face_distance"] == "not plotted: no image of either round could be measured"
    assert "not plotted: 0 in both rounds" in page


def test_report_counts_what_a_reviewer_let_in(two_rounds, tmp_path):
    from flywheel.dataset import freeze_dataset
    from flywheel.review import record_review

    project, runs, synthetic = two_rounds
    record_review(project, synthetic[:3], "accepted", reviewer="tester")  # three the judge had rejected for identity
    freeze_dataset(project, 2)
    run3 = _train_run(project, 3, 2, seed=3)
    said = _report(project, runs, tmp_path, candidate_run=run3)[0].sentences()
    assert said == [
        "Dataset v3 (trained in round 2) has 7 images (2 sources, 2 edits, 3 synthetic images); compared with v1 "
        "(round 1, 4 images) it added 3 synthetic images.",
        "v3 added 3 synthetic images of the 12 that LoRA round 1 generated: 3 accepted, 9 rejected "
        "(5 for identity, 4 for quality).",
    ]


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.mark.browser
@pytest.mark.timeout(120)
@pytest.mark.skipif(not CHROMIUM.exists() or not CHROMEDRIVER.exists(), reason="needs Debian chromium + chromedriver")
def test_report_renders_in_chromium_with_its_images(two_rounds, tmp_path):
    """The page opened from disk in real headless Chromium: the story is visible, every image loads."""
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    project, runs, _ = two_rounds
    _, index = _report(project, runs, tmp_path)
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never go online
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--window-size=1300,4000", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.get(index.as_uri())
        changed = [p.text for p in driver.find_elements(By.CSS_SELECTOR, "p.changed")]
        assert changed[1].startswith("v2 added 0 synthetic images of the 12")
        images = driver.find_elements(By.TAG_NAME, "img")
        broken = [i.get_attribute("src") for i in images if not driver.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth > 0", i)]
        assert len(images) >= 2 + 8 + 6 and not broken  # loss curves, samples, renders, plots
        assert driver.find_element(By.CSS_SELECTOR, "img.loss").size["width"] > 300
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
    assert (tmp_path / "report.png").stat().st_size > 50_000
