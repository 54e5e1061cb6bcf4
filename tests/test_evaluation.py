"""Evaluation metrics, the paired bootstrap and the report, on real pixels and real face signals."""

from __future__ import annotations

import json

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
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
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
