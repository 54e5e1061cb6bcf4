"""FLUX.2 klein as a LoRA family on tiny twins of klein-base / klein: it learns, resumes exactly, the LoRA changes
the stock ``Flux2KleinPipeline`` (the distilled klein it renders on), and the ComfyUI export has FLUX.2's names."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flywheel.config import TrainConfig

BASE, RENDER = "tiny-flux2-klein-base", "tiny-flux2-klein"


def train(project, *args, **kwargs):
    from flywheel.train import train as run_train

    return run_train(project, *args, force=True, **kwargs)  # sources only, on purpose


def pattern(w: int, h: int, seed: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    f = np.random.default_rng(seed).uniform(0.05, 0.2, 3)
    return Image.fromarray(np.stack([127 + 120 * np.sin(f[c] * (x + 2 * y) + c) for c in range(3)], -1).astype(np.uint8))


def add_source(project, image: Image.Image, caption: str | None = None) -> None:
    sha, _ = project.store.put_image(image)
    image_id = project.catalog.insert("images", {
        "sha256": sha, "pixel_sha256": sha, "phash": "0" * 16, "width": image.width, "height": image.height,
        "kind": "source", "round": 0})
    if caption:
        project.catalog.insert("captions", {"image_id": image_id, "text": caption, "source": "vlm"})


@pytest.fixture
def klein_project(project):
    add_source(project, pattern(64, 64, 0), "fw_test in a red room")
    add_source(project, pattern(96, 64, 1), "fw_test on a beach, wide shot")
    add_source(project, pattern(48, 48, 2))  # no caption: trained as the trigger word
    return project


@pytest.fixture
def klein_cfg() -> TrainConfig:
    return TrainConfig(
        base_model=BASE, resolution=64, bucket_step=16, rank=4, alpha=8, steps=6, learning_rate=5e-3,
        caption_dropout=0.2, gradient_checkpointing=False, max_sequence_length=32, checkpoint_every=2,
        sample_every=0, sample_prompts=["a photo of {trigger}"], sample_seeds=[0], sample_steps=2, sample_size=64)


def _pipe(spec: str):
    from diffusers import Flux2KleinPipeline

    from flywheel.models import resolve

    pipe = Flux2KleinPipeline.from_pretrained(resolve(spec).folder, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> np.ndarray:
    import torch

    out = pipe(prompt="a photo of fw_test", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
               generator=torch.Generator().manual_seed(0)).images[0]
    return np.asarray(out, dtype=np.int16)


def test_klein_lora_learns_and_changes_the_stock_distilled_pipeline(klein_project, klein_cfg):
    import torch

    from flywheel.training.families.flux2_klein import Flux2Klein
    from flywheel.training.flux_step import Batch

    cfg = klein_cfg.model_copy(update={
        "steps": 30, "caption_dropout": 0.0, "checkpoint_every": 100, "learning_rate": 3e-2, "rank": 8,
        "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj", "linear_in", "linear_out"]})
    result = train(klein_project, cfg)
    assert len(result.losses) == 30 and result.lora_path.is_file() and result.kohya_path.is_file()

    # A fixed evaluation (same noise, same t) on a training image, through the stock distilled klein.
    family, pipe = Flux2Klein(), _pipe(RENDER)
    px = torch.from_numpy(np.asarray(pattern(64, 64, 0), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        lat = family.encode_latent(pipe.vae, px)
        pe = family.encode_text(pipe, "fw_test in a red room", max_sequence_length=32)["prompt_embeds"]
        noise = torch.randn(8, *lat.shape[1:], generator=torch.Generator().manual_seed(0))
        batch = Batch(lat.repeat(8, 1, 1, 1), pe.repeat(8, 1, 1), None)
        sig = torch.linspace(0.1, 0.9, 8)
        before, img_before = float(family.loss(pipe.transformer, batch, noise, sig)), _image(pipe)
        pipe.load_lora_weights(result.run_dir, adapter_name="round1")  # the stock diffusers loader
        after, img_after = float(family.loss(pipe.transformer, batch, noise, sig)), _image(pipe)
    assert after < 0.85 * before  # the noise part of the velocity is a floor near 1: the rest is learnt
    assert np.abs(img_after - img_before).mean() > 1.0

    run = klein_project.catalog.query("SELECT * FROM lora_runs WHERE id = ?", (result.run_id,))[0]
    assert run["status"] == "ok"
    kinds = {r["kind"] for r in klein_project.catalog.query(
        "SELECT kind FROM artifacts WHERE lora_run_id = ?", (result.run_id,))}
    assert {"lora", "lora_kohya", "config", "loss_csv", "sample"} <= kinds
    import json

    resolved = json.loads((result.run_dir / "config.json").read_text())
    assert (resolved["family"], resolved["generate_model"]) == ("flux2_klein", RENDER)


def test_klein_resume_reproduces_the_uninterrupted_run_bit_for_bit(klein_project, klein_cfg):
    from safetensors.torch import load_file

    full = train(klein_project, klein_cfg)

    class Killed(Exception):
        pass

    def kill_at_step_3(done: int, total: int, label: str = "") -> None:
        if done == 3:
            raise Killed

    with pytest.raises(Killed):
        train(klein_project, klein_cfg, dataset_version=full.dataset_version, progress=kill_at_step_3)
    resumed = train(klein_project, resume=True)  # from the step-2 checkpoint
    assert resumed.run_id != full.run_id and resumed.losses == full.losses
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_comfyui_export_has_flux2_names_shapes_and_the_same_deltas(klein_project, klein_cfg):
    """ComfyUI names a LoRA layer ``lora_unet_`` + the original FLUX.2 key, dots as underscores (its loader maps
    every ``diffusion_model.<key>.weight`` of the model that way); q/k/v are one fused Linear there. The file
    also loads in the stock ``Flux2KleinPipeline`` (diffusers reads kohya FLUX.2 keys) and renders as the
    diffusers-format LoRA does."""
    import torch
    from safetensors.torch import load_file

    targets = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
               "linear_in", "linear_out", "to_qkv_mlp_proj"]
    result = train(klein_project, klein_cfg.model_copy(update={"steps": 2, "learning_rate": 5e-2,
                                                               "target_modules": targets}))
    dif, koh = load_file(str(result.lora_path)), load_file(str(result.kohya_path))
    r, d = 4, 32  # rank; the tiny klein's hidden size (MLP 3x, SwiGLU: linear_in is 2 x 96 wide)
    shapes = {"double_blocks_0_img_attn_qkv": ((3 * r, d), (3 * d, 3 * r)),
              "double_blocks_0_txt_attn_qkv": ((3 * r, d), (3 * d, 3 * r)),
              "double_blocks_0_img_attn_proj": ((r, d), (d, r)), "double_blocks_0_txt_attn_proj": ((r, d), (d, r)),
              "double_blocks_0_img_mlp_0": ((r, d), (6 * d, r)), "double_blocks_0_img_mlp_2": ((r, 3 * d), (d, r)),
              "double_blocks_0_txt_mlp_0": ((r, d), (6 * d, r)), "double_blocks_0_txt_mlp_2": ((r, 3 * d), (d, r)),
              "single_blocks_0_linear1": ((r, d), (3 * d + 6 * d, r))}
    want = {}
    for name, (down, up) in shapes.items():
        want |= {f"lora_unet_{name}.lora_down.weight": down, f"lora_unet_{name}.lora_up.weight": up,
                 f"lora_unet_{name}.alpha": ()}
    assert {k: tuple(v.shape) for k, v in koh.items()} == want

    def delta(name: str) -> torch.Tensor:
        up, down = koh[f"lora_unet_{name}.lora_up.weight"].float(), koh[f"lora_unet_{name}.lora_down.weight"].float()
        return up @ down * (koh[f"lora_unet_{name}.alpha"].item() / down.shape[0])

    def dif_delta(mod: str) -> torch.Tensor:
        return dif[f"transformer.{mod}.lora_B.weight"] @ dif[f"transformer.{mod}.lora_A.weight"]

    qkv = torch.cat([dif_delta(f"transformer_blocks.0.attn.add_{x}_proj") for x in "qkv"])
    assert qkv.abs().max() > 0
    assert torch.allclose(delta("double_blocks_0_txt_attn_qkv"), qkv, atol=2e-2 * qkv.abs().max().item())
    lin1 = dif_delta("single_transformer_blocks.0.attn.to_qkv_mlp_proj")
    assert torch.allclose(delta("single_blocks_0_linear1"), lin1, atol=2e-2 * lin1.abs().max().item())

    images = {}
    for name, weight in [("none", None), ("diffusers", result.lora_path.name), ("comfyui", result.kohya_path.name)]:
        pipe = _pipe(RENDER)
        if weight:
            pipe.load_lora_weights(result.run_dir, weight_name=weight, adapter_name=name)
        images[name] = _image(pipe)
    assert np.abs(images["diffusers"] - images["none"]).mean() > 1.0
    assert np.abs(images["comfyui"] - images["diffusers"]).mean() < 0.1 * np.abs(images["diffusers"] - images["none"]).mean()


def test_klein_targets_name_real_layers_and_refuse_the_double_blocks_container():
    """The family's layer list is the tiny twin's (the real architecture), and ``attn.to_out`` (a ModuleList
    in double blocks) is refused before any loading, with the names to use."""
    import torch
    from diffusers import Flux2Transformer2DModel

    from flywheel.errors import ConfigError
    from flywheel.models import resolve
    from flywheel.training.families.flux2_klein import KLEIN_LINEARS, Flux2Klein
    from flywheel.training.setup import BaseLoad, check_runnable

    tr = Flux2Transformer2DModel.from_pretrained(resolve(BASE).folder, subfolder="transformer")
    linears = {n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == {n.replace("{i}", "0") for n in KLEIN_LINEARS}
    load = BaseLoad("cpu", "float32", "none", False)
    check_runnable(TrainConfig(target_modules=["to_qkv_mlp_proj", "to_out.0", "linear_in"]), load, Flux2Klein())
    with pytest.raises(ConfigError, match="'attn.to_out' also matches transformer_blocks.N.attn.to_out, which is "
                                          "not a Linear layer of the FLUX.2 klein transformer"):
        check_runnable(TrainConfig(target_modules=["attn.to_out"]), load, Flux2Klein())
    with pytest.raises(ConfigError, match="'norm_out.linear' has no kohya name"):
        check_runnable(TrainConfig(target_modules=["norm_out.linear"]), load, Flux2Klein())


def test_klein_trains_on_an_fp8_stored_base_with_partial_checkpointing(klein_project, klein_cfg):
    """The low-VRAM base option (quantize_base = "fp8", flywheel.training.fp8) and checkpointing every other block
    work on klein's blocks as on FLUX.1's."""
    from safetensors.torch import load_file

    result = train(klein_project, klein_cfg.model_copy(update={
        "steps": 2, "quantize_base": "fp8", "gradient_checkpointing": True, "checkpoint_every_n_blocks": 2}))
    assert all(np.isfinite(result.losses)) and len(result.losses) == 2
    assert load_file(str(result.kohya_path))["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (96, 12)
    import json

    assert json.loads((result.run_dir / "config.json").read_text())["quantize_base"] == "fp8"
