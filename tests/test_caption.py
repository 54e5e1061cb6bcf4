"""Captions: the trigger is always there, the policy shapes the prompt, batches are recorded, unusable
output falls back to the recipe, and an image is captioned once per policy version."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from flywheel.caption import caption, clean_caption, template_caption
from flywheel.config import CaptionConfig
from flywheel.testing.scripted import ScriptedVLM

EDIT = {"recipe": "beach", "prompt": "Change the background to a sunny beach. Keep the character's face identical."}


def with_caption(project, **settings):
    cfg = project.config.model_copy(deep=True)
    for key, value in settings.items():
        setattr(cfg.caption, key, value)
    return cfg


def captions(project) -> dict[int, tuple[str, str]]:
    rows = project.catalog.query("SELECT image_id, text, source FROM captions ORDER BY id")
    return {r["image_id"]: (r["text"], r["source"]) for r in rows}


@pytest.fixture
def three_images(project, add_image):
    src = add_image(Image.new("RGB", (64, 64), (200, 30, 30)))
    a = add_image(Image.new("RGB", (64, 64), (30, 200, 30)), "enriched", parent=src, params=EDIT)
    b = add_image(Image.new("RGB", (64, 64), (30, 30, 200)), "synthetic",
                  params={"prompt": "fw_test reading in a cafe"})
    return src, a, b


def test_vlm_captions_in_batches_with_the_trigger_always_present(project, three_images):
    src, a, b = three_images
    vlm = ScriptedVLM().enqueue("fw_test stands in a red studio, soft light.",
                                "A woman on a beach at sunset, smiling.",  # no trigger: it is added
                                "Caption: \"fw_test reads a book in a cafe\"")
    progress = []
    result = caption(project, with_caption(project, batch_size=2), vlm=vlm,
                     progress=lambda d, t, label="": progress.append((d, t)))
    got = captions(project)
    assert got[src] == ("fw_test stands in a red studio, soft light.", "vlm")
    assert got[a] == ("fw_test, a woman on a beach at sunset, smiling.", "vlm")
    assert got[b] == ("fw_test reads a book in a cafe", "vlm")
    assert result.trigger_inserted == [a] and result.count("vlm") == 3
    assert progress[-1] == (3, 3)
    # Two batches -> two recorded model calls, each listing its images and the prompt.
    calls = project.catalog.query("SELECT params_json FROM operations WHERE stage = 'caption' AND kind = 'model_call'")
    assert [json.loads(c["params_json"])["image_ids"] for c in calls] == [[src, a], [b]]
    prompt = vlm.prompts()[0]
    assert "fw_test" in prompt and "setting" in prompt and "lighting" in prompt and len(vlm.requests[0].images) == 1


def test_the_policy_is_configurable_and_identity_traits_are_flagged_or_stripped(project, add_image):
    img = add_image(Image.new("RGB", (64, 64)))
    cfg = with_caption(project, identity_traits=["red hair", "freckles"], vary=["weather"],
                       prompt="Caption {trigger}. Vary: {vary}. {traits}")
    vlm = ScriptedVLM().enqueue("fw_test with red hair walks in the rain")
    result = caption(project, cfg, vlm=vlm)
    assert vlm.prompts() == ["Caption fw_test. Vary: weather. Do not mention these fixed traits: red hair, freckles. "]
    assert result.flagged_traits == {img: ["red hair"]}
    assert captions(project)[img][0] == "fw_test with red hair walks in the rain"  # flagged, kept

    text, found, inserted = clean_caption("fw_test, freckles, walks in the rain with Red Hair.", "fw_test",
                                          CaptionConfig(identity_traits=["red hair", "freckles"],
                                                        strip_identity_traits=True))
    assert found == ["red hair", "freckles"] and not inserted
    assert text == "fw_test, walks in the rain with."


def test_unusable_output_falls_back_to_a_template_from_the_recipe(project, three_images):
    src, a, b = three_images
    vlm = ScriptedVLM().enqueue("   ", "\"\"", "...")
    result = caption(project, vlm=vlm)
    got = captions(project)
    assert got[src] == ("a photo of fw_test", "template")
    assert got[a] == ("fw_test, a sunny beach in the background", "template")
    assert got[b] == ("fw_test reading in a cafe", "template")
    assert sorted(result.fell_back) == [src, a, b]


@pytest.mark.parametrize("prompt, expected", [
    ("Make the lighting look like sunset, keep the subject identical.", "fw_test, sunset lighting"),
    ("Turn this into a coloured pencil sketch. Keep the face.", "fw_test, as a coloured pencil sketch"),
    ("Change to a close-up shot of the character's face.", "a close-up shot of fw_test's face"),
    ("Do something unusual", "fw_test, do something unusual"),
])
def test_template_captions_describe_the_result_not_the_instruction(prompt, expected):
    assert template_caption("fw_test", "enriched", {"prompt": prompt}) == expected


def test_without_fallback_unusable_output_writes_nothing(project, add_image):
    img = add_image(Image.new("RGB", (64, 64)))
    result = caption(project, with_caption(project, template_fallback=False), vlm=ScriptedVLM().enqueue(""))
    assert result.failed == [img] and captions(project) == {}


def test_template_mode_never_calls_a_model(project, three_images):
    # An empty ScriptedVLM raises on any call: template mode must not make one.
    result = caption(project, with_caption(project, mode="template"), vlm=ScriptedVLM())
    assert result.count("template") == 3


def test_captioned_once_per_policy_human_captions_kept_rejected_images_skipped(project, three_images):
    src, a, b = three_images
    caption(project, vlm=ScriptedVLM().enqueue(["fw_test one", "fw_test two", "fw_test three"]))
    assert caption(project, vlm=ScriptedVLM()).written == []  # same policy: nothing to do
    with project.catalog.transaction():
        project.catalog.insert("captions", {"image_id": src, "text": "fw_test, by hand", "source": "human"})
        project.catalog.insert("verdicts", {"image_id": b, "verdict": "rejected", "reason": "test"})
    vlm = ScriptedVLM().enqueue("fw_test on the beach, new policy")
    result = caption(project, with_caption(project, vary=["weather"]), vlm=vlm)
    assert result.written == [(a, "vlm")] and len(vlm.calls) == 1
    rows = project.catalog.query("SELECT text FROM captions WHERE image_id = ? ORDER BY id", (a,))
    assert [r["text"] for r in rows] == ["fw_test two", "fw_test on the beach, new policy"]  # old row kept


def test_an_empty_project_says_what_to_run(project):
    from flywheel.errors import StageError

    with pytest.raises(StageError, match="no images") as err:
        caption(project, vlm=ScriptedVLM())
    assert "flywheel ingest" in err.value.hint


def test_an_adapter_returning_too_few_answers_is_an_error_not_a_misalignment(project, three_images):
    from flywheel.errors import ModelOutputError

    class DropsOne(ScriptedVLM):
        def generate(self, requests, **kwargs):
            return super().generate(requests, **kwargs)[:-1]

    with pytest.raises(ModelOutputError, match="2 captions for 3 images"):
        caption(project, vlm=DropsOne().enqueue(["fw_test a", "fw_test b", "fw_test c"]))
    assert captions(project) == {}


def test_evaluation_images_are_not_captioned(project, three_images):
    src, a, b = three_images
    with project.catalog.transaction():
        project.catalog.execute("UPDATE images SET purpose = 'eval' WHERE id = ?", (b,))
    result = caption(project, with_caption(project, mode="template"), vlm=ScriptedVLM())
    assert sorted(i for i, _ in result.written) == [src, a]


def test_a_camera_edit_states_its_angle_even_when_the_vlm_leaves_it_out(project, add_image):
    src = add_image(Image.new("RGB", (64, 64), (200, 30, 30)))
    left = {"recipe": "left_view", "axis": "camera", "caption": "seen from slightly to the left",
            "prompt": "Change camera angle to slightly left view, maintain character appearance."}
    turned = add_image(Image.new("RGB", (64, 64), (30, 200, 30)), "enriched", parent=src, params=left)
    said = add_image(Image.new("RGB", (64, 64), (30, 30, 200)), "enriched", parent=src, params=left)
    beach = add_image(Image.new("RGB", (64, 64), (90, 90, 30)), "enriched", parent=src, params=EDIT)
    caption(project, vlm=ScriptedVLM().enqueue(["fw_test, the source photo", "fw_test in a red studio.",
                                                "fw_test seen from slightly to the left, studio light",
                                                "fw_test on a beach"]))
    got = captions(project)
    assert got[turned][0] == "fw_test in a red studio, seen from slightly to the left"
    assert got[said][0] == "fw_test seen from slightly to the left, studio light"  # already said: unchanged
    assert got[beach][0] == "fw_test on a beach"  # not a camera edit


def test_the_captioner_is_told_the_stage_size_before_its_first_batch(project, three_images):
    """The stage's size decides whether compiling the decode step pays off (vlm_compile = "auto"), so the
    captioner hears it before the first batch, not batch by batch."""
    heard = []

    class Listens(ScriptedVLM):
        def expect(self, requests):
            heard.append((requests, len(self.requests)))

    vlm = Listens().enqueue("fw_test a.", "fw_test b.", "fw_test c.")
    caption(project, with_caption(project, batch_size=2), vlm=vlm)
    assert heard == [(3, 0)]
