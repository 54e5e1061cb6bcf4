"""The plan's other editing routes (issue 14): inpainting, SDXL-Turbo + ControlNet, describe-then-generate, and
per-axis routing (``[enrich.routes]``), on tiny random pipelines of the real architectures, through ``flywheel
enrich``: the character's pixels kept byte for byte, masks and descriptions stored with the lineage, each edit's
backend recorded, and only the moved axis redone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_models_edit import PipeSpy

from flywheel.images import phash, phash_hex, pixel_sha256
from flywheel.project import open_project


@pytest.fixture(scope="module")
def people():
    """Two real photos of a person (the sample's astronaut crops) at 128 px: mediapipe finds her."""
    import tempfile
    from pathlib import Path

    from flywheel.sample import write_sample

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_sample(Path(tmp))[:2]
        return [Image.open(p).convert("RGB").resize((128, 128), Image.Resampling.LANCZOS) for p in paths]


def _add(project, images):
    ids = []
    for i, image in enumerate(images):
        sha, _ = project.store.put_image(image)
        with project.catalog.transaction():
            ids.append(project.catalog.insert("images", {
                "sha256": sha, "pixel_sha256": pixel_sha256(image), "phash": phash_hex(phash(image)),
                "width": image.width, "height": image.height, "kind": "source", "round": 0,
                "original_name": f"s{i}.png"}))
    return ids


def _run(project, *, recipes: str, backend: str = "composite", models: str = "", extra: str = ""):
    """`flywheel enrich` on ``project`` after writing these lines into its flywheel.toml."""
    from click.testing import CliRunner

    from flywheel.cli import main
    from flywheel.config import render_config_template

    project.close()
    toml = project.root / "flywheel.toml"
    text = render_config_template("Test Character", "fw_test")  # each run from the template, as `init` wrote it
    start = text.index("\nrecipes = [", text.index("[enrich]"))
    text = text[:start] + f"\nrecipes = {recipes}\nbackend = \"{backend}\"" + text[text.index("\n", start + 1):]
    text = text.replace("\n[models]\n", f"\n[models]\n{models}\n", 1)
    for block in extra.split("[")[1:]:  # "[enrich.inpaint]\ngrow = 2": keys under the template's own header
        header, _, lines = block.partition("]\n")
        text = text.replace(f"\n[{header}]\n", f"\n[{header}]\n{lines}\n", 1)
    toml.write_text(text, encoding="utf-8")
    return CliRunner().invoke(main, ["-C", str(project.root), "enrich"])


def _edits(root):
    p = open_project(root)
    try:
        rows = p.catalog.query("SELECT o.id AS op, o.work_key, o.params_json, i.id, i.sha256 FROM operations o "
                               "JOIN images i ON i.operation_id = o.id WHERE o.stage = 'enrich' ORDER BY i.id")
        out = []
        for r in rows:
            parent = p.catalog.query("SELECT i.sha256 FROM image_parents ip JOIN images i ON i.id = ip.parent_id "
                                     "WHERE ip.image_id = ? AND ip.role = 'source'", (r["id"],))[0]["sha256"]
            masks = p.catalog.query("SELECT path, sha256, meta_json FROM artifacts WHERE kind = 'edit_mask' AND "
                                    "operation_id = ?", (r["op"],))
            out.append({"key": r["work_key"], "params": json.loads(r["params_json"]), "id": r["id"],
                        "image": p.store.open_image(r["sha256"]), "source": p.store.open_image(parent),
                        "masks": [dict(m) for m in masks], "workspace": p.workspace})
        return out
    finally:
        p.close()


def test_inpainting_keeps_every_pixel_of_the_character_and_stores_the_mask(project, people):
    from flywheel.signals.segmentation import selfie_segmenter

    _add(project, people)
    out = _run(project, recipes='["forest"]', backend="inpaint-sdxl",
               models='editor = "tiny-sdxl-inpainting"', extra="[enrich.inpaint]\ngrow = 2\nfeather = 6\n")
    assert out.exit_code == 0, out.output
    assert "enrich (inpaint-sdxl): 2 edits planned; 2 new, 0 already done" in out.output
    edits = _edits(project.root)
    assert len(edits) == 2
    for e in edits:
        src, img = np.asarray(e["source"]), np.asarray(e["image"])
        assert img.shape == src.shape  # the source's size, whatever size the pipeline ran at
        # The user's guarantee, measured independently of the stored mask: the person (mediapipe P > 0.5) is the
        # source's bytes; the repainted background is not.
        person = np.asarray(selfie_segmenter(0).process(src).segmentation_mask) > 0.5
        assert person.mean() > 0.2 and (img[person] == src[person]).all()
        (mask,) = e["masks"]  # one mask per edit, in the content store, as an artifact of the edit's operation
        alpha = np.asarray(Image.open(e["workspace"] / mask["path"]).convert("L"))
        assert (alpha[person] == 255).all() and (img[alpha == 255] == src[alpha == 255]).all()
        assert ((alpha > 0) & (alpha < 255)).any()  # a feathered edge, not a hard cut
        far = alpha == 0
        assert far.mean() > 0.2 and (img[far] != src[far]).any(axis=-1).mean() > 0.9
        assert json.loads(mask["meta_json"])["image_id"] == e["id"]
        params = e["params"]
        assert params["backend"] == "inpaint-sdxl" and params["editor"]["family"] == "sdxl_inpaint"
        assert params["editor"]["mask"] == {"segmenter": "mediapipe", "sam_model": None, "grow": 2, "feather": 6}
        assert params["pipeline_prompt"] == params["caption"]  # the scene, not the edit instruction
        assert ":inpaint-sdxl=tiny-sdxl-inpainting+" in e["key"]  # [enrich.inpaint] settings are other edits
    p = open_project(project.root)
    try:  # the mask's quality is a score row the judge reads (a failed person mask is rejected)
        scores = p.catalog.query("SELECT details_json FROM scores WHERE scorer = 'mask:mediapipe_selfie'")
        assert len(scores) == 2 and all(json.loads(s["details_json"])["ok"] for s in scores)
    finally:
        p.close()


def test_flux_fill_inpaints_with_the_same_guarantee(people):
    from flywheel.models import load_editor
    from flywheel.models.base import EditRequest

    editor = load_editor("tiny-flux-fill", grow=0, feather=4)
    editor.pipe = spy = PipeSpy(editor.pipe)
    (out,) = editor.edit([EditRequest(people[0], "Change the background to a beach.", seed=2)])
    alpha = np.asarray(out.info["edit_mask"])
    src, img = np.asarray(people[0]), np.asarray(out)
    assert type(spy.pipe).__name__ == "FluxFillPipeline" and (alpha == 255).mean() > 0.2
    assert (img[alpha == 255] == src[alpha == 255]).all() and (img[alpha == 0] != src[alpha == 0]).any()
    call = spy.calls[0]  # the pipeline repaints the complement of the kept alpha (white = repaint), at ~64²
    repaint = np.asarray(call["mask_image"])
    assert call["mask_image"].size == (64, 64) == (call["width"], call["height"])
    assert repaint.max() == 255 and repaint.min() == 0 and call["guidance_scale"] == 30.0


def test_sam_masks_any_character_and_its_pixels_are_kept(people, tmp_path, monkeypatch):
    from flywheel.models import load_editor, subject_mask
    from flywheel.models.base import EditRequest
    from flywheel.testing.tiny.sam import build_tiny_sam

    folder = build_tiny_sam(tmp_path / "sam")
    asked = []
    real = subject_mask._sam_probability
    monkeypatch.setattr(subject_mask, "_sam_probability", lambda *a: asked.append(a) or real(*a))
    editor = load_editor("tiny-sdxl-inpainting", segmenter="sam", sam_model=str(folder), grow=0, feather=0)
    source = people[1].resize((128, 96))
    (out,) = editor.edit([EditRequest(source, "a beach", seed=0)])
    (spec, device, points), = [a[1:] for a in asked]
    assert (spec, device, points) == (str(folder), "cpu", [(0.5, 0.5)])  # prompted at the image centre
    prob = real(source, str(folder), "cpu", [(0.5, 0.5)])  # SAM's mask, at the source's size
    kept = prob > 0.5
    assert prob.shape == (96, 128) and 0 < kept.mean() < 1
    assert (np.asarray(out)[kept] == np.asarray(source)[kept]).all()
    assert (np.asarray(out)[~kept] != np.asarray(source)[~kept]).any()
    assert out.info["subject_mask"]["segmenter"] == "sam" and editor.params()["mask"]["segmenter"] == "sam"


def test_sdxl_turbo_controlnet_gets_canny_edges_of_the_source_and_few_steps(people):
    from flywheel.errors import ConfigError
    from flywheel.models import load_editor
    from flywheel.models.base import EditRequest
    from flywheel.models.sdxl_controlnet import canny_image

    editor = load_editor("tiny-sdxl-turbo-controlnet", strength=0.5, num_inference_steps=4)
    editor.pipe = spy = PipeSpy(editor.pipe)
    wide = people[0].resize((128, 96))
    (out,) = editor.edit([EditRequest(wide, "a beach", seed=1)])
    call = spy.calls[0]
    assert type(spy.pipe).__name__ == "StableDiffusionXLControlNetImg2ImgPipeline"
    assert out.size == (72, 56) == (call["width"], call["height"])  # ~64² at the source's 4:3, multiples of 8
    edges = np.asarray(canny_image(call["image"], 100, 200))
    assert np.array_equal(np.asarray(call["control_image"]), edges) and edges.max() == 255
    assert (call["num_inference_steps"], call["strength"], call["guidance_scale"]) == (4, 0.5, 0.0)
    again = load_editor("tiny-sdxl-turbo-controlnet", mode="txt2img")
    again.pipe = spy2 = PipeSpy(again.pipe)
    again.edit([EditRequest(wide, "a beach", seed=1)])
    assert "strength" not in spy2.calls[0] and spy2.calls[0]["image"].mode == "RGB"  # the edges are the image
    with pytest.raises(ConfigError, match="2 steps at strength 0.4 run no denoising step"):
        load_editor("tiny-sdxl-turbo-controlnet", strength=0.4).edit([EditRequest(wide, "a beach", seed=1)])


def test_the_control_image_shapes_the_controlnet_edit(people, monkeypatch):
    """The edges reach the picture: the same seeded edit with the source's Canny edges and with blank edges
    differs (the tiny ControlNet steers like a trained one; a freshly made one would ignore its image)."""
    import flywheel.models.sdxl_controlnet as cn
    from flywheel.models import load_editor
    from flywheel.models.base import EditRequest

    editor = load_editor("tiny-sdxl-turbo-controlnet", strength=1.0, num_inference_steps=2, mode="txt2img")
    request = EditRequest(people[0], "a beach", seed=1)
    (edges,) = editor.edit([request])
    monkeypatch.setattr(cn, "canny_image", lambda image, low, high: Image.new("RGB", image.size))
    (blank,) = editor.edit([request])
    (again,) = editor.edit([request])
    assert np.array_equal(np.asarray(blank), np.asarray(again))  # seeded: any difference is the control's
    diff = np.abs(np.asarray(edges, dtype=np.int16) - np.asarray(blank, dtype=np.int16)).mean()
    assert diff > 0.5, diff  # 1.7 here; a freshly made ControlNet: ~0.005


def test_sdxl_turbo_controlnet_img2img_keeps_the_dtype_it_was_loaded_in():
    """diffusers' from_pipe casts every component to float32 unless given a dtype: on the H200 the img2img route
    ran SDXL-Turbo + ControlNet in fp32 (29.3 GiB) though the editor said bfloat16."""
    import torch

    from flywheel.models import load_editor

    editor = load_editor("tiny-sdxl-turbo-controlnet", dtype="bfloat16")
    assert type(editor.pipe).__name__ == "StableDiffusionXLControlNetImg2ImgPipeline"
    for name in ("unet", "controlnet", "text_encoder", "text_encoder_2"):
        assert {p.dtype for p in getattr(editor.pipe, name).parameters()} == {torch.bfloat16}, name


def test_sdxl_turbo_controlnet_through_flywheel_enrich(project, people):
    _add(project, people[:1])
    out = _run(project, recipes='["oil_painting", "neon"]', backend="sdxl-turbo-controlnet",
               models='editor = "tiny-sdxl-turbo-controlnet"', extra="[enrich.controlnet]\nstrength = 1.0\n")
    assert out.exit_code == 0, out.output
    assert "2 new, 0 already done" in out.output
    for e in _edits(project.root):
        params = e["params"]
        assert params["editor"]["family"] == "sdxl_controlnet" and params["editor"]["control"] == "canny"
        assert params["editor"]["mode"] == "img2img" and params["editor"]["strength"] == 1.0
        assert params["pipeline_prompt"] == params["caption"] and e["image"].size == (64, 64)
        assert not e["masks"]
    rerun = _run(project, recipes='["oil_painting", "neon"]', backend="sdxl-turbo-controlnet",
                 models='editor = "tiny-sdxl-turbo-controlnet"')  # strength back to the preset's: other edits
    assert rerun.exit_code == 0 and "2 new, 0 already done" in rerun.output, rerun.output


def test_describe_then_generate_stores_an_editable_description_and_renders_it(project, people):
    _add(project, people[:1])
    models = 'captioner = "tiny-qwen2-vl"\nbase = "tiny-flux"'
    extra = "[enrich.describe]\nmax_area = 4096\nmax_new_tokens = 32\n"
    out = _run(project, recipes='["forest", "sunset"]', backend="describe-generate", models=models, extra=extra)
    assert out.exit_code == 0, out.output
    assert "2 new, 0 already done" in out.output
    described = project.root / "character.txt"
    first = described.read_text(encoding="utf-8").strip()
    assert first  # the captioner's description, in the project folder for the user to edit
    edits = _edits(project.root)
    assert {e["image"].size for e in edits} == {(64, 64)}
    for e in edits:
        assert e["params"]["backend"] == "describe-generate"
        caption = e["params"]["caption"].rstrip(".")
        assert e["params"]["pipeline_prompt"] == f"{caption[0].upper()}{caption[1:]}. {first}"
        assert e["params"]["editor"]["description"] == first and "#" in e["key"]
    # The user rewrites the description: the next enrich renders their text as new edits; the old ones stay.
    mine = "A woman in a white space suit with short dark hair and brown eyes."
    described.write_text(mine + "\n", encoding="utf-8")
    again = _run(project, recipes='["forest", "sunset"]', backend="describe-generate", models=models, extra=extra)
    assert again.exit_code == 0, again.output
    assert "2 edits planned" in again.output and "0 already done" in again.output
    p = open_project(project.root)
    try:  # new edits from the user's text (a tiny model may render two prompts alike: 'skipped' as identical)
        ops = p.catalog.query("SELECT params_json, status FROM operations WHERE stage = 'enrich' AND "
                              "work_key IS NOT NULL ORDER BY id")
        params = [json.loads(o["params_json"]) for o in ops]
        assert len(ops) == 4 and {o["status"] for o in ops} <= {"ok", "skipped"}
        assert [q["editor"]["description"] for q in params] == [first, first, mine, mine]
        assert all(q["pipeline_prompt"].endswith(". " + mine) for q in params[2:])
        # both versions are in the catalog, the captioner's with its model call
        rows = p.catalog.query("SELECT a.meta_json, o.params_json FROM artifacts a LEFT JOIN operations o ON "
                               "o.id = a.operation_id WHERE a.kind = 'character_description' ORDER BY a.id")
        metas = [json.loads(r["meta_json"]) for r in rows]
        assert [(m["text"], m["written_by"]) for m in metas] == [(first, "captioner"), (mine, "file")]
        assert json.loads(rows[0]["params_json"])["action"] == "describe_character"
    finally:
        p.close()
    # Unchanged, nothing is redone and the captioner is not asked again.
    third = _run(project, recipes='["forest", "sunset"]', backend="describe-generate", models=models, extra=extra)
    assert "0 new, 2 already done" in third.output and "loading" not in third.output


def test_each_axis_goes_to_its_route_and_moving_one_redoes_only_it(project, people):
    _add(project, people[:1])
    routes = ('[enrich.routes]\nbackground = "inpaint-sdxl=tiny-sdxl-inpainting"\n'
              'style = "sdxl-turbo-controlnet=tiny-sdxl-turbo-controlnet"\n')
    recipes = '["studio", "sunset", "oil_painting"]'
    out = _run(project, recipes=recipes, extra=routes)
    assert out.exit_code == 0, out.output
    assert ("enrich (composite, background: inpaint-sdxl=tiny-sdxl-inpainting, style: sdxl-turbo-controlnet="
            "tiny-sdxl-turbo-controlnet): 3 edits planned; 3 new") in out.output
    by_recipe = {e["params"]["recipe"]: e for e in _edits(project.root)}
    made = {r: (e["params"]["backend"], e["params"].get("route"), e["params"]["editor"].get("family"))
            for r, e in by_recipe.items()}
    assert made == {
        "studio": ("inpaint-sdxl", "[enrich.routes] background = inpaint-sdxl=tiny-sdxl-inpainting", "sdxl_inpaint"),
        "sunset": ("composite", None, None),
        "oil_painting": ("sdxl-turbo-controlnet", ("[enrich.routes] style = sdxl-turbo-controlnet="
                         "tiny-sdxl-turbo-controlnet"), "sdxl_controlnet")}
    assert by_recipe["studio"]["key"].endswith(":inpaint-sdxl=tiny-sdxl-inpainting")
    assert by_recipe["sunset"]["key"].endswith(":composite") and len(by_recipe["studio"]["masks"]) == 1
    # The style axis moves to the composite editor: only its edit is made anew.
    moved = _run(project, recipes=recipes, extra=routes.replace(
        'style = "sdxl-turbo-controlnet=tiny-sdxl-turbo-controlnet"', 'style = "composite"'))
    assert moved.exit_code == 0, moved.output
    assert "3 edits planned; 1 new, 2 already done" in moved.output


def test_a_route_to_an_unknown_backend_is_a_one_line_error(project):
    out = _run(project, recipes='["studio"]', extra='[enrich.routes]\nbackground = "inpaint"\n')
    assert out.exit_code == 1
    assert "enrich.routes.background" in out.output and "unknown backend 'inpaint'" in out.output
    assert "Traceback" not in out.output


def test_describe_then_generate_without_sources_or_with_an_empty_description_says_so(project, people):
    models = 'captioner = "tiny-qwen2-vl"\nbase = "tiny-flux"'
    out = _run(project, recipes='["forest"]', backend="describe-generate", models=models)
    assert out.exit_code == 1 and "there are no source images to edit" in out.output
    assert "loading" not in out.output and not (project.root / "character.txt").exists()
    p = open_project(project.root)
    _add(p, people[:1])
    (p.root / "character.txt").write_text("  \n", encoding="utf-8")
    out = _run(p, recipes='["forest"]', backend="describe-generate", models=models)
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "the character description" in out.output and "character.txt is empty" in out.output
