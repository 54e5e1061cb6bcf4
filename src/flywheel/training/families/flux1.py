"""FLUX.1 (dev / schnell) as a LoRA family: CLIP + T5 prompts, 16-channel latents in 2x2 patches, the
distilled-guidance input, and kohya (BFL) key names for the exported file that ComfyUI and Forge load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flywheel.training import flux_step, lora_io, targets
from flywheel.training.families import load_on_cpu
from flywheel.training.step import to_device


class Flux1:
    name = "flux1"
    label = "FLUX.1"
    linears = targets.FLUX_LINEARS
    containers: tuple[str, ...] = ()  # as before the families: FLUX.1 targets are checked by name only
    sample_guidance = 3.5  # FLUX.1-dev's distilled guidance

    def load(self, base: str, load) -> tuple[Any, str, Any]:
        from diffusers import FluxPipeline

        return load_on_cpu(FluxPipeline, base, load)

    def text_encoders(self, pipe) -> list:
        return [pipe.text_encoder, pipe.text_encoder_2]

    def encode_text(self, pipe, prompt: str, *, max_sequence_length: int) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, max_sequence_length=max_sequence_length,
                                                   device=pipe.text_encoder.device)
        return {"prompt_embeds": embeds.float(), "pooled": pooled.float()}

    def encode_latent(self, vae, pixels):
        shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
        mean = vae.encode(pixels).latent_dist.mode()  # the mean: deterministic
        return ((mean - shift) * scale).float()

    def batch(self, latents: list, texts: list[dict], device, dtype) -> flux_step.Batch:
        import torch

        return flux_step.Batch(latents=to_device(torch.cat(latents), device, dtype),
                               prompt_embeds=to_device(torch.cat([t["prompt_embeds"] for t in texts]), device, dtype),
                               pooled=to_device(torch.cat([t["pooled"] for t in texts]), device, dtype))

    def image_seq_len(self, latents) -> int:
        h, w = latents.shape[-2:]
        return (h // 2) * (w // 2)

    def loss(self, transformer, batch, noise, sigmas, *, guidance: float = 1.0):
        return flux_step.flow_matching_loss(transformer, batch, noise, sigmas, guidance=guidance)

    def nameable(self, module: str) -> bool:
        return lora_io.kohya_nameable(module)

    def export(self, state: dict, run_dir: Path, transformer) -> list[tuple[str, Path]]:
        path = lora_io.save_kohya(state, run_dir / lora_io.KOHYA_FILE, lora_io.out_features_of(transformer))
        return [("lora_kohya", path)]

    def sample_pipeline(self, pipe, transformer):
        from diffusers import FluxPipeline

        return FluxPipeline(scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=transformer)

    def sample_kwargs(self, text: dict, empty: dict, device, dtype) -> dict[str, Any]:
        return {"prompt_embeds": text["prompt_embeds"].to(device, dtype),
                "pooled_prompt_embeds": text["pooled"].to(device, dtype)}

    def generate_model(self, spec: str) -> str | None:
        return None  # FLUX.1 LoRAs render on the base they were trained on
