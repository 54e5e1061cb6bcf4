"""Per-image metrics for one LoRA round's evaluation images, keyed by 'prompt|seed' for pairing.

Definitions (DreamBench-style, so numbers compare with the literature where the same models are used):
- ``recognisable``: 1 when the largest detected face is within dlib's same-person distance (0.6) of
  at least one source face, else 0 (no face found counts as not recognisable). The seed's bar is 70%.
- ``face_distance``: mean dlib distance of that face to the source faces (lower is better).
- ``dino`` / ``clip_i``: mean cosine similarity between the image's embedding and every source's
  (DreamBench DINO / CLIP-I), when an image-embedding model is configured.
- ``clip_t``: cosine similarity of the CLIP text embedding of the prompt (trigger word removed) and the
  image embedding (DreamBench CLIP-T), when a CLIP model is configured.
- ``diversity``: mean distance of the image to the other images of its round: 1 - cosine of
  embeddings when a model is configured, else normalised perceptual-hash distance.
- ``judge_pass``: 1 when the judge's newest verdict for the image is 'accepted'.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from flywheel.images import hamming, phash
from flywheel.signals import faces
from flywheel.signals.embeddings import ImageEmbedder, cosine_matrix

# name -> (higher is better?, human label)
METRICS: dict[str, tuple[bool, str]] = {
    "recognisable": (True, "Recognisable (face within 0.6 of a source)"),
    "face_distance": (False, "Face distance to sources (dlib, lower is better)"),
    "dino": (True, "DINO similarity to sources"),
    "clip_i": (True, "CLIP-I similarity to sources"),
    "clip_t": (True, "CLIP-T prompt fidelity"),
    "diversity": (True, "Diversity (mean distance to other images)"),
    "judge_pass": (True, "Judge pass rate"),
}


@dataclass
class EvalImage:
    key: str  # 'prompt|seed': the same key in every round, for pairing
    prompt: str
    seed: int
    image: Image.Image
    image_id: int | None = None
    judge_accepted: bool | None = None


def source_face_embeddings(sources: list[Image.Image]) -> np.ndarray:
    embs = []
    for im in sources:
        boxes = faces.detect_faces(im)
        if boxes:
            embs.append(faces.embed_faces(im, boxes[:1])[0])
    return np.stack(embs) if embs else np.zeros((0, 128), dtype=np.float32)


def score_round(
    images: list[EvalImage],
    *,
    source_faces: np.ndarray,
    sources: list[Image.Image],
    embedder: ImageEmbedder | None = None,
    clip: ImageEmbedder | None = None,
    trigger: str = "",
) -> dict[str, dict[str, float]]:
    """metric -> {key: value}; NaN where a metric does not apply to an image."""
    out: dict[str, dict[str, float]] = {name: {} for name in METRICS}
    # 1. Face identity (real dlib signal).
    use_faces = len(source_faces) > 0 and faces.available()
    for im in images:
        boxes = faces.detect_faces(im.image) if use_faces else []
        if boxes:
            d = np.linalg.norm(source_faces - faces.embed_faces(im.image, boxes[:1])[0], axis=1)
            out["face_distance"][im.key] = float(d.mean())
            out["recognisable"][im.key] = float(d.min() < faces.SAME_PERSON_DISTANCE)
        else:
            out["face_distance"][im.key] = float("nan")
            out["recognisable"][im.key] = 0.0 if use_faces else float("nan")
        out["judge_pass"][im.key] = float("nan") if im.judge_accepted is None else float(im.judge_accepted)
    # 2. Embedding similarity to the sources (DINO or CLIP-I) and diversity.
    if embedder is not None and images:
        gen = embedder.embed([im.image for im in images])
        ref = embedder.embed(sources)
        metric = "clip_i" if embedder.is_clip else "dino"
        for im, sims in zip(images, cosine_matrix(gen, ref)):
            out[metric][im.key] = float(sims.mean())
        dist = 1.0 - cosine_matrix(gen, gen)
    else:
        hashes = [phash(im.image) for im in images]
        dist = np.array([[hamming(a, b) / 64.0 for b in hashes] for a in hashes])
    n = len(images)
    for i, im in enumerate(images):
        out["diversity"][im.key] = float(dist[i].sum() / (n - 1)) if n > 1 else float("nan")
    # 3. Prompt fidelity (CLIP-T), with the trigger word removed: CLIP does not know it.
    if clip is not None and images:
        prompts = [" ".join(im.prompt.replace(trigger, "").split()) if trigger else im.prompt for im in images]
        sims = np.sum(clip.embed([im.image for im in images]) * clip.embed_text(prompts), axis=1)
        for im, s in zip(images, sims):
            out["clip_t"][im.key] = float(s)
    return {name: vals for name, vals in out.items() if any(np.isfinite(v) for v in vals.values())}
