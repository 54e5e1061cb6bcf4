"""Caption truth: the judge asks the VLM whether the image's caption describes it (criterion ``caption``);
a caption it doubts sends the image to a human, with the probability in the reason."""

from __future__ import annotations

import json

import pytest

from flywheel.judge import judge
from flywheel.testing.scripted import ScriptedVLM

EDIT = {"recipe_id": "forest", "prompt": "Change the background to a forest."}
GOOD_JSON = '{"same_character": true, "edit_applied": true, "artifacts": false, "reasons": "clean edit"}'


def scripted(caption_yes: float) -> ScriptedVLM:
    """Answers in the judge's order: identity, edit applied, artifacts, caption, then the JSON verdict."""
    vlm = ScriptedVLM()
    vlm.enqueue_probabilities({"yes": 0.9, "no": 0.1}, {"yes": 0.8, "no": 0.2}, {"yes": 0.1, "no": 0.9},
                              {"yes": caption_yes, "no": 1 - caption_yes})
    return vlm.enqueue(GOOD_JSON)


@pytest.mark.parametrize("caption_yes, verdict", [(0.2, "needs_review"), (0.9, "accepted")])
def test_a_caption_the_vlm_doubts_goes_to_review(project, add_image, planted, caption_yes, verdict):
    src = add_image(planted["source"])
    img = add_image(planted["good"], "enriched", parent=src, params=EDIT)
    # A composite "forest" caption on an edit that shows a blue backdrop (the mask failed, the caption did not).
    project.catalog.insert("captions", {"image_id": img, "text": "fw_test standing in a forest", "source": "template"})
    vlm = scripted(caption_yes)
    judge(project, vlm=vlm)
    assert vlm.pending == (0, 0)
    got, reason = project.catalog.query("SELECT verdict, reason FROM verdicts WHERE image_id = ?", (img,))[0]
    assert got == verdict
    if verdict == "needs_review":
        assert reason == "caption: VLM P(caption describes the image) 0.20 < 0.5"
    else:
        assert "caption: P(describes the image) 0.90" in reason
    question = vlm.calls[3].request
    assert '"fw_test standing in a forest"' in question.text and '"fw_test" is the character' in question.text
    assert len(question.images) == 1  # the candidate only: the caption is about this image
    row = project.catalog.query("SELECT value, details_json FROM scores WHERE image_id = ? AND criterion = 'caption' "
                                "AND scorer = 'vlm_pairwise:scripted-vlm'", (img,))[0]
    assert row["value"] == pytest.approx(caption_yes)
    assert json.loads(row["details_json"])["question"] == question.text


def test_an_image_without_a_caption_is_not_asked(project, add_image, planted):
    src = add_image(planted["source"])
    img = add_image(planted["good"], "enriched", parent=src, params=EDIT)
    vlm = ScriptedVLM()
    vlm.enqueue_probabilities({"yes": 0.9, "no": 0.1}, {"yes": 0.8, "no": 0.2}, {"yes": 0.1, "no": 0.9})
    judge(project, vlm=vlm.enqueue(GOOD_JSON))
    assert vlm.pending == (0, 0) and not any("caption" in p for p in vlm.prompts())
    assert project.catalog.query("SELECT verdict FROM verdicts WHERE image_id = ?", (img,))[0][0] == "accepted"
