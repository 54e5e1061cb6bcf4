"""Coverage: the judge tags views and framings (face landmarks; the VLM's answers when asked), status and
the report name the empty cells, and `enrich --fill-gaps` plans the shipped recipes that fill them."""

from __future__ import annotations

import json

import pytest

from flywheel.judge import judge
from test_judge import pixel_only

EDIT = {"recipe": "backdrop", "prompt": "change the background to a cool blue studio backdrop"}


@pytest.fixture
def sample_judged(project, add_image, planted):
    """The sample character's five sources plus one accepted edit, judged on pixel signals."""
    from flywheel.sample import sample_images

    sources = [add_image(image) for _, image in sample_images()]
    edit = add_image(planted["good"], "enriched", parent=sources[0], params=EDIT)
    judge(project, pixel_only(project))
    return sources, edit


def test_the_sample_character_lacks_angles_and_framings_and_status_says_which(project, sample_judged):
    from click.testing import CliRunner

    from flywheel.cli import main
    from flywheel.status import collect_status

    sources, edit = sample_judged
    tags = {}
    for r in project.catalog.query("SELECT image_id, value, details_json FROM scores WHERE criterion = 'coverage' "
                                   "AND scorer = 'dlib_landmarks'"):
        d = json.loads(r["details_json"])
        tags[r["image_id"], d["axis"]] = d["tag"]
    # Five crops/flips of one frontal photo: every face looks at the camera; framing follows the face's size.
    assert {tags[i, "view"] for i in [*sources, edit]} == {"frontal"}
    assert tags[sources[0], "framing"] == "half body" and tags[sources[1], "framing"] == "portrait"
    cov = collect_status(project).coverage
    assert cov.images == 6 and cov.counts["view"] == {"frontal": 6, "three-quarter": 0, "profile": 0, "back": 0}
    assert cov.gap_messages() == ["no three-quarter views", "no profile views", "no back views",
                                  "no close-up shots", "no full body shots"]  # expression/lighting: untagged
    out = CliRunner().invoke(main, ["-C", str(project.root), "status"])
    assert out.exit_code == 0, out.output
    assert "Coverage of the set (6 images" in out.output and "no profile views" in out.output
    assert "not tagged (needs [judge] coverage_questions = true)" in " ".join(out.output.split())


def test_fill_gaps_plans_the_recipes_for_the_empty_cells(project, sample_judged):
    from flywheel.coverage import fill_gaps
    from flywheel.enrich import plan

    cfg, gaps = fill_gaps(project, project.config.enrich.model_copy(update={"seeds": 1}))
    assert cfg.recipes == ["left_view", "right_view", "close_up", "full_body"]
    assert dict(gaps)["no profile views"] == ["left_view", "right_view"] and dict(gaps)["no back views"] == []
    units = plan(project, cfg)
    assert len(units) == 5 * 4 and {u.recipe.id for u in units} == set(cfg.recipes)
    # The angle recipes write the angle into their template captions.
    assert {u.recipe.id: u.recipe.caption for u in units}["left_view"] == "seen from slightly to the left"


def test_fill_gaps_without_tags_says_to_judge_first(project, add_image, planted):
    from click.testing import CliRunner

    from flywheel.cli import main

    add_image(planted["source"])
    out = CliRunner().invoke(main, ["-C", str(project.root), "enrich", "--fill-gaps", "--backend", "composite"])
    assert out.exit_code != 0 and "no coverage tags yet" in out.output and "flywheel judge" in out.output
    assert "Traceback" not in out.output


def test_vlm_tags_cover_expression_and_lighting_and_win_over_landmarks(project, add_image, planted):
    from flywheel.coverage import QUESTIONS, coverage_table
    from flywheel.testing.scripted import ScriptedVLM

    answers = {"view": "angled", "framing": "portrait", "expression": "smiling", "lighting": "studio"}

    def answer(req, options):
        if options == ["yes", "no"]:
            return {"yes": 0.9, "no": 0.1} if "defects" not in req.text else {"yes": 0.1, "no": 0.9}
        axis = next(a for a, (q, _) in QUESTIONS.items() if q == req.text)
        return {o: (0.7 if o == answers[axis] else 0.3 / (len(options) - 1)) for o in options}

    src = add_image(planted["source"])
    edit = add_image(planted["good"], "enriched", parent=src, params=EDIT)
    cfg = project.config.model_copy(deep=True)
    cfg.judge.structured_verdict, cfg.judge.coverage_questions = False, True
    vlm = ScriptedVLM().enqueue_probabilities([answer] * 11)  # source: 4 tags; edit: 3 checks + 4 tags
    judge(project, cfg, vlm=vlm)
    assert vlm.pending == (0, 0)
    table = coverage_table(project)
    assert table.images == 2 and table.counts["view"]["three-quarter"] == 2  # the VLM wins over the landmarks
    assert table.counts["expression"]["smiling"] == 2 and table.counts["lighting"]["studio"] == 2
    assert "no sunset lighting" in table.gap_messages() and "no frontal views" in table.gap_messages()
    row = project.catalog.query("SELECT value, details_json FROM scores WHERE image_id = ? AND scorer = "
                                "'vlm_choice:scripted-vlm' AND json_extract(details_json, '$.axis') = 'view'", (edit,))
    assert row[0]["value"] == pytest.approx(0.7) and json.loads(row[0]["details_json"])["tag"] == "three-quarter"
    # Another policy judges the edit again; the source already has its tags and is not asked again.
    cfg.judge.min_sharpness = 0.0004
    again = ScriptedVLM().enqueue_probabilities([answer] * 7)
    judge(project, cfg, vlm=again)
    assert again.pending == (0, 0) and len(again.calls) == 7  # 3 checks + 4 tags of the edit; none of the source


@pytest.mark.parametrize("turn, view", [(0.02, "frontal"), (-0.3, "three-quarter"), (0.5, "three-quarter"),
                                        (-1.2, "profile")])
def test_view_from_the_nose_offset(turn, view):
    from flywheel.signals.coverage import view_from_turn

    assert view_from_turn(turn) == view


@pytest.mark.parametrize("height, framing", [(0.55, "close-up"), (0.28, "portrait"), (0.17, "half body"),
                                             (0.05, "full body")])
def test_framing_from_the_face_height(height, framing):
    from flywheel.signals.coverage import framing_from_face

    assert framing_from_face(height) == framing


def test_the_report_names_the_gaps_of_the_dataset_it_trained_on(project, sample_judged, tmp_path):
    from flywheel.dataset import freeze_dataset
    from flywheel.evaluation.metrics import EvalImage
    from flywheel.evaluation.report import RoundData, write_report
    from flywheel.evaluation.stats import paired_bootstrap
    from flywheel.evaluation.story import collect_story
    from flywheel.sample import astronaut

    freeze_dataset(project, 1)
    dataset_id = project.catalog.query("SELECT id FROM dataset_versions ORDER BY id DESC LIMIT 1")[0][0]
    # Two finished runs on the frozen set (the report compares a baseline and a candidate); no files needed.
    runs = [project.catalog.insert("lora_runs", {"round": 1, "dataset_id": dataset_id, "base_model": "tiny",
                                                 "config_json": "{}", "output_dir": "pending", "status": "ok"})
            for _ in range(2)]
    rows = {r["id"]: r for r in project.catalog.query("SELECT * FROM lora_runs")}
    story = collect_story(project, rows[runs[0]], rows[runs[1]])
    assert story.coverage is not None and story.coverage.images == 6
    said = story.sentences()[-1]
    assert said.startswith("v1: Coverage of 6 images: view: frontal 6, three-quarter 0, profile 0, back 0; framing:")
    assert "Missing: no three-quarter views, no profile views, no back views, no close-up shots" in said
    images = [EvalImage(f"p{i}|0", f"prompt {i}", 0, astronaut(), 100 + i) for i in range(2)]
    rounds = [RoundData(f"round {r}", r, images, {"diversity": {im.key: 0.1 * r for im in images}}, {"source": 5})
              for r in runs]
    comps = {"diversity": paired_bootstrap(rounds[0].scores["diversity"], rounds[1].scores["diversity"])}
    index = write_report(tmp_path / "report", rounds[0], rounds[1], comps, "diversity", story=story)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["coverage"]["missing"][:2] == ["no three-quarter views", "no profile views"]
    assert metrics["coverage"]["counts"]["view"]["frontal"] == 6
    html = index.read_text()
    assert "no profile views" in html
    assert "<h2>Coverage of " in html
    assert "<tr><td>view</td><td>frontal 6, three-quarter 0, profile 0, back 0</td></tr>" in html
