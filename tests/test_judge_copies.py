"""Too close as well as too far: near copies and mirrored copies of a source are caught by the judge's
copy check (structure + colour + face, signals.copies); honest edits (new background, new light) are not."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from flywheel.judge import judge
from test_judge import pixel_only

EDIT = {"recipe_id": "backdrop", "prompt": "change the background to a cool blue studio backdrop"}


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(buf).convert("RGB")


def failing(reason: str) -> set[str]:
    return {part.split(":")[0] for part in reason.split("; ") if not part.startswith("also:")}


def verdicts(project) -> dict[int, tuple[str, str]]:
    rows = project.catalog.query("SELECT image_id, verdict, reason FROM verdicts ORDER BY id")
    return {r["image_id"]: (r["verdict"], r["reason"]) for r in rows}


@pytest.fixture(scope="module")
def copies(planted):
    """A near copy (12% brighter, noise, JPEG q80) and a mirrored copy (flipped, JPEG q85) of the source.

    Neither is a near-duplicate: the brighter copy changes ~40% of the pixels beyond the duplicate check's
    5%, and the mirrored one has another perceptual hash. Only the copy check sees them for what they are.
    """
    src = np.asarray(planted["source"], dtype=np.float32) * 1.12
    noisy = np.clip(src + np.random.default_rng(1).normal(0, 6, src.shape), 0, 255).astype(np.uint8)
    return {"near": jpeg(Image.fromarray(noisy), 80), "mirrored": jpeg(ImageOps.mirror(planted["source"]), 85)}


def test_near_and_mirrored_copies_are_rejected_and_an_honest_edit_is_not(project, add_image, planted, copies):
    from flywheel.sample import sample_images

    other = add_image(dict(sample_images())["astronaut_portrait.png"])  # a second source: name the right one
    src = add_image(planted["source"])
    # Generated images have no parent: the copy check is the only thing that can catch them.
    near = add_image(copies["near"], "synthetic", params={"prompt": "fw_test portrait"}, round_=1)
    # An "edit" that only flips its source changes most pixels, so edit_applied passes: copy catches it.
    mirrored = add_image(copies["mirrored"], "enriched", parent=src, params=EDIT)
    honest = add_image(planted["good"], "enriched", parent=src, params=EDIT)
    judge(project, pixel_only(project))
    v = verdicts(project)

    assert v[near][0] == "rejected" and failing(v[near][1]) == {"copy"}
    assert f"copy: near copy of source #{src} (structure SSIM 0.9" in v[near][1]
    assert "face distance 0.1" in v[near][1]  # the face matched too (a copy's face is the source's face)
    assert v[mirrored][0] == "rejected" and failing(v[mirrored][1]) == {"copy"}
    assert f"copy: mirrored copy of source #{src}" in v[mirrored][1]
    # The new background keeps her face pixel for pixel, but the frame is no longer the source.
    assert v[honest][0] == "accepted" and "not a copy (SSIM 0.8" in v[honest][1]
    # Scores are rows naming their scorer (never decisions): structure and colour, with the nearest source.
    rows = {r["scorer"]: (r["value"], json.loads(r["details_json"])) for r in project.catalog.query(
        "SELECT scorer, value, details_json FROM scores WHERE image_id = ? AND criterion = 'copy'", (mirrored,))}
    assert set(rows) == {"pixels:ssim", "pixels:delta_e"}
    ssim, details = rows["pixels:ssim"]
    assert ssim > 0.99 and details["mirrored"] is True and details["source_id"] == src
    assert details["ssim_straight"] < 0.2 and rows["pixels:delta_e"][0] < 4.0
    assert other not in v


def test_a_relit_source_keeps_its_structure_but_is_not_a_copy(project, add_image, planted):
    """SSIM alone cannot tell a relight from a copy (golden hour keeps ~0.96); the colour difference can."""
    from flywheel.models.base import EditRequest
    from flywheel.models.composite import CompositeEditor
    from flywheel.recipes import load_recipes

    recipe = load_recipes().recipes["golden_hour"]
    relit = CompositeEditor().edit([EditRequest(planted["source"], recipe.full_prompt, seed=0, recipe=recipe)])[0]
    src = add_image(planted["source"])
    img = add_image(relit, "enriched", parent=src, params={"recipe": "golden_hour", "prompt": recipe.full_prompt})
    judge(project, pixel_only(project))
    verdict, reason = verdicts(project)[img]
    assert "copy" not in failing(reason) if verdict == "rejected" else "not a copy" in reason
    ssim, delta_e = (project.catalog.query("SELECT value FROM scores WHERE image_id = ? AND scorer = ?",
                                           (img, scorer))[0][0] for scorer in ("pixels:ssim", "pixels:delta_e"))
    assert ssim > 0.9 and delta_e > 8.0  # same structure, every colour moved: a new light, not a copy


def test_the_copy_band_is_policy(project, add_image, planted, copies):
    """Thresholds in [judge] decide, and changing them re-judges (new rows, the fingerprint changed)."""
    src = add_image(planted["source"])
    near = add_image(copies["near"], "synthetic", params={"prompt": "fw_test portrait"}, round_=1)
    judge(project, pixel_only(project, min_face_distance_copy=0.05))  # the face differs "enough": not a copy
    judge(project, pixel_only(project))
    rows = project.catalog.query("SELECT verdict, reason FROM verdicts WHERE image_id = ? ORDER BY id", (near,))
    assert [r["verdict"] for r in rows] == ["accepted", "rejected"]
    assert "not a copy" in rows[0]["reason"] and f"near copy of source #{src}" in rows[1]["reason"]
