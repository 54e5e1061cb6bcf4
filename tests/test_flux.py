"""FLUX adapters on the tiny random FLUX.1 folder: the same from_pretrained code users run on the real weights."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flywheel.errors import ModelLoadError, ModelNotFoundError
from flywheel.models.base import EditRequest, ImageEditor, TextToImage, TextToImageRequest

FAST = {"num_inference_steps": 2, "max_sequence_length": 32}


@pytest.fixture(scope="module")
def t2i(tiny_flux_dir):
    from flywheel.models.flux import FluxTextToImage

    return FluxTextToImage.from_pretrained(tiny_flux_dir, **FAST)


@pytest.fixture(scope="module")
def tiny_lora(tiny_flux_dir, tmp_path_factory):
    """A diffusers-format LoRA file with non-zero weights on the attention projections."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    tr = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    torch.manual_seed(1)
    tr.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                              target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # gaussian init leaves B at zero (a no-op LoRA); make it bite
        for name, p in tr.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("lora")
    FluxPipeline.save_lora_weights(out, transformer_lora_layers=get_peft_model_state_dict(tr))
    return out / "pytorch_lora_weights.safetensors"


def _arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


def test_text_to_image_is_sized_and_deterministic_per_seed(t2i):
    assert isinstance(t2i, TextToImage)
    reqs = [TextToImageRequest("a photo of fw_test", seed=s, width=64, height=48) for s in (1, 2, 1)]
    images = t2i.generate(reqs)
    assert [im.size for im in images] == [(64, 48)] * 3
    assert np.array_equal(_arr(images[0]), _arr(images[2]))  # same seed, same image
    assert not np.array_equal(_arr(images[0]), _arr(images[1]))
    # a seed's image does not depend on the batch it ran in
    alone = t2i.generate([TextToImageRequest("a photo of fw_test", seed=2, width=64, height=48)])[0]
    assert np.abs(_arr(alone) - _arr(images[1])).max() <= 1
    p = t2i.params()
    assert p["family"] == "flux" and p["num_inference_steps"] == 2 and p["loras"] == []


def test_lora_changes_output_and_unload_restores_it(t2i, tiny_lora):
    req = [TextToImageRequest("a portrait of fw_test", seed=7, width=64, height=64)]
    base = _arr(t2i.generate(req)[0])
    t2i.load_lora(str(tiny_lora), name="round1", scale=1.0)
    try:
        assert t2i.params()["loras"] == [{"name": "round1", "path": str(tiny_lora), "scale": 1.0}]
        with_lora = _arr(t2i.generate(req)[0])
        assert np.abs(with_lora - base).mean() > 1.0
    finally:
        t2i.unload_lora()
    assert np.array_equal(_arr(t2i.generate(req)[0]), base)
    assert t2i.params()["loras"] == []


def test_kontext_edit_keeps_size_and_is_deterministic(tiny_flux_dir):
    from flywheel.models.flux import FluxKontextEditor

    editor = FluxKontextEditor.from_pretrained(tiny_flux_dir, auto_resize=False, **FAST)
    assert isinstance(editor, ImageEditor)
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    out = editor.edit([EditRequest(src, "make it blue", seed=3), EditRequest(src, "make it blue", seed=3)])
    assert [im.size for im in out] == [(64, 48), (64, 48)]
    assert np.array_equal(_arr(out[0]), _arr(out[1]))
    assert editor.params()["auto_resize"] is False


def test_missing_folder_and_bad_lora_are_explained(tmp_path, t2i):
    from flywheel.models.flux import FluxTextToImage

    with pytest.raises(ModelNotFoundError):
        FluxTextToImage.from_pretrained(tmp_path / "no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        FluxTextToImage.from_pretrained(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="LoRA weights not found"):
        t2i.load_lora(str(tmp_path / "nope.safetensors"), name="x")
