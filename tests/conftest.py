"""Shared fixtures. Everything runs offline on CPU; GPU tests are marked ``gpu`` and skipped without CUDA.

Area-specific fixtures are appended below in delimited blocks (one per area); keep each block small.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network or the user's caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No test reads the user's project or HF cache."""
    home = tmp_path_factory.getbasetemp() / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("FLYWHEEL_PROJECT", raising=False)


@pytest.fixture
def project(tmp_path: Path):
    """A fresh, empty project (opened; closed after the test)."""
    from flywheel.project import init_project, open_project

    init_project(tmp_path / "proj", name="Test Character", trigger="fw_test")
    p = open_project(tmp_path / "proj")
    yield p
    p.close()


# --- FLUX (tiny random FLUX.1 pipeline, built once per session) -------------------------------------
@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    """A real diffusers FLUX.1 folder with tiny random weights (CLIP + T5 + VAE + transformer, ~1 MB)."""
    from flywheel.testing.tiny.flux import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


# --- Caption + judge (planted images built from real photos; rows inserted straight into the catalog) --
@pytest.fixture(scope="session")
def planted():
    """Real-photo test cases for the judge, built once: each fails exactly one pixel criterion.

    source: skimage's astronaut (a real face dlib finds). good: her background recoloured (a real edit).
    other_person: the same edit with a different person's face (LFW, via skimage) pasted over hers.
    copy: the source re-encoded as JPEG (the edit did nothing). blurred / noisy: the good edit degraded.
    near_dup: the good edit re-encoded and 2% brighter (a near-duplicate of it).
    """
    import io

    import numpy as np
    from PIL import Image, ImageEnhance, ImageFilter
    from skimage import data

    def jpeg(im, quality=95):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        return Image.open(buf).convert("RGB")

    source = Image.fromarray(data.astronaut())
    arr = np.asarray(source).copy()
    yy, xx = np.mgrid[0:512, 0:512]
    subject = ((yy - 300) / 260) ** 2 + ((xx - 230) / 170) ** 2 <= 1  # she fills the centre-left of the frame
    arr[~subject] = (arr[~subject] * np.array([0.3, 0.5, 0.9])).astype(np.uint8) + 60
    good = Image.fromarray(arr)
    face = Image.fromarray((data.lfw_subset()[0] * 255).astype(np.uint8)).convert("RGB").resize((150, 150), Image.LANCZOS)
    other = good.copy()
    other.paste(face, (150, 50))  # over the astronaut's face (dlib box ~ (175, 76)-(265, 166))
    rng = np.random.default_rng(0)
    noisy = np.clip(np.asarray(good, dtype=np.float32) / 255 + rng.normal(0, 0.15, (512, 512, 3)), 0, 1)
    return {
        "source": source,
        "good": good,
        "other_person": other,
        "copy": jpeg(source),
        "blurred": good.filter(ImageFilter.GaussianBlur(6)),
        "noisy": Image.fromarray((noisy * 255).astype(np.uint8)),
        "near_dup": jpeg(ImageEnhance.Brightness(good).enhance(1.02)),
    }


@pytest.fixture
def add_image(project):
    """Insert an image the way ingest/enrich would: store + images row (+ recipe operation + lineage)."""
    from flywheel.images import phash, phash_hex, pixel_sha256

    def add(image, kind="source", parent=None, params=None, round_=0):
        sha, _ = project.store.put_image(image)
        op_id = None
        if params is not None:
            stage = "enrich" if kind == "enriched" else "generate"
            op_id = project.catalog.start_operation(stage, model="test-recipe", params=params)
            project.catalog.finish_operation(op_id, "ok", 1)
        with project.catalog.transaction():
            image_id = project.catalog.insert("images", {
                "sha256": sha, "pixel_sha256": pixel_sha256(image), "phash": phash_hex(phash(image)),
                "width": image.width, "height": image.height, "kind": kind, "round": round_,
                "operation_id": op_id})
            if parent is not None:
                project.catalog.insert("image_parents", {"image_id": image_id, "parent_id": parent, "role": "source"})
        return image_id

    return add


# --- review (flywheel review): real sources plus edits, scores and verdicts written as enrich/judge would ---
def add_review_images(project) -> dict[str, int]:
    """Ingest the sample sources, then add 4 'enriched' edits and 1 round-1 'synthetic' image with lineage,
    scores, verdicts and captions. Returns image ids by name ('src0'.., 'forest0', 'sunset0', ...)."""
    from PIL import Image

    from flywheel.ingest import ingest
    from flywheel.sample import write_sample

    project.config.ingest.detect_faces = False  # review never reads face boxes; dlib would only slow the tests
    ingest(project, [str(p) for p in write_sample(project.root / "inputs")])
    sources = [r[0] for r in project.catalog.query("SELECT id FROM images WHERE kind = 'source' ORDER BY id")]
    ids = {f"src{i}": s for i, s in enumerate(sources)}
    tints = {"forest": (40, 140, 60), "sunset": (240, 120, 40)}
    plan = [("forest", 0, "accepted"), ("sunset", 0, "needs_review"), ("forest", 1, "rejected"), ("sunset", 2, None)]
    for recipe, src, verdict in plan:
        base = project.store.open_image(project.catalog.query("SELECT sha256 FROM images WHERE id = ?", (sources[src],))[0][0])
        edited = Image.blend(base, Image.new("RGB", base.size, tints[recipe]), 0.35)
        op = project.catalog.start_operation("enrich", model="composite", seed=src,
                                             params={"recipe": recipe, "prompt": f"Change the background to a {recipe}."})
        project.catalog.finish_operation(op, "ok", 5)
        name = f"{recipe}{src}"
        ids[name] = _add_image(project, edited, "enriched", 0, op)
        project.catalog.insert("image_parents", {"image_id": ids[name], "parent_id": sources[src], "role": "source"})
        project.catalog.insert("scores", {"image_id": ids[name], "criterion": "identity", "scorer": "face:dlib_resnet_v1",
                                          "value": 0.31 + 0.1 * src, "details_json": '{"reason": "face distance to source"}'})
        project.catalog.insert("scores", {"image_id": ids[name], "criterion": "edit_applied", "scorer": "change:pixels",
                                          "value": 0.42})
        if verdict:
            project.catalog.insert("verdicts", {"image_id": ids[name], "verdict": verdict,
                                                "reason": f"identity kept; {recipe} edit {verdict.replace('_', ' ')}"})
        project.catalog.insert("captions", {"image_id": ids[name], "text": f"fw_test in a {recipe}", "source": "template"})
    op = project.catalog.start_operation("generate", model="tiny", params={"prompt": "fw_test on a beach"})
    project.catalog.finish_operation(op, "ok", 5)
    synth = project.store.open_image(project.catalog.query("SELECT sha256 FROM images WHERE id = ?", (sources[3],))[0][0])
    ids["synth1"] = _add_image(project, synth.rotate(180), "synthetic", 1, op)
    project.catalog.insert("verdicts", {"image_id": ids["synth1"], "verdict": "needs_review", "reason": "no face found"})
    return ids


def _add_image(project, image, kind, round_, op) -> int:
    from flywheel.images import phash, phash_hex, pixel_sha256

    sha, _ = project.store.put_image(image)
    return project.catalog.insert("images", {
        "sha256": sha, "pixel_sha256": pixel_sha256(image), "phash": phash_hex(phash(image)), "width": image.width,
        "height": image.height, "kind": kind, "round": round_, "operation_id": op})


@pytest.fixture(scope="session")
def _review_template(tmp_path_factory):
    from flywheel.project import init_project, open_project

    root = tmp_path_factory.mktemp("review-template") / "proj"
    init_project(root, name="Test Character", trigger="fw_test")
    with open_project(root) as p:
        ids = add_review_images(p)
    return root, ids


@pytest.fixture
def review_project(_review_template, tmp_path):
    """(project, ids): a fresh copy of a project with sources, edits, scores and verdicts to review."""
    import shutil

    from flywheel.project import open_project

    root, ids = _review_template
    shutil.copytree(root, tmp_path / "review-proj")  # built once per session; each test gets its own copy
    p = open_project(tmp_path / "review-proj")
    yield p, ids
    p.close()


# --- models (VLM/editors) ---------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _tiny_model_cache(tmp_path_factory, monkeypatch):
    """Tiny presets ("tiny", "tiny-qwen2-vl", ...) build into one cache per test session, never ~/.cache."""
    monkeypatch.setenv("FLYWHEEL_CACHE", str(tmp_path_factory.getbasetemp() / "flywheel-cache"))


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    """A real Qwen2-VL folder (config, safetensors, processor, chat template) with tiny random weights."""
    from flywheel.testing.tiny.vlm import build_tiny_qwen2_vl

    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2-vl", "qwen2_vl")


@pytest.fixture(scope="session")
def tiny_vlm(tiny_vlm_dir):
    """The tiny Qwen2-VL loaded through ``flywheel.models.load_vlm`` on CPU (shared: do not mutate)."""
    from flywheel.models import load_vlm

    return load_vlm(str(tiny_vlm_dir))


@pytest.fixture(scope="session")
def tiny_qwen_image_edit_dir(tmp_path_factory) -> Path:
    """A real QwenImageEditPlusPipeline folder with tiny random weights."""
    from flywheel.testing.tiny.qwen_image import build_tiny_qwen_image_edit

    return build_tiny_qwen_image_edit(tmp_path_factory.mktemp("models") / "tiny-qwen-image-edit")


@pytest.fixture(scope="session")
def tiny_pix2pix_dir(tmp_path_factory) -> Path:
    """A real StableDiffusionInstructPix2PixPipeline folder with tiny random weights."""
    from flywheel.testing.tiny.pix2pix import build_tiny_pix2pix

    return build_tiny_pix2pix(tmp_path_factory.mktemp("models") / "tiny-pix2pix")


@pytest.fixture(scope="session")
def tiny_qwen_image_lora(tiny_qwen_image_edit_dir, tmp_path_factory) -> Path:
    """A diffusers-format LoRA file for the tiny Qwen-Image-Edit transformer, with weights that change edits."""
    from diffusers import QwenImageEditPlusPipeline, QwenImageTransformer2DModel

    tr = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_image_edit_dir, subfolder="transformer")
    return write_biting_lora(tr, QwenImageEditPlusPipeline, tmp_path_factory.mktemp("qwen-lora"))


def write_biting_lora(transformer, pipeline_cls, out: Path) -> Path:
    """A diffusers-format LoRA file for ``transformer`` whose weights change the output clearly (gaussian init
    leaves B at zero, a no-op LoRA, so B is drawn too): what the editor-LoRA tests load."""
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(2)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)
    pipeline_cls.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture
def small_qwen_edit_inputs(monkeypatch):
    """The Qwen-Image-Edit pipelines encode every picture at ~1 MP (VAE) / 384² (text encoder) whatever the
    output size; at 64² instead, a tiny edit with references takes ~2 s on a CPU instead of ~10 s per image."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as single
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", 64 * 64)
    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", 56 * 56)
    real = single.calculate_dimensions
    monkeypatch.setattr(single, "calculate_dimensions", lambda area, ratio: real(64 * 64, ratio))
# --- end models (VLM/editors) -----------------------------------------------------------------------
