"""Latent and text-embedding caches: encode once, then train with the VAE and text encoders off the GPU.

Cache files are safetensors named by a hash of everything that determines their content (image or text,
bucket, base model, sequence length), so a resumed or repeated run reuses them and a changed input can
never hit a stale entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from flywheel.training.buckets import Bucket, fit_to_bucket

log = logging.getLogger(__name__)


def _key(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:32]


def _save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def cache_latents(family, vae, items: list[tuple[str, Path, Bucket]], cache_dir: Path, *, model_key: str,
                  device) -> dict:
    """{image sha: the family's normalised latent (1, C, h, w) on the CPU} for (sha, image path, bucket) items."""
    import numpy as np
    import torch
    from PIL import Image

    out = {}
    for sha, path, bucket in items:
        f = cache_dir / "latents" / f"{_key(sha, bucket.width, bucket.height, model_key)}.safetensors"
        if not f.is_file():
            with Image.open(path) as im:
                pixels = fit_to_bucket(im.convert("RGB"), bucket)
            x = torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
            with torch.no_grad():
                latent = family.encode_latent(vae, x.to(device, vae.dtype))
            _save({"latent": latent}, f)
        out[sha] = _load(f)["latent"]
    return out


def cache_text(family, pipe, prompts: list[str], cache_dir: Path, *, model_key: str,
               max_sequence_length: int) -> dict:
    """{prompt: the family's text tensors ({"prompt_embeds": (1, L, D), ...})} on the CPU."""
    out = {}
    for prompt in dict.fromkeys(prompts):
        f = cache_dir / "text" / f"{_key(prompt, model_key, max_sequence_length)}.safetensors"
        if not f.is_file():
            _save(family.encode_text(pipe, prompt, max_sequence_length=max_sequence_length), f)
        out[prompt] = _load(f)
    return out


def release(*modules) -> None:
    """Move modules off the GPU and free the cached blocks (the VAE and text encoders after caching)."""
    import torch

    for m in modules:
        if m is not None:
            m.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
