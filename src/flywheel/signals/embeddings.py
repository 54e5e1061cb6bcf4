"""Image (and text) embeddings for identity and diversity metrics: DINOv2 / DINO and CLIP by hub id.

DreamBench definitions: DINO = cosine similarity of ViT DINO embeddings (CLS token); CLIP-I = cosine of
CLIP image embeddings; CLIP-T = cosine of CLIP text and image embeddings. Models load with
``from_pretrained`` (hub id or local folder, safetensors only); nothing is downloaded when
``HF_HUB_OFFLINE=1`` and a missing model gives an error with the download command.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flywheel.errors import ModelLoadError, ModelNotFoundError

log = logging.getLogger(__name__)


def _load(model_id: str, kind: str):
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(model_id)
    except OSError as err:
        where = model_id if Path(model_id).exists() else f"the Hugging Face cache for {model_id}"
        raise ModelNotFoundError(
            f"cannot find the {kind} model '{model_id}' (looked in {where})",
            hint=f"hf download {model_id}  (or set its path to a local folder in flywheel.toml)",
        ) from err
    model = AutoModel.from_pretrained(model_id, use_safetensors=True).eval()
    is_clip = hasattr(model, "get_image_features") and hasattr(model, "get_text_features")
    processor = AutoProcessor.from_pretrained(model_id) if is_clip else AutoImageProcessor.from_pretrained(model_id)
    return config, model, processor, is_clip


@dataclass
class ImageEmbedder:
    """L2-normalised image embeddings from a CLIP (image tower) or a DINO/DINOv2 model (CLS token)."""

    model_id: str
    model: Any
    processor: Any
    is_clip: bool

    @classmethod
    def from_pretrained(cls, model_id: str) -> ImageEmbedder:
        _, model, processor, is_clip = _load(model_id, "image-embedding")
        return cls(model_id, model, processor, is_clip)

    @property
    def name(self) -> str:
        return ("clip_i:" if self.is_clip else "dino:") + self.model_id

    def embed(self, images: list[Image.Image], batch_size: int = 16) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(images), batch_size):
            batch = [im.convert("RGB") for im in images[i : i + batch_size]]
            inputs = self.processor(images=batch, return_tensors="pt")
            with torch.inference_mode():
                if self.is_clip:
                    feats = self.model.get_image_features(pixel_values=inputs["pixel_values"])
                    feats = getattr(feats, "pooler_output", feats)
                else:
                    feats = self.model(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0]
            out.append(torch.nn.functional.normalize(feats.float(), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    def embed_text(self, texts: list[str]) -> np.ndarray:
        """CLIP only: L2-normalised text embeddings (for CLIP-T)."""
        import torch

        if not self.is_clip:
            raise ModelLoadError(f"{self.model_id} has no text tower; CLIP-T needs a CLIP model",
                                 hint="set evaluate.clip_model to a CLIP model id, e.g. openai/clip-vit-large-patch14")
        inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            feats = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            feats = getattr(feats, "pooler_output", feats)
        return torch.nn.functional.normalize(feats.float(), dim=-1).numpy()


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities between rows (inputs already L2-normalised)."""
    return np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64).T
