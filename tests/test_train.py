"""LoRA training on the tiny FLUX: it learns, resumes exactly, and writes LoRAs other tools load."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from flywheel.config import TrainConfig
from flywheel.training.buckets import Bucket, assign_bucket, fit_to_bucket, group_by_bucket, make_buckets


def train(project, *args, **kwargs):
    """``flywheel.train.train`` past its readiness check: these sets are sources only, on purpose."""
    from flywheel.train import train as run_train

    return run_train(project, *args, force=True, **kwargs)


def add_source(project, image: Image.Image, caption: str | None = None) -> int:
    sha, _ = project.store.put_image(image)
    image_id = project.catalog.insert("images", {
        "sha256": sha, "pixel_sha256": sha, "phash": "0" * 16, "width": image.width, "height": image.height,
        "kind": "source", "round": 0,
    })
    if caption:
        project.catalog.insert("captions", {"image_id": image_id, "text": caption, "source": "vlm"})
    return image_id


def pattern(w: int, h: int, seed: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    f = rng.uniform(0.05, 0.2, 3)
    arr = np.stack([127 + 120 * np.sin(f[c] * (x + 2 * y) + c) for c in range(3)], -1)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.fixture
def tiny_cfg(tiny_flux_dir) -> TrainConfig:
    return TrainConfig(
        base_model=str(tiny_flux_dir), resolution=64, bucket_step=16, rank=4, alpha=8, steps=6, learning_rate=5e-3,
        caption_dropout=0.2, gradient_checkpointing=False, max_sequence_length=32, checkpoint_every=2,
        sample_every=0, sample_prompts=["a photo of {trigger}"], sample_seeds=[0], sample_steps=2, sample_size=64,
    )


@pytest.fixture
def dataset_project(project):
    add_source(project, pattern(64, 64, 0), "fw_test in a red room")
    add_source(project, pattern(96, 64, 1), "fw_test on a beach, wide shot")
    add_source(project, pattern(40, 40, 2))  # small, no caption: trained as the trigger word, at 32x32
    return project


def test_buckets_hold_the_right_images_and_never_upscale():
    buckets = make_buckets(1024, 64)
    assert all(b.width % 64 == 0 and b.height % 64 == 0 and b.width * b.height <= 1024 ** 2 for b in buckets)
    assert assign_bucket(1024, 1024, buckets).bucket == Bucket(1024, 1024)
    wide = assign_bucket(1536, 1024, buckets).bucket
    assert abs(wide.aspect - 1.5) < 0.1 and wide.width > wide.height
    small = assign_bucket(300, 500, buckets)
    assert small.downsized and small.bucket.width <= 300 and small.bucket.height <= 500
    assert small.bucket.width % 16 == 0 and abs(small.bucket.aspect - 0.6) < 0.1
    groups = group_by_bucket({1: (1024, 1024), 2: (2048, 2048), 3: (1536, 1024), 4: (300, 500), 5: (1024, 1536)},
                             buckets)
    assert groups[Bucket(1024, 1024)] == [1, 2]
    assert groups[wide] == [3] and groups[small.bucket] == [4]
    tall = [b for b, ids in groups.items() if ids == [5]][0]
    assert tall.height > tall.width
    im = fit_to_bucket(pattern(300, 500, 0), small.bucket)
    assert im.size == (small.bucket.width, small.bucket.height)
    with pytest.raises(ValueError):
        fit_to_bucket(pattern(30, 30, 0), Bucket(64, 64))


def test_loss_goes_down_and_lora_loads_in_stock_pipeline(dataset_project, tiny_cfg, tiny_flux_dir):
    import torch
    from diffusers import FluxPipeline

    from flywheel.training.flux_step import Batch, flow_matching_loss

    cfg = tiny_cfg.model_copy(update={
        "steps": 40, "caption_dropout": 0.0, "checkpoint_every": 100, "learning_rate": 3e-2, "rank": 8,
        "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2"]})
    result = train(dataset_project, cfg)
    assert len(result.losses) == 40 and result.lora_path.is_file() and result.kohya_path.is_file()

    # A fixed evaluation (same noise, same t) on the training images: lower with the LoRA than without.
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae
    px = torch.from_numpy(np.asarray(pattern(64, 64, 0), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    with torch.no_grad():
        lat = (vae.encode(px).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
        pe, pooled, _ = pipe.encode_prompt("fw_test in a red room", prompt_2=None, max_sequence_length=32)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(8, *lat.shape[1:], generator=g)
        sig = torch.linspace(0.1, 0.9, 8)
        batch = Batch(lat.repeat(8, 1, 1, 1), pe.repeat(8, 1, 1), pooled.repeat(8, 1))

        def eval_loss() -> float:
            return float(flow_matching_loss(pipe.transformer, batch, noise, sig))

        def image() -> np.ndarray:
            out = pipe(prompt="a photo of fw_test", height=64, width=64, num_inference_steps=2,
                       max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images[0]
            return np.asarray(out, dtype=np.int16)

        before, img_before = eval_loss(), image()
        pipe.load_lora_weights(result.run_dir, adapter_name="round1")  # the stock diffusers loader
        after, img_after = eval_loss(), image()
    assert after < 0.8 * before
    assert np.abs(img_after - img_before).mean() > 1.0

    # The catalog knows the run, its dataset version, outputs and samples.
    run = dataset_project.catalog.query("SELECT * FROM lora_runs WHERE id = ?", (result.run_id,))[0]
    assert run["status"] == "ok" and run["round"] == 1 and run["finished_at"]
    kinds = {r["kind"] for r in dataset_project.catalog.query(
        "SELECT kind FROM artifacts WHERE lora_run_id = ?", (result.run_id,))}
    assert {"lora", "lora_kohya", "config", "loss_csv", "loss_curve", "sample"} <= kinds
    assert (result.run_dir / "loss.csv").read_text().count("\n") == 41
    members = dataset_project.catalog.query("SELECT COUNT(*) AS n FROM dataset_members WHERE dataset_id = ?",
                                            (run["dataset_id"],))[0]["n"]
    assert members == 3


def test_resume_reproduces_the_uninterrupted_losses(dataset_project, tiny_cfg):
    from safetensors.torch import load_file


    full = train(dataset_project, tiny_cfg)

    class Killed(Exception):
        pass

    def kill_at_step_3(done: int, total: int, label: str = "") -> None:
        if done == 3:
            raise Killed

    with pytest.raises(Killed):
        train(dataset_project, tiny_cfg, dataset_version=full.dataset_version, progress=kill_at_step_3)
    status = dataset_project.catalog.query("SELECT status FROM lora_runs ORDER BY id DESC LIMIT 1")[0]["status"]
    assert status == "failed"
    resumed = train(dataset_project, resume=True)  # continues from the step-2 checkpoint
    assert resumed.run_id != full.run_id
    assert resumed.losses == full.losses
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_kohya_export_has_bfl_names_and_exact_deltas(dataset_project, tiny_cfg):
    import torch
    from safetensors.torch import load_file


    cfg = tiny_cfg.model_copy(update={"steps": 2, "learning_rate": 5e-2})
    result = train(dataset_project, cfg)
    dif, koh = load_file(str(result.lora_path)), load_file(str(result.kohya_path))
    r = 4
    assert {k: tuple(v.shape) for k, v in koh.items()} == {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (3 * r, 32),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (3 * 32, 3 * r),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": (),
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": (r, 32),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": (32, r),
        "lora_unet_double_blocks_0_img_attn_proj.alpha": (),
        "lora_unet_single_blocks_0_linear1.lora_down.weight": (4 * r, 32),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": (3 * 32 + 128, 4 * r),
        "lora_unet_single_blocks_0_linear1.alpha": (),
    }

    def delta(prefix: str) -> torch.Tensor:
        up, down = koh[f"{prefix}.lora_up.weight"].float(), koh[f"{prefix}.lora_down.weight"].float()
        return up @ down * (koh[f"{prefix}.alpha"].item() / down.shape[0])

    def dif_delta(mod: str) -> torch.Tensor:
        return dif[f"transformer.{mod}.lora_B.weight"] @ dif[f"transformer.{mod}.lora_A.weight"]

    qkv = delta("lora_unet_double_blocks_0_img_attn_qkv")
    want = torch.cat([dif_delta(f"transformer_blocks.0.attn.to_{x}") for x in "qkv"])
    assert want.abs().max() > 0 and torch.allclose(qkv, want, atol=2e-2 * want.abs().max().item())
    lin1 = delta("lora_unet_single_blocks_0_linear1")
    assert torch.allclose(lin1[:96], torch.cat([dif_delta(f"single_transformer_blocks.0.attn.to_{x}") for x in "qkv"]),
                          atol=2e-2 * want.abs().max().item())
    assert lin1[96:].abs().max() == 0  # the MLP part of linear1 was not trained


def test_fp8_base_and_partial_checkpointing(dataset_project, tiny_cfg):
    """The fp8-stored base trains and exports like the bf16 one; checkpointing every other block changes
    memory, not the numbers."""
    from safetensors.torch import load_file


    cfg = tiny_cfg.model_copy(update={"steps": 3, "quantize_base": "fp8"})
    plain = train(dataset_project, cfg)
    assert all(np.isfinite(plain.losses))
    koh = load_file(str(plain.kohya_path))
    assert koh["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (3 * 32 + 128, 16)
    ckpt = train(dataset_project, cfg.model_copy(update={"gradient_checkpointing": True, "checkpoint_every_n_blocks": 2}),
                 dataset_version=plain.dataset_version)
    assert np.allclose(ckpt.losses, plain.losses, rtol=1e-5)


def test_loss_curve_png_is_saved_beside_the_csv_and_recorded(dataset_project, tiny_cfg):

    result = train(dataset_project, tiny_cfg.model_copy(update={"steps": 3, "sample_prompts": []}))
    rows = {r["kind"]: r for r in dataset_project.catalog.query(
        "SELECT kind, path, sha256, step FROM artifacts WHERE lora_run_id = ?", (result.run_id,))}
    assert rows["loss_curve"]["path"] == f"runs/run-{result.run_id:04d}/loss.png" and rows["loss_curve"]["step"] == 3
    assert rows["loss_csv"]["path"] == f"runs/run-{result.run_id:04d}/loss.csv"
    png = result.run_dir / "loss.png"
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (800, 450)
        pixels = np.asarray(im.convert("RGB"))
    # Something was drawn in the loss colour (matplotlib's tab:blue), not only axes on white.
    blue = (np.abs(pixels.astype(int) - [31, 119, 180]).sum(-1) < 60).sum()
    assert blue > 100
    import hashlib

    assert rows["loss_curve"]["sha256"] == hashlib.sha256(png.read_bytes()).hexdigest()


@pytest.mark.parametrize("mode, library", [("int8", "torchao"), ("nf4", "bitsandbytes")])
def test_int8_and_nf4_need_cuda_and_say_what_to_do(dataset_project, tiny_cfg, mode, library):
    from flywheel.errors import StageError

    with pytest.raises(StageError, match=f"quantize_base = '{mode}' needs a CUDA GPU") as err:
        train(dataset_project, tiny_cfg.model_copy(update={"quantize_base": mode}), device="cpu")
    assert "'fp8'" in err.value.hint and "'none'" in err.value.hint
    # Refused before anything was recorded or loaded.
    assert dataset_project.catalog.query("SELECT COUNT(*) AS n FROM lora_runs")[0]["n"] == 0


def test_missing_low_vram_libraries_name_the_extra(monkeypatch):
    import sys

    from flywheel.errors import MissingExtraError
    from flywheel.training.setup import BaseLoad, check_runnable as _check_runnable

    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed: importing it raises ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    for update, package in [({"quantize_base": "int8"}, "torchao"), ({"quantize_base": "nf4"}, "bitsandbytes"),
                            ({"optimizer": "adamw8bit"}, "bitsandbytes")]:
        with pytest.raises(MissingExtraError, match=f"'{package}'") as err:
            cfg = TrainConfig(**update)
            _check_runnable(cfg, BaseLoad("cuda", "bfloat16", cfg.quantize_base, False))
        assert "character-flywheel[lowvram]" in err.value.hint
    _check_runnable(TrainConfig(quantize_base="fp8"), BaseLoad("cpu", "float32", "fp8", False))  # no GPU, no library


@pytest.mark.parametrize("mode, library, layer", [("int8", "torchao", "TorchaoLoraLinear"),
                                                  ("nf4", "bitsandbytes", "Linear4bit")])
def test_int8_and_nf4_bases_train_under_peft(dataset_project, tiny_cfg, monkeypatch, mode, library, layer):
    """The library path end to end (where the library is installed): quantized before the LoRA, wrapped by
    peft's layer for it, trained, exported. Run on the CPU by lifting the CUDA requirement."""
    pytest.importorskip(library)
    from safetensors.torch import load_file

    from flywheel.training import quantize

    monkeypatch.setattr(quantize, "check_quantize_support", lambda mode, device: None)
    seen = {}
    real = quantize.quantize_base

    def spy(transformer, m, device):
        n = real(transformer, m, device)
        seen["n"], seen["transformer"] = n, transformer
        return n

    monkeypatch.setattr(quantize, "quantize_base", spy)
    cfg = tiny_cfg.model_copy(update={"steps": 4, "caption_dropout": 0.0})
    plain = train(dataset_project, cfg)
    # No final sample for nf4 here: bitsandbytes' CPU inference path repacks 4-bit weights into a layout
    # that needs real layer sizes (tiny FLUX's 32 features fail); CUDA uses other kernels.
    quant = train(dataset_project, cfg.model_copy(update={"quantize_base": mode, "sample_prompts": (
        [] if mode == "nf4" else cfg.sample_prompts)}), dataset_version=plain.dataset_version)
    tr = seen["transformer"]
    assert seen["n"] == 14 + 6  # tiny FLUX: every Linear of its one double (14) and one single (6) block
    assert type(tr.transformer_blocks[0].attn.to_q).__name__ == layer
    assert all(np.isfinite(quant.losses))
    # Weight rounding changes the losses a little (nf4's 4 bits more than int8's 8), not their scale.
    assert np.allclose(quant.losses, plain.losses, rtol=0.15 if mode == "nf4" else 0.02)
    a, b = load_file(str(plain.lora_path)), load_file(str(quant.lora_path))
    assert a.keys() == b.keys()


def test_a_step_is_reported_once_the_next_is_queued_and_checkpoints_wait_for_none(dataset_project, tiny_cfg,
                                                                                   monkeypatch):
    """The loss of step k is read after step k+1 is queued (the GPU never idles while the CPU prepares a step),
    except at a checkpoint, samples and the last step, which see nothing queued after them. The losses are
    recorded in order, once each, and a non-finite loss still stops the run naming its own step."""
    import torch

    import flywheel.train as train_mod

    real, launched, seen = train_mod.train_step, [], []

    def counting_step(*args, **kwargs):
        launched.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", counting_step)
    cfg = tiny_cfg.model_copy(update={"steps": 5, "checkpoint_every": 2})
    result = train(dataset_project, cfg, progress=lambda done, total, label="": seen.append((done, len(launched))))
    assert seen == [(1, 2), (2, 2), (3, 4), (4, 4), (5, 5)]  # 2 and 4: checkpoints; 5: the end
    assert len(result.losses) == 5

    def exploding_step(*args, **kwargs):
        launched.append(1)
        loss = real(*args, **kwargs)
        return loss * float("inf") if len(launched) == 3 else loss

    launched.clear()
    monkeypatch.setattr(train_mod, "train_step", exploding_step)
    from flywheel.errors import StageError

    with pytest.raises(StageError, match="the loss became inf at step 3 of 5"):
        train(dataset_project, cfg.model_copy(update={"seed": 7}))
    assert torch.isfinite(torch.tensor(result.losses)).all()
