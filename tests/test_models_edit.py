"""Image-editing adapters (Qwen-Image-Edit-Plus, InstructPix2Pix, Kontext) and the editor / text-to-image
loaders, on tiny random pipelines saved as real diffusers folders: settings and editor LoRAs reach the
pipeline call, the prompt names Picture 1, edits batch where the pipeline allows."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from flywheel.config import ModelsConfig
from flywheel.errors import ConfigError, ModelNotFoundError
from flywheel.models import load_editor, load_text_to_image
from flywheel.models.base import EditRequest, ImageEditor, TextToImage, TextToImageRequest


def _source(size=(80, 64), color=(200, 40, 40)) -> Image.Image:
    rng = np.random.default_rng(0)
    arr = np.clip(np.array(color) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


class PipeSpy:
    """Wraps a loaded pipeline: records every call's keyword arguments, then runs the real pipeline."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return self.pipe(**kwargs)

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def _arr(im: Image.Image) -> np.ndarray:
    return np.asarray(im, dtype=np.int16)


def test_qwen_image_edit_plus_passes_source_then_references(tiny_qwen_image_edit_dir, small_qwen_edit_inputs):
    editor = load_editor(str(tiny_qwen_image_edit_dir), num_inference_steps=2, true_cfg_scale=1.0, max_area=64 * 64)
    assert isinstance(editor, ImageEditor) and editor.params()["plus"] is True
    editor.pipe = spy = PipeSpy(editor.pipe)
    source, ref = _source(), _source((48, 64), (40, 40, 200))
    (out,) = editor.edit([EditRequest(source, "make the jacket blue", seed=3, references=[ref])])
    assert isinstance(out, Image.Image) and out.size == (64, 64)  # 80x64 at ~64² px, sides rounded to 32
    assert [im.size for im in spy.calls[0]["image"]] == [source.size, ref.size]  # Picture 1 is the image edited
    # The pipeline's template numbers the pictures in order: the prompt names whom to keep and what the rest are.
    assert spy.calls[0]["prompt"] == (
        "Edit Picture 1: make the jacket blue. Keep the character in Picture 1. Picture 2 shows the same character "
        "in another photo, only as a reference for the face, hair and outfit: do not add anyone from it or copy "
        "its pose or background.")
    assert editor.pipeline_prompt("make the jacket blue.", 2) == (
        "Edit Picture 1: make the jacket blue. Keep the character in Picture 1. Pictures 2 and 3 show the same "
        "character in other photos, only as references for the face, hair and outfit: do not add anyone from them "
        "or copy their pose or background.")
    assert editor.pipeline_prompt("make the jacket blue.", 0) == "make the jacket blue."  # nothing to tell apart
    assert editor.pipeline_prompt("x.", 9).startswith("Edit Picture 1: x. Keep the character in Picture 1. Pictures "
                                                     "2 to 4 show")  # capped at max_references (3)


def test_qwen_settings_and_a_lora_reach_the_pipeline_call(tiny_qwen_image_edit_dir, tiny_qwen_image_lora,
                                                         small_qwen_edit_inputs):
    """Steps, true CFG, negative prompt, output area, the shift and a LoRA: each is used, and recorded."""
    settings = {"num_inference_steps": 3, "true_cfg_scale": 2.0, "negative_prompt": "blurry", "max_area": 32 * 32,
                "scheduler_shift": 3.0}
    plain = load_editor(str(tiny_qwen_image_edit_dir), **settings)
    lora = {"path": str(tiny_qwen_image_lora), "scale": 0.7}
    tuned = load_editor(str(tiny_qwen_image_edit_dir), **settings, loras=[lora])
    tuned.pipe = spy = PipeSpy(tuned.pipe)
    request = EditRequest(_source(), "make the jacket blue", seed=5)
    (edited,) = tuned.edit([request])
    call = spy.calls[0]
    assert (call["num_inference_steps"], call["true_cfg_scale"], call["negative_prompt"]) == (3, 2.0, "blurry")
    assert (call["width"], call["height"]) == edited.size == (32, 32)
    sched = spy.pipe.scheduler.config  # Lightning's fixed shift of 3, whatever the resolution
    assert sched.base_shift == sched.max_shift == pytest.approx(math.log(3)) and sched.shift_terminal is None
    params = tuned.params()
    assert params["loras"] == [{"source": str(tiny_qwen_image_lora), "path": str(tiny_qwen_image_lora),
                                "scale": 0.7, "fused": True}]
    assert params["num_inference_steps"] == 3 and params["scheduler_shift"] == 3.0
    json.dumps(params)  # the catalog stores it as JSON
    (base,) = plain.edit([request])
    assert np.abs(_arr(edited) - _arr(base)).mean() > 1.0  # the LoRA changes the edit


def test_editor_lora_from_the_hub_cache_offline(tiny_qwen_image_edit_dir, tiny_qwen_image_lora, monkeypatch, tmp_path):
    """A hub LoRA is one file fetched through the HF cache; offline, a missing one names the download command."""
    from flywheel.models.editor_options import resolve_lora

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo, commit = tmp_path / "hf" / "hub" / "models--fw-test--tiny-lightning", "1" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(tiny_qwen_image_lora, repo / "snapshots" / commit / "lightning-4steps.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    spec = {"hub": "fw-test/tiny-lightning", "weight": "lightning-4steps.safetensors", "scale": 1.0}
    editor = load_editor(str(tiny_qwen_image_edit_dir), num_inference_steps=2, loras=[spec])
    (record,) = editor.params()["loras"]
    assert record["source"] == "fw-test/tiny-lightning/lightning-4steps.safetensors"
    assert record["path"] == str(repo / "snapshots" / commit / "lightning-4steps.safetensors")
    plain = load_editor(str(tiny_qwen_image_edit_dir), num_inference_steps=2)
    name = "transformer_blocks.0.attn.to_q.weight"
    fused, base = (dict(e.pipe.transformer.named_parameters())[name] for e in (editor, plain))
    assert not np.allclose(fused.detach().numpy(), base.detach().numpy())  # fused into the weights
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set") as err:
        resolve_lora({"hub": "fw-test/tiny-lightning", "weight": "lightning-8steps.safetensors"})
    assert "models--fw-test--tiny-lightning" in str(err.value)
    assert "hf download fw-test/tiny-lightning lightning-8steps.safetensors" in err.value.hint
    with pytest.raises(ModelNotFoundError, match="editor LoRA not found"):
        resolve_lora({"path": str(tmp_path / "nope.safetensors")})


def test_single_image_qwen_editor_batches_same_size_edits(tiny_qwen_image_edit_dir, small_qwen_edit_inputs,
                                                          tmp_path):
    """The original Qwen-Image-Edit pipeline takes lists: same-size edits share a call, seeded per request."""
    folder = tmp_path / "qwen-image-edit"
    shutil.copytree(tiny_qwen_image_edit_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageEditPipeline"}))
    editor = load_editor(str(folder), num_inference_steps=2, true_cfg_scale=1.0, max_area=64 * 64)
    assert editor.params()["plus"] is False and editor.max_references == 0
    editor.pipe = spy = PipeSpy(editor.pipe)
    wide, tall = _source((96, 48)), _source((48, 96), (40, 40, 200))
    reqs = [EditRequest(wide, "make it blue", seed=1), EditRequest(tall, "make it blue", seed=1),
            EditRequest(wide, "make it green", seed=2)]
    out = editor.edit(reqs)
    assert [len(c["prompt"]) for c in spy.calls] == [2, 1]  # the two wide edits in one call
    assert [im.size for im in out] == [(96, 32), (32, 96), (96, 32)]
    alone = editor.edit([reqs[2]])[0]  # a seed's edit does not depend on its batch (float rounding aside)
    assert np.abs(_arr(alone) - _arr(out[2])).max() <= 2


def test_kontext_settings_loras_and_batches_reach_the_pipeline(tiny_flux_dir, tmp_path):
    """Kontext: steps, guidance, output area and an editor LoRA reach the call; same-size edits are one call."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    import torch

    tr = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    torch.manual_seed(3)
    tr.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                              init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(tr))
    lora = tmp_path / "pytorch_lora_weights.safetensors"
    settings = {"num_inference_steps": 2, "guidance_scale": 4.0, "max_sequence_length": 32, "max_area": 32 * 32,
                "auto_resize": False}  # Kontext's own ~1 MP input sizes are slow on a CPU
    editor = load_editor(str(tiny_flux_dir), **settings, loras=[{"path": str(lora), "scale": 1.0}])
    plain = load_editor(str(tiny_flux_dir), **settings)
    editor.pipe = spy = PipeSpy(editor.pipe)
    reqs = [EditRequest(_source((64, 64)), "make it blue", seed=s) for s in (1, 2)]
    out = editor.edit(reqs)
    (call,) = spy.calls  # one call for both edits, one generator each
    assert (call["num_inference_steps"], call["guidance_scale"], len(call["generator"])) == (2, 4.0, 2)
    assert (call["width"], call["height"]) == out[0].size == (32, 32)
    assert editor.params()["loras"][0] == {"source": str(lora), "path": str(lora), "scale": 1.0, "fused": True}
    assert np.abs(_arr(out[0]) - _arr(plain.edit(reqs[:1])[0])).mean() > 1.0


def test_pix2pix_is_seeded_per_request_and_keeps_order(tiny_pix2pix_dir):
    editor = load_editor(str(tiny_pix2pix_dir), num_inference_steps=2, max_area=64 * 64)
    wide, tall = _source((96, 48)), _source((48, 96))
    reqs = [EditRequest(wide, "make it blue", seed=1), EditRequest(tall, "make it blue", seed=1),
            EditRequest(wide, "make it blue", seed=2), EditRequest(wide, "make it blue", seed=1)]
    out = editor.edit(reqs)
    assert [im.size for im in out] == [(88, 48), (48, 88), (88, 48), (88, 48)]  # aspect kept at ~64² px
    a, b, c = (np.asarray(out[i]) for i in (0, 2, 3))
    # Same seed, same result, whatever else is in the batch: up to float rounding, which on the CPU can differ
    # with a row's place in a batched matmul (one CI run saw it; exact equality passed in every other).
    assert np.abs(a.astype(int) - c.astype(int)).max() <= 2
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


def test_an_editor_lora_on_an_fp8_editor_runs_and_warns_about_lightning(tiny_qwen_image_edit_dir, tiny_qwen_image_lora,
                                                                        small_qwen_edit_inputs, caplog):
    """fp8 storage keeps separate LoRA layers, in the compute dtype (fp8 cannot matmul), and says the known trap."""
    import torch

    editor = load_editor(str(tiny_qwen_image_edit_dir), ModelsConfig(quantization="fp8", device="cpu"),
                         num_inference_steps=2, true_cfg_scale=1.0, max_area=64 * 64,
                         loras=[{"path": str(tiny_qwen_image_lora), "scale": 1.0}])
    assert editor.params()["loras"][0].get("fused") is None  # not merged into fp8 weights
    lora_dtypes = {p.dtype for n, p in editor.pipe.transformer.named_parameters() if "lora_" in n}
    assert lora_dtypes == {torch.float32}
    (out,) = editor.edit([EditRequest(_source(), "make it blue", seed=1)])
    assert out.size == (64, 64)
    assert "grid artifacts" in caplog.text and "Lightning" in caplog.text
