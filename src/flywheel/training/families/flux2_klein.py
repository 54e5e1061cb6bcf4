"""FLUX.2 [klein] as a LoRA family: trained on the undistilled klein base (4B / 9B), rendered on the distilled
klein of the same size (4 steps), as ``Flux2KleinPipeline`` does it.

- Prompts: Qwen3's hidden states of layers 9, 18 and 27 stacked per token (the pipeline's ``encode_prompt``),
  text position ids (0, 0, 0, token).
- Latents: the VAE mean in 2x2 patches (128 channels on the real model), normalised by the VAE's batch-norm
  statistics, packed row-major into (B, h*w, C) with position ids (0, row, col, 0); no 2x2 packing on top,
  unlike FLUX.1.
- Flow matching as FLUX.1: x_t = (1 - t) x0 + t noise, velocity target noise - x0, the timestep given as t
  (the transformer scales it); klein has no distilled-guidance input.
- Names: ComfyUI loads a LoRA by ``lora_unet_`` + the original (BFL) FLUX.2 key with dots as underscores
  (``comfy/lora.py`` maps every ``diffusion_model.*.weight`` key of the loaded model that way); the BFL
  names are those diffusers' FLUX.2 checkpoint converter reads (``double_blocks.N.img_attn.qkv``,
  ``single_blocks.N.linear1``, ...). q, k and v are one fused Linear there, as in FLUX.1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flywheel.training import lora_io
from flywheel.training.families import load_on_cpu
from flywheel.training.flux_step import Batch
from flywheel.training.step import to_device

# Flux2Transformer2DModel's Linear layers by name ({i}: a block index); tests check it against the tiny twin.
KLEIN_LINEARS = (
    "time_guidance_embed.timestep_embedder.linear_1", "time_guidance_embed.timestep_embedder.linear_2",
    "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear", "single_stream_modulation.linear",
    "x_embedder", "context_embedder",
    *(f"transformer_blocks.{{i}}.{m}" for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
        "ff_context.linear_out")),
    *(f"single_transformer_blocks.{{i}}.{m}" for m in ("attn.to_qkv_mlp_proj", "attn.to_out")),
    "norm_out.linear", "proj_out",
)

# norm_out.linear is not named: its original (final_layer.adaLN_modulation.1) has scale and shift swapped.
KLEIN_KEYS = lora_io.KohyaKeys(
    double_fused={"img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
                  "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]},
    double_single={"attn.to_out.0": "img_attn_proj", "attn.to_add_out": "txt_attn_proj", "ff.linear_in": "img_mlp_0",
                   "ff.linear_out": "img_mlp_2", "ff_context.linear_in": "txt_mlp_0",
                   "ff_context.linear_out": "txt_mlp_2"},
    single_fused={},
    single_single={"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"},
    top={"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer_linear",
         "time_guidance_embed.timestep_embedder.linear_1": "time_in_in_layer",
         "time_guidance_embed.timestep_embedder.linear_2": "time_in_out_layer",
         "double_stream_modulation_img.linear": "double_stream_modulation_img_lin",
         "double_stream_modulation_txt.linear": "double_stream_modulation_txt_lin",
         "single_stream_modulation.linear": "single_stream_modulation_lin"},
    metadata={"ss_network_module": "networks.lora_flux_2", "ss_base_model_version": "flux2_klein"},
)


def pack(latents):
    """(B, C, h, w) -> (B, h*w, C), rows first: the klein token order."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def latent_ids(b: int, h: int, w: int, device):
    """Position ids (t=0, row, col, layer=0) of the packed latent tokens, as ``_prepare_latent_ids``."""
    import torch

    ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
    return ids.unsqueeze(0).expand(b, -1, -1).to(device)


def text_ids(b: int, length: int, device):
    """Position ids (0, 0, 0, token) of the prompt tokens, as ``_prepare_text_ids``."""
    import torch

    ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length))
    return ids.unsqueeze(0).expand(b, -1, -1).to(device)


class Flux2Klein:
    name = "flux2_klein"
    label = "FLUX.2 klein"
    linears = KLEIN_LINEARS
    # "attn.to_out" names the single blocks' output Linear and the double blocks' ModuleList around theirs.
    containers = ("transformer_blocks.{i}.attn.to_out",)
    sample_guidance = 4.0  # the klein base's stock CFG (its model card: 50 steps, guidance 4)

    def load(self, base: str, load) -> tuple[Any, str, Any]:
        from diffusers import Flux2KleinPipeline

        return load_on_cpu(Flux2KleinPipeline, base, load)

    def text_encoders(self, pipe) -> list:
        return [pipe.text_encoder]

    def encode_text(self, pipe, prompt: str, *, max_sequence_length: int) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(prompt, device=pipe.text_encoder.device,
                                           max_sequence_length=max_sequence_length)
        return {"prompt_embeds": embeds.float()}

    def encode_latent(self, vae, pixels):
        import torch
        from diffusers import Flux2KleinPipeline

        latent = Flux2KleinPipeline._patchify_latents(vae.encode(pixels).latent_dist.mode())  # the mean
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latent)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latent)
        return ((latent - mean) / std).float()

    def batch(self, latents: list, texts: list[dict], device, dtype) -> Batch:
        import torch

        return Batch(latents=to_device(torch.cat(latents), device, dtype),
                     prompt_embeds=to_device(torch.cat([t["prompt_embeds"] for t in texts]), device, dtype), pooled=None)

    def image_seq_len(self, latents) -> int:
        h, w = latents.shape[-2:]
        return h * w

    def loss(self, transformer, batch: Batch, noise, sigmas, *, guidance: float = 1.0):
        import torch.nn.functional as F

        lat = batch.latents
        b, _, h, w = lat.shape
        dtype = transformer.dtype
        t = sigmas.to(lat.device, lat.dtype).view(b, 1, 1, 1)
        noisy = (1 - t) * lat + t * noise
        pred = transformer(
            hidden_states=pack(noisy).to(dtype),
            timestep=sigmas.to(lat.device, dtype),  # the pipeline passes t / 1000 for t in [0, 1000]
            guidance=None,
            encoder_hidden_states=batch.prompt_embeds.to(dtype),
            txt_ids=text_ids(b, batch.prompt_embeds.shape[1], lat.device),
            img_ids=latent_ids(b, h, w, lat.device),
            return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), pack(noise - lat).float())

    def nameable(self, module: str) -> bool:
        return lora_io.kohya_nameable(module, KLEIN_KEYS)

    def export(self, state: dict, run_dir: Path, transformer) -> list[tuple[str, Path]]:
        path = lora_io.save_kohya(state, run_dir / lora_io.KOHYA_FILE, lora_io.out_features_of(transformer),
                                  KLEIN_KEYS)
        return [("lora_kohya", path)]

    def sample_pipeline(self, pipe, transformer):
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=None, tokenizer=None,
                                  transformer=transformer, is_distilled=bool(pipe.config.is_distilled))

    def sample_kwargs(self, text: dict, empty: dict, device, dtype) -> dict[str, Any]:
        return {"prompt_embeds": text["prompt_embeds"].to(device, dtype),
                "negative_prompt_embeds": empty["prompt_embeds"].to(device, dtype)}

    def generate_model(self, spec: str) -> str | None:
        """The distilled klein its preset names (``flux2-klein-base-4b`` -> ``flux2-klein-4b``); a klein base
        given as a folder or hub id renders on itself."""
        from flywheel.models.presets import get_preset

        preset = get_preset(spec, "text_to_image")
        return getattr(preset, "generate_with", None) or None
