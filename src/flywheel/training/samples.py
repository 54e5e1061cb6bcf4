"""What a training run leaves besides its LoRA: sample images per checkpoint step, and one ``artifacts`` row
per file (checkpoints, LoRA files, config, loss curve, samples) so the catalog knows every output."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flywheel.config import TrainConfig
from flywheel.training import caching


def render(project, family, pipe, transformer, cfg: TrainConfig, text: dict, prompts: list[str], run_id: int,
           run_dir: Path, step: int, device) -> None:
    """Fixed prompts x fixed seeds with the LoRA as it is now; each image is an artifact with its settings."""
    import torch

    if not prompts or not cfg.sample_seeds:
        return
    was_training = transformer.training
    transformer.eval()
    pipe.vae.to(device)
    sampler = family.sample_pipeline(pipe, transformer)
    sampler.set_progress_bar_config(disable=True)
    guidance = family.sample_guidance
    out = run_dir / "samples"
    out.mkdir(exist_ok=True)
    with torch.no_grad(), eager():
        for pi, prompt in enumerate(prompts):
            for seed in cfg.sample_seeds:
                image = sampler(**family.sample_kwargs(text[prompt], text[""], device, transformer.dtype),
                                width=cfg.sample_size, height=cfg.sample_size, num_inference_steps=cfg.sample_steps,
                                guidance_scale=guidance, generator=torch.Generator().manual_seed(seed)).images[0]
                path = out / f"step{step:06d}-p{pi}-s{seed}.png"
                image.save(path)
                record(project, "sample", path, run_id, step, meta={"prompt": prompt, "seed": seed,
                                                                       "steps": cfg.sample_steps, "guidance": guidance,
                                                                       "size": cfg.sample_size})
    caching.release(pipe.vae)
    if was_training:
        transformer.train()


def eager():
    """Run the transformer's compiled blocks eagerly while sampling. Their graphs were compiled for training
    (grad on, the buckets' shapes); a no-grad sample at another size would compile every block type again
    (compiling them took ~40 s for klein-base-4B and FLUX.1-dev on the H200) to render a handful of images."""
    import torch

    return torch.compiler.set_stance("force_eager")


def record(project, kind: str, path: Path, run_id: int, step: int, *, meta: dict | None = None,
              hash_file: bool = True) -> None:
    sha = hashlib.sha256(path.read_bytes()).hexdigest() if hash_file and path.is_file() else None
    with project.catalog.transaction():
        project.catalog.insert("artifacts", {
            "kind": kind, "path": str(path.relative_to(project.workspace)), "sha256": sha, "lora_run_id": run_id,
            "step": step, "meta_json": json.dumps(meta or {}),
        })
