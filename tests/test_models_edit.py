"""Image-editing adapters (Qwen-Image-Edit-Plus, InstructPix2Pix) and the editor / text-to-image loaders,
on tiny random pipelines saved as real diffusers folders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flywheel.config import ModelsConfig
from flywheel.errors import ConfigError
from flywheel.models import load_editor, load_text_to_image
from flywheel.models.base import EditRequest, ImageEditor, TextToImage, TextToImageRequest


def _source(size=(80, 64), color=(200, 40, 40)) -> Image.Image:
    rng = np.random.default_rng(0)
    arr = np.clip(np.array(color) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def test_qwen_image_edit_plus_passes_source_then_references(tiny_qwen_image_edit_dir):
    editor = load_editor(str(tiny_qwen_image_edit_dir), num_inference_steps=2, true_cfg_scale=1.0, max_area=64 * 64)
    assert isinstance(editor, ImageEditor) and editor.params()["plus"] is True
    seen = []
    real_call = editor.pipe.__call__

    def spy(**kwargs):  # the real pipeline runs; we only record what it was given
        seen.append(kwargs)
        return real_call(**kwargs)

    editor.pipe = type("Spy", (), {"__call__": staticmethod(spy)})()
    source, ref = _source(), _source((48, 64), (40, 40, 200))
    (out,) = editor.edit([EditRequest(source, "make the jacket blue", seed=3, references=[ref])])
    assert isinstance(out, Image.Image) and out.size == (64, 64)  # 80x64 at ~64² px, sides rounded to 32
    assert [im.size for im in seen[0]["image"]] == [source.size, ref.size]  # Picture 1 is the image edited
    assert seen[0]["prompt"] == "make the jacket blue"


def test_pix2pix_is_seeded_per_request_and_keeps_order(tiny_pix2pix_dir):
    editor = load_editor(str(tiny_pix2pix_dir), num_inference_steps=2, max_area=64 * 64)
    wide, tall = _source((96, 48)), _source((48, 96))
    reqs = [EditRequest(wide, "make it blue", seed=1), EditRequest(tall, "make it blue", seed=1),
            EditRequest(wide, "make it blue", seed=2), EditRequest(wide, "make it blue", seed=1)]
    out = editor.edit(reqs)
    assert [im.size for im in out] == [(88, 48), (48, 88), (88, 48), (88, 48)]  # aspect kept at ~64² px
    a, b, c = (np.asarray(out[i]) for i in (0, 2, 3))
    assert np.array_equal(a, c)  # same seed, same result, whatever else is in the batch
    assert not np.array_equal(a, b)  # another seed, another result
    alone = np.asarray(editor.edit([reqs[0]])[0]).astype(int)  # and alone in its batch (float rounding aside)
    assert np.abs(alone - a.astype(int)).max() <= 2


def test_tiny_presets_dispatch_to_each_family(tmp_path):
    pix = load_editor("tiny-instruct-pix2pix")
    assert pix.params()["family"] == "instruct_pix2pix"
    assert load_editor("tiny").params()["family"] == "qwen_image_edit"  # "tiny" follows the default editor
    kontext = load_editor("tiny-flux-kontext")
    assert type(kontext).__name__ == "FluxKontextEditor"
    (edited,) = kontext.edit([EditRequest(_source((64, 64)), "make it blue", seed=0)])
    assert edited.size == (64, 64)
    t2i = load_text_to_image("tiny")
    assert isinstance(t2i, TextToImage) and type(t2i).__name__ == "FluxTextToImage"
    (image,) = t2i.generate([TextToImageRequest("a photo of fw_test", seed=0, width=64, height=64)])
    assert image.size == (64, 64)


def test_editor_config_errors(tiny_pix2pix_dir, tiny_vlm_dir):
    with pytest.raises(ConfigError, match="CUDA"):
        load_editor(str(tiny_pix2pix_dir), ModelsConfig(quantization="int8", device="cpu"))
    with pytest.raises(ConfigError, match="used as the editor"):
        load_editor(str(tiny_vlm_dir))
    with pytest.raises(ConfigError, match="used as the base"):
        load_text_to_image(str(tiny_pix2pix_dir))
