"""The editors of 2026 (issue 11): FLUX.2 klein (stock and KV-cached), LongCat-Image-Edit, FireRed-Image-Edit
presets, and the Qwen3-VL captioner presets, on tiny random pipelines of the real architectures saved as
diffusers folders: family detection, settings and LoRAs reaching the pipeline call, seeds, and edits
through ``flywheel enrich``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from flywheel.config import EditorLora, EnrichConfig
from flywheel.errors import ConfigError
from flywheel.images import phash, phash_hex, pixel_sha256
from flywheel.models import load_editor, load_vlm, resolve
from flywheel.models.base import ChatRequest, EditRequest
from flywheel.models.presets import PRESETS
from conftest import write_biting_lora
from test_models_edit import PipeSpy


def _image(size=(80, 64), color=(200, 40, 40), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def _arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory):
    """The tiny-flux2-klein preset's folder: a real Flux2KleinPipeline folder with tiny random weights, built in
    the session's tiny-model cache (conftest's, set here too: a module fixture runs before the autouse one)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYWHEEL_CACHE", str(tmp_path_factory.getbasetemp() / "flywheel-cache"))
        return resolve("tiny-flux2-klein").folder


@pytest.fixture(scope="module")
def klein_lora(klein_dir, tmp_path_factory):
    """A diffusers-format LoRA for the tiny klein transformer, with weights large enough to change edits."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel

    tr = Flux2Transformer2DModel.from_pretrained(klein_dir, subfolder="transformer")
    return write_biting_lora(tr, Flux2KleinPipeline, tmp_path_factory.mktemp("klein-lora"))


@pytest.fixture
def small_longcat(monkeypatch):
    """LongCat-Image-Edit always samples at ~1024² (VAE and transformer); 64² keeps a tiny edit under a second."""
    import diffusers.pipelines.longcat_image.pipeline_longcat_image_edit as longcat

    real = longcat.calculate_dimensions
    monkeypatch.setattr(longcat, "calculate_dimensions", lambda area, ratio: real(64 * 64, ratio))


def test_klein_detected_from_model_index_passes_source_then_references(klein_dir):
    editor = load_editor(str(klein_dir), num_inference_steps=3, guidance_scale=1.0, max_area=96 * 64,
                         max_sequence_length=32)
    assert editor.params()["family"] == "flux2_klein" and editor.params()["kv_cache"] is False
    assert type(editor.pipe).__name__ == "Flux2KleinPipeline" and editor.params()["distilled"] is True
    editor.pipe = spy = PipeSpy(editor.pipe)
    source, ref = _image((96, 64)), _image((48, 64), (40, 40, 200))
    (out,) = editor.edit([EditRequest(source, "make the jacket blue", seed=3, references=[ref])])
    call = spy.calls[0]
    assert out.size == (96, 64) == (call["width"], call["height"])  # at ~96x64 px, sides multiples of 16
    # klein's condition images: the edited one first, then the reference, each at about max_area.
    assert [im.size for im in call["image"]] == [(96, 64), (64, 96)]
    assert call["prompt"] == ("make the jacket blue. Keep the person from image 1 and edit image 1. Image 2 shows "
                              "the same person, only as a reference for the face, hair and outfit: do not copy its "
                              "pose or background.")
    assert (call["num_inference_steps"], call["guidance_scale"], call["max_sequence_length"]) == (3, 1.0, 32)
    # klein rejects condition images under 64 px a side: a thin source is scaled up, keeping its aspect ratio.
    editor.settings["max_area"] = 64 * 64
    (thin,) = editor.edit([EditRequest(_image((96, 40)), "make it red", seed=1)])
    assert thin.size == (128, 64) and [im.size for im in spy.calls[-1]["image"]] == [(128, 64)]
    assert editor.pipeline_prompt("make it red", 0) == "make it red"
    assert editor.pipeline_prompt("make it red", 5).startswith("make it red. Keep the person from image 1 and edit "
                                                               "image 1. Images 2 to 4 show")  # max_references 3


def test_klein_is_deterministic_per_seed_and_a_lora_changes_its_edits(klein_lora):
    editor = load_editor("tiny-flux2-klein")
    req = [EditRequest(_image(), "make it blue", seed=5, references=[_image(seed=1)])]
    first, again = editor.edit(req)[0], editor.edit(req)[0]
    (other,) = editor.edit([EditRequest(_image(), "make it blue", seed=6, references=[_image(seed=1)])])
    assert (_arr(first) == _arr(again)).all() and not (_arr(first) == _arr(other)).all()
    with_lora = load_editor("tiny-flux2-klein", loras=[{"path": str(klein_lora), "scale": 0.7}])
    assert with_lora.params()["loras"] == [{"source": str(klein_lora), "path": str(klein_lora), "scale": 0.7,
                                           "fused": True}]
    assert np.abs(_arr(with_lora.edit(req)[0]) - _arr(first)).mean() > 1.0


def test_klein_kv_folder_loads_the_kv_pipeline_without_guidance():
    editor = load_editor("tiny-flux2-klein-kv", guidance_scale=3.0)
    assert type(editor.pipe).__name__ == "Flux2KleinKVPipeline"
    assert editor.params()["kv_cache"] is True and editor.params()["distilled"] is True
    editor.pipe = spy = PipeSpy(editor.pipe)
    refs = [_image(seed=1), _image(seed=2)]
    first = editor.edit([EditRequest(_image(), "make it blue", seed=1, references=refs)])[0]
    assert "guidance_scale" not in spy.calls[0] and len(spy.calls[0]["image"]) == 3  # source + 2 references
    again = editor.edit([EditRequest(_image(), "make it blue", seed=1, references=refs)])[0]
    assert (_arr(first) == _arr(again)).all()


def test_longcat_settings_reach_the_pipeline_one_image_per_call(small_longcat):
    folder = resolve("tiny-longcat-image-edit").folder
    editor = load_editor(str(folder), num_inference_steps=3, guidance_scale=2.0, negative_prompt="blurry")
    assert editor.params()["family"] == "longcat_edit" and editor.max_references == 0
    editor.pipe = spy = PipeSpy(editor.pipe)
    reqs = [EditRequest(_image(), "make it blue", seed=s, references=[_image(seed=9)]) for s in (1, 1, 2)]
    outs = editor.edit(reqs)
    assert len(spy.calls) == 3 and all(isinstance(c["image"], Image.Image) for c in spy.calls)  # no references
    assert [(c["num_inference_steps"], c["guidance_scale"], c["negative_prompt"]) for c in spy.calls] == \
        [(3, 2.0, "blurry")] * 3
    assert (_arr(outs[0]) == _arr(outs[1])).all() and not (_arr(outs[0]) == _arr(outs[2])).all()
    editor.settings["guidance_scale"] = 1.0  # CFG off (the Turbo preset's): the negative prompt is not sent
    editor.edit(reqs[:1])
    assert spy.calls[-1]["guidance_scale"] == 1.0 and "negative_prompt" not in spy.calls[-1]
    with pytest.raises(ConfigError, match="LongCat-Image-Edit does not take loras") as err:
        load_editor(str(folder), loras=[{"path": "/x/style.safetensors"}])
    assert "remove loras from [enrich]" in err.value.hint


def test_enrich_keys_per_new_backend():
    from flywheel.enrich_settings import editor_settings

    klein = EnrichConfig(backend="flux2-klein", steps=6, guidance=1.0, max_area=512**2,
                         loras=[EditorLora(path="/abs/style.safetensors")])
    assert editor_settings(klein) == {"num_inference_steps": 6, "guidance_scale": 1.0, "max_area": 512**2,
                                      "loras": [{"path": "/abs/style.safetensors", "scale": 1.0}]}
    with pytest.raises(ConfigError, match="negative_prompt does not apply to backend 'flux2-klein'"):
        editor_settings(EnrichConfig(backend="flux2-klein", negative_prompt="blurry"))
    assert editor_settings(EnrichConfig(backend="longcat-image-edit", steps=8, guidance=1.0)) == {
        "num_inference_steps": 8, "guidance_scale": 1.0}
    for key, value in (("loras", []), ("max_area", 512**2), ("true_cfg", 2.0)):
        with pytest.raises(ConfigError, match=f"{key} does not apply to backend 'longcat-image-edit'"):
            editor_settings(EnrichConfig(backend="longcat-image-edit", **{key: value}))


def _add_sources(project, n=3):
    ids = []
    for i in range(n):
        image = _image((96, 96), (60 * i + 40, 90, 200 - 50 * i), seed=i)
        sha, _ = project.store.put_image(image)
        with project.catalog.transaction():
            ids.append(project.catalog.insert("images", {
                "sha256": sha, "pixel_sha256": pixel_sha256(image), "phash": phash_hex(phash(image)),
                "width": image.width, "height": image.height, "kind": "source", "round": 0,
                "original_name": f"s{i}.png"}))
    return ids


def _cli_enrich(project, backend: str, editor: str, enrich_lines: str = ""):
    from click.testing import CliRunner

    from flywheel.cli import main

    project.close()
    toml = project.root / "flywheel.toml"
    text = toml.read_text(encoding="utf-8")
    start = text.index("\nrecipes = [", text.index("[enrich]"))
    text = text[:start] + '\nrecipes = ["studio"]' + enrich_lines + text[text.index("\n", start + 1):]
    text = text.replace("\n[models]\n", f'\n[models]\neditor = "{editor}"\n', 1)
    toml.write_text(text, encoding="utf-8")
    return CliRunner().invoke(main, ["-C", str(project.root), "enrich", "--backend", backend])


def test_flywheel_enrich_with_klein_edits_each_source_with_references(project):
    from flywheel.project import open_project

    sources = _add_sources(project)
    out = _cli_enrich(project, "flux2-klein", "tiny-flux2-klein", "\nsteps = 3\nguidance = 1.0")
    assert out.exit_code == 0, out.output
    assert "enrich (flux2-klein): 3 edits planned; 3 new, 0 already done" in out.output
    p = open_project(project.root)
    try:
        rows = p.catalog.query("SELECT o.id, o.work_key, o.params_json, i.id AS image_id FROM operations o "
                               "JOIN images i ON i.operation_id = o.id WHERE o.stage = 'enrich' AND o.status = 'ok'")
        assert len(rows) == 3
        for row in rows:
            params = json.loads(row["params_json"])
            # [enrich] settings other than the preset's (steps 3, not 2) are other work: a tagged work key.
            assert ":flux2-klein=tiny-flux2-klein+" in row["work_key"]
            assert params["editor"]["family"] == "flux2_klein" and params["editor"]["num_inference_steps"] == 3
            assert params["pipeline_prompt"].startswith(params["prompt"].rstrip(".") + ". Keep the person from image 1")
            roles = p.catalog.query("SELECT parent_id, role FROM image_parents WHERE image_id = ?", (row["image_id"],))
            assert sorted(r["role"] for r in roles) == ["reference", "reference", "source"]
            assert {r["parent_id"] for r in roles} == set(sources)
    finally:
        p.close()


def test_flywheel_enrich_with_longcat_edits_without_references(project, small_longcat):
    from flywheel.project import open_project

    _add_sources(project, 2)
    out = _cli_enrich(project, "longcat-image-edit", "tiny-longcat-image-edit")
    assert out.exit_code == 0, out.output
    assert "enrich (longcat-image-edit): 2 edits planned; 2 new, 0 already done" in out.output
    p = open_project(project.root)
    try:
        roles = p.catalog.query("SELECT role FROM image_parents p JOIN images i ON i.id = p.image_id "
                                "WHERE i.kind = 'enriched'")
        assert [r["role"] for r in roles] == ["source", "source"]
        params = [json.loads(r[0]) for r in p.catalog.query(
            "SELECT params_json FROM operations WHERE stage = 'enrich' AND status = 'ok' AND work_key IS NOT NULL")]
        assert [pp["editor"]["family"] for pp in params] == ["longcat_edit"] * 2
        assert all("pipeline_prompt" not in pp and pp["reference_image_ids"] == [] for pp in params)
    finally:
        p.close()


def test_firered_and_klein_presets_name_their_weights_settings_and_licences():
    stock, fast = PRESETS["firered-image-edit-1.1"], PRESETS["firered-image-edit-1.1-lightning"]
    assert stock.family == fast.family == "qwen_image_edit" and stock.hub_id == "FireRedTeam/FireRed-Image-Edit-1.1"
    assert (stock.settings["num_inference_steps"], stock.settings["true_cfg_scale"]) == (50, 4.0)
    assert fast.settings["loras"] == [{"hub": "FireRedTeam/FireRed-Image-Edit-1.0-Lightning",
                                       "weight": "FireRed-Image-Edit-1.0-Lightning-8steps-v1.0.safetensors",
                                       "scale": 1.0}]
    assert PRESETS["flux2-klein-4b"].licence.commercial and not PRESETS["flux2-klein-9b"].licence.commercial
    assert PRESETS["flux2-klein-4b"].settings["num_inference_steps"] == 4
    assert (PRESETS["longcat-image-edit"].settings, PRESETS["longcat-image-edit-turbo"].settings) == (
        {"num_inference_steps": 50, "guidance_scale": 4.5}, {"num_inference_steps": 8, "guidance_scale": 1.0})
    for name in ("flux2-klein-9b", "longcat-image-edit", "firered-image-edit-1.1", "qwen3-vl-2b", "qwen3-vl-4b"):
        assert "estimate" in PRESETS[name].note  # VRAM figures not measured yet say so
    assert "measured" in PRESETS["flux2-klein-4b"].note and PRESETS["flux2-klein-4b"].vram_gib == 17.3


def test_qwen3_vl_presets_load_through_the_qwen_vl_adapter():
    assert [PRESETS[f"qwen3-vl-{s}"].hub_id for s in ("2b", "4b", "8b")] == [
        "Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"]
    assert {PRESETS[f"qwen3-vl-{s}"].family for s in ("2b", "4b", "8b")} == {"qwen_vl"}
    vlm = load_vlm("tiny-qwen3-vl")
    assert vlm.params()["model"] == "tiny-qwen3-vl"
    (answer,) = vlm.generate([ChatRequest("describe the image", images=[_image((64, 64))])], max_new_tokens=4)
    assert isinstance(answer, str)
    probs = vlm.option_probabilities([ChatRequest("is the same person?", images=[_image((64, 64))])], ["yes", "no"])
    assert abs(sum(probs[0].values()) - 1.0) < 1e-5
