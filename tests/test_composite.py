"""The composite (CPU) editor on a real photo: real person segmentation, real face identity checks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from flywheel.errors import ModelOutputError, StageError
from flywheel.models.base import EditRequest, ImageEditor
from flywheel.recipes import load_recipes
from flywheel.signals import faces

pytest.importorskip("mediapipe")

SIZE = 384


@pytest.fixture(scope="module")
def editor():
    from flywheel.models.composite import CompositeEditor

    ed = CompositeEditor()
    yield ed
    ed.close()


@pytest.fixture(scope="module")
def book():
    return load_recipes()


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.Resampling.LANCZOS)


@pytest.fixture(scope="module")
def outputs(editor, book, astronaut) -> dict[str, Image.Image]:
    """Every shipped recipe applied once (seed 0); shared by the tests below."""
    return {rid: editor.edit([EditRequest(astronaut, r.full_prompt, seed=0, recipe=r)])[0] for rid, r in book.recipes.items()}


def arr(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255


def test_is_an_image_editor(editor):
    assert isinstance(editor, ImageEditor)
    assert editor.params()["backend"] == "composite"


def test_every_shipped_recipe_runs_and_changes_the_image(outputs, astronaut):
    for rid, out in outputs.items():
        assert out.size == astronaut.size and out.mode == "RGB", rid
        assert np.abs(arr(out) - arr(astronaut)).mean() > 0.01, f"{rid} left the image unchanged"


@pytest.mark.parametrize("rid", ["forest", "city_night", "beach", "snowy_mountain", "studio", "desert"])
def test_background_changes_the_background_and_keeps_the_subject(editor, outputs, astronaut, rid):
    src_mask = editor.subject_mask(arr(astronaut)) > 0.5
    mask_img = Image.fromarray(src_mask.astype(np.uint8) * 255)
    inner = np.asarray(mask_img.filter(ImageFilter.MinFilter(9))) > 0  # away from the feathered edge
    outer = np.asarray(mask_img.filter(ImageFilter.MaxFilter(9))) == 0
    diff = np.abs(arr(outputs[rid]) - arr(astronaut)).mean(-1)
    assert diff[inner].mean() < 0.08, "subject pixels should only be gently harmonised"
    assert diff[outer].mean() > 2.5 * diff[inner].mean(), "the background should change far more than the subject"
    out_mask = editor.subject_mask(arr(outputs[rid])) > 0.5
    iou = (src_mask & out_mask).sum() / (src_mask | out_mask).sum()
    assert iou > 0.85, f"the person should still be found in the same place (IoU {iou:.2f})"


def test_same_seed_same_pixels_other_seed_other_pixels(editor, book, astronaut):
    for rid in ["beach", "sunset", "anime", "left_view"]:
        recipe = book.recipes[rid]
        a, b, c = (editor.edit([EditRequest(astronaut, recipe.full_prompt, seed=s, recipe=recipe)])[0] for s in (3, 3, 4))
        assert a.tobytes() == b.tobytes(), rid
        assert a.tobytes() != c.tobytes(), rid


@pytest.mark.skipif(not faces.available(), reason="needs the face extra (dlib)")
def test_identity_survives_background_lighting_and_style_edits(outputs, book, astronaut):
    def embedding(image):
        boxes = faces.detect_faces(image)
        assert boxes, "no face found"
        return faces.embed_faces(image, boxes[:1])[0]

    ref = embedding(astronaut)
    for rid, recipe in book.recipes.items():
        if recipe.axis == "camera":
            continue
        dist = faces.face_distance(ref, embedding(outputs[rid]))
        assert dist < faces.SAME_PERSON_DISTANCE, f"{rid}: face distance {dist:.2f}"


def test_close_up_frames_the_face(outputs, astronaut, editor):
    before, after = editor._largest_face(arr(astronaut)), editor._largest_face(arr(outputs["close_up"]))
    assert before is not None and after is not None
    centre = np.array([SIZE / 2, SIZE / 2])
    assert np.linalg.norm(np.array(after) - centre) < np.linalg.norm(np.array(before) - centre)


def test_no_person_is_a_clear_error_for_backgrounds_but_not_for_lighting(editor, book):
    from skimage import data

    wall = Image.fromarray(data.brick()).convert("RGB").resize((256, 256))
    with pytest.raises(ModelOutputError, match="found no person") as err:
        editor.edit([EditRequest(wall, "x", seed=0, recipe=book.recipes["forest"])])
    assert "qwen-image-edit" in err.value.hint
    relit = editor.edit([EditRequest(wall, "x", seed=0, recipe=book.recipes["sunset"])])[0]
    assert np.abs(arr(relit) - arr(wall)).mean() > 0.02


def test_needs_a_recipe(editor, astronaut):
    with pytest.raises(StageError, match="needs the recipe"):
        editor.edit([EditRequest(astronaut, "Change the background to a forest.", seed=0)])


def test_each_background_is_its_own_scene_and_contact_sheet(outputs, book, editor, astronaut):
    """The scenes differ from one another behind the subject; writes /tmp/composite_sheet.png to look at."""
    ids = [r.id for r in book.recipes.values() if r.axis == "background"]
    behind = editor.subject_mask(arr(astronaut)) < 0.05
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            gap = np.abs(arr(outputs[a]) - arr(outputs[b]))[behind].mean()
            assert gap > 0.08, f"{a} and {b} look alike behind the subject ({gap:.3f})"
    tiles = [np.asarray(outputs[rid].resize((256, 256))) for rid in ids[:6]]
    rows = [np.concatenate(tiles[i:i + 3], axis=1) for i in range(0, len(tiles) - len(tiles) % 3, 3)]
    Image.fromarray(np.concatenate(rows, axis=0)).save("/tmp/composite_sheet.png")


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea())  # a cat's face fills the frame: not a person in a scene


def test_a_failed_subject_mask_is_reported_on_the_image_and_a_good_one_is_not(editor, book, astronaut, cat):
    def report(image, rid):
        return editor.edit([EditRequest(image, "", seed=0, recipe=book.recipes[rid])])[0].info.get("subject_mask")

    for rid in ("forest", "sunset"):  # a cut-out, and a rim light drawn along the mask's edge
        good, bad = report(astronaut, rid), report(cat, rid)
        assert good["ok"] and good["problem"] is None and 0.4 < good["coverage"] < 0.7, rid
        assert not bad["ok"] and bad["coverage"] > 0.85, rid
        assert bad["problem"].startswith("subject mask failed: covers 9") and "no person separable" in bad["problem"]
    # Edits that never use the mask carry no report.
    assert report(cat, "oil_painting") is None and report(cat, "overcast") is None


def test_mask_quality_names_each_failure_shape():
    from flywheel.signals.segmentation import mask_quality

    h = w = 200
    yy, xx = np.mgrid[0:h, 0:w]
    person = (((yy - 120) / 80) ** 2 + ((xx - 100) / 50) ** 2 <= 1).astype(np.float32)
    assert mask_quality(person).ok
    assert "no person found" in mask_quality(np.zeros((h, w), np.float32)).problem
    assert "low confidence" in mask_quality(person * 0.6).problem  # a soft grey blob
    bits = np.zeros((h, w), np.float32)
    for cy, cx in [(40, 40), (40, 160), (160, 40), (160, 160)]:
        bits[cy - 25:cy + 25, cx - 25:cx + 25] = 1.0
    q = mask_quality(bits)
    assert "fragmented: its largest part holds 25%" in q.problem and q.parts == 4


def test_harmonize_moves_the_subject_toward_the_scene_around_it_not_the_far_scene(editor, astronaut):
    import cv2

    from flywheel.models.composite import NEAR_FRACTION, harmonize

    rgb = arr(astronaut)
    alpha = editor.subject_mask(rgb)
    inside = alpha > 0.5
    distance = cv2.distanceTransform((~inside).astype(np.uint8), cv2.DIST_L2, 5)
    near = (distance > 0) & (distance <= NEAR_FRACTION * SIZE)
    scene = np.empty_like(rgb)
    scene[:] = (0.95, 0.9, 0.3)  # bright yellow far away...
    scene[near] = (0.05, 0.1, 0.45)  # ...dark blue right around the subject

    def lab_mean(image):
        return cv2.cvtColor(image.astype(np.float32), cv2.COLOR_RGB2LAB)[inside].mean(0)

    before, after = lab_mean(rgb), lab_mean(harmonize(rgb, scene, alpha, 0.5))
    band = cv2.cvtColor(scene, cv2.COLOR_RGB2LAB)[near].mean(0)
    assert after[0] < before[0] - 3, "the subject darkens toward the dark band, not the bright far scene"
    assert after[2] < before[2] - 5, "and turns bluer (LAB b falls)"
    assert np.linalg.norm(after - band) < np.linalg.norm(before - band) - 5
    assert np.array_equal(harmonize(rgb, scene, alpha, 0.0), rgb)


def test_composite_captions_claim_only_what_the_cpu_editor_renders(book):
    not_rendered = ("anime illustration", "low angle shot", "high angle shot", "seen from", "3D render",
                    "comic book panel", "oil painting", "watercolor painting", "standing in a forest")
    for recipe in book.recipes.values():
        text = recipe.caption_for("composite")
        assert text and not any(claim in text for claim in not_rendered), (recipe.id, text)
        assert recipe.caption_for("qwen-image-edit") == recipe.caption  # generative editors do render the prompt
    assert book.recipes["anime"].caption_for("composite") == "posterised cel-shading filter, dark ink outlines"


def test_enrich_counts_failed_masks_and_the_judge_rejects_those_edits(project, add_image, astronaut, cat):
    """Through the stages a user runs: enrich records each mask report as a score, its summary counts the
    failures, template captions are the composite ones, and the judge rejects only the failed cut-outs."""
    import json

    from flywheel.config import EnrichConfig
    from flywheel.enrich import enrich
    from flywheel.judge import judge

    person, animal = add_image(astronaut), add_image(cat)
    result = enrich(project, EnrichConfig(backend="composite", recipes=["forest", "sunset", "oil_painting"]))
    assert len(result.made) == 6 and len(result.mask_failed) == 2
    assert "2 with a failed subject mask (the judge rejects them)" in result.summary()
    rows = project.catalog.query(
        "SELECT i.id, p.parent_id, json_extract(o.params_json, '$.recipe') AS recipe, o.params_json, s.details_json "
        "FROM images i JOIN image_parents p ON p.image_id = i.id JOIN operations o ON o.id = i.operation_id "
        "LEFT JOIN scores s ON s.image_id = i.id AND s.scorer = 'mask:mediapipe_selfie' WHERE i.kind = 'enriched'")
    masks = {(r["parent_id"], r["recipe"]): r["details_json"] and json.loads(r["details_json"]) for r in rows}
    assert masks[animal, "oil_painting"] is None and masks[person, "oil_painting"] is None  # no mask used
    assert masks[person, "forest"]["ok"] and masks[person, "sunset"]["ok"]
    assert not masks[animal, "forest"]["ok"] and not masks[animal, "sunset"]["ok"]
    assert sorted(result.mask_failed) == sorted(r["id"] for r in rows
                                                if r["parent_id"] == animal and r["recipe"] != "oil_painting")
    captions = {r["recipe"]: json.loads(r["params_json"])["caption"] for r in rows}
    assert captions["forest"] == "in front of an illustrated forest backdrop"

    cfg = project.config.model_copy(deep=True)
    cfg.models.judge = "none"
    verdicts = dict((i, (v, why)) for i, v, why in judge(project, cfg).verdicts)
    for image_id in result.mask_failed:
        verdict, reason = verdicts[image_id]
        assert verdict == "rejected" and "edit_applied: subject mask failed: covers 9" in reason
    assert not any("subject mask failed" in why for i, (_, why) in verdicts.items() if i not in result.mask_failed)
