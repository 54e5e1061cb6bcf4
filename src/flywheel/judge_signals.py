"""The judge's pixel signals for one image, each recorded as a score row: face identity, change, quality.

Source face embeddings are the identity reference. They are computed once per source (and face-score
floor) and kept in the ``faces`` table (embedder ``dlib_resnet_v1``); a source where dlib finds no face
is remembered by the operation's ``work_key``, so it is not searched again on every run.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from PIL import Image

from flywheel.config import JudgeConfig
from flywheel.judge_policy import ImageScores
from flywheel.project import Project
from flywheel.signals.duplicates import HashPool

log = logging.getLogger(__name__)


class PixelScorer:
    """Scores images against the project's sources; every number goes to ``scores`` with its scorer."""

    def __init__(self, project: Project, jcfg: JudgeConfig, run_id: int):
        from flywheel.signals import faces

        self.project, self.jcfg, self.run_id = project, jcfg, run_id
        self.faces_ok = faces.available()
        self.face_scorer = f"face:{faces.EMBEDDER}"
        self.source_faces: list[tuple[int, np.ndarray]] = self._source_embeddings() if self.faces_ok else []
        self.embedder = None
        self._copies = None  # signals.copies.SourceCopies, prepared on first use
        if jcfg.image_embedding_model != "none":
            self._load_image_embedder()

    def _load_image_embedder(self) -> None:
        """Whole-image embeddings of the sources, once per run (a handful of images: cheap)."""
        from flywheel.signals.embeddings import ImageEmbedder

        sources = self.project.catalog.query("SELECT id, sha256 FROM images WHERE kind = 'source' ORDER BY id")
        spec = self.jcfg.image_embedding_model
        with self.project.catalog.operation("judge", model=spec, params={"role": "reference", "images": len(sources)},
                                            parent_id=self.run_id):
            self.embedder = ImageEmbedder.from_pretrained(spec)
            self.source_vecs = self.embedder.embed([self.project.store.open_image(r["sha256"]) for r in sources])
        self.source_ids = [r["id"] for r in sources]

    # -- recording ----------------------------------------------------------------------------------
    def record(self, image_id: int, criterion: str, scorer: str, value: float | None, details: dict[str, Any],
               op_id: int | None = None) -> None:
        self.project.catalog.insert("scores", {
            "image_id": image_id, "criterion": criterion, "scorer": scorer,
            "value": None if value is None else float(value),
            "details_json": json.dumps(details, sort_keys=True, default=str),
            "operation_id": op_id or self.run_id,
        })

    # -- faces --------------------------------------------------------------------------------------
    def _source_embeddings(self) -> list[tuple[int, np.ndarray]]:
        from flywheel.signals import faces

        catalog = self.project.catalog
        for src in catalog.query("SELECT id, sha256 FROM images WHERE kind = 'source' ORDER BY id"):
            # The score floor is part of the key: lowering it must look for faces in the sources again.
            key = f"faces:{faces.EMBEDDER}:{src['id']}:min_score={self.jcfg.min_face_score}"
            if catalog.query("SELECT 1 FROM operations WHERE work_key = ? AND status = 'ok'", (key,)):
                continue
            stale = catalog.query("SELECT 1 FROM operations WHERE work_key = ?", (key,))
            with catalog.operation("judge", model=faces.EMBEDDER, params={"image_id": src["id"], "role": "reference"},
                                   parent_id=self.run_id, work_key=None if stale else key) as op:
                self._embed_and_store(src["id"], self.project.store.open_image(src["sha256"]), op)
        # One reference per source: its largest confident face, whoever stored it (this stage or another).
        rows = catalog.query(
            "SELECT f.image_id, f.embedding FROM faces f JOIN images i ON i.id = f.image_id "
            "WHERE i.kind = 'source' AND f.embedder = ? AND f.embedding IS NOT NULL AND COALESCE(f.score, 0) >= ? "
            "ORDER BY f.image_id, (f.right_px - f.left_px) * (f.bottom_px - f.top_px) DESC, f.id",
            (faces.EMBEDDER, self.jcfg.min_face_score))
        best: dict[int, np.ndarray] = {}
        for r in rows:
            best.setdefault(r["image_id"], np.frombuffer(r["embedding"], dtype=np.float32))
        refs = list(best.items())
        log.info("judge: %d reference face(s) from the sources", len(refs))
        return refs

    def _embed_and_store(self, image_id: int, image: Image.Image, op_id: int):
        from flywheel.signals import faces

        # Only the largest face: it is the character, and HOG's small false positives (a badge, a
        # pattern) would otherwise become identity references that anything can match.
        boxes = faces.detect_faces(image, min_score=self.jcfg.min_face_score)[:1]
        embeddings = faces.embed_faces(image, boxes)
        with self.project.catalog.transaction():
            for b, e in zip(boxes, embeddings):
                self.project.catalog.insert("faces", {
                    "image_id": image_id, "detector": faces.DETECTOR, "left_px": b.left, "top_px": b.top,
                    "right_px": b.right, "bottom_px": b.bottom, "score": b.score,
                    "embedding": np.asarray(e, dtype=np.float32).tobytes(), "embedder": faces.EMBEDDER,
                    "operation_id": op_id})
        return boxes, embeddings

    def _identity(self, image_id: int, image: Image.Image, s: ImageScores) -> None:
        from flywheel.signals import faces

        details: dict[str, Any] = {"max_distance": self.jcfg.max_face_distance,
                                   "reference_faces": len(self.source_faces)}
        if not self.faces_ok:
            s.face_note = "face identity unavailable (install the 'face' extra for dlib)"
        elif not self.source_faces:
            s.face_note = "no face found in any source image"
        else:
            with self.project.catalog.operation("judge", model=faces.EMBEDDER, params={"image_id": image_id},
                                                parent_id=self.run_id) as op:
                boxes, embeddings = self._embed_and_store(image_id, image, op)
            if not embeddings:
                s.face_note = "no face found in the image"
            else:
                # The closest source face is the fairest reference (sources show different angles).
                dists = [(faces.face_distance(e, embeddings[0]), src) for src, e in self.source_faces]
                s.face_distance, s.face_source_id = min(dists, key=lambda t: t[0])
                s.face_distances = {src: d for d, src in dists}
                box = boxes[0]
                details.update(closest_source_id=s.face_source_id, mean_distance=float(np.mean([d for d, _ in dists])),
                               box=[box.left, box.top, box.right, box.bottom])
            self.record(image_id, "identity", self.face_scorer, s.face_distance,
                        {**details, "note": s.face_note} if s.face_note else details, op)
            return
        self.record(image_id, "identity", self.face_scorer, None, {**details, "note": s.face_note})

    def _image_similarity(self, image_id: int, image: Image.Image, s: ImageScores) -> None:
        from flywheel.signals.embeddings import cosine_matrix

        spec = self.jcfg.image_embedding_model
        with self.project.catalog.operation("judge", model=spec, params={"image_id": image_id},
                                            parent_id=self.run_id) as op:
            sims = cosine_matrix(self.embedder.embed([image]), self.source_vecs)[0]
        best = int(np.argmax(sims))
        s.image_similarity, s.image_similarity_source_id = float(sims[best]), self.source_ids[best]
        self.record(image_id, "identity", f"embedding:{self.embedder.name}", s.image_similarity,
                    {"closest_source_id": s.image_similarity_source_id, "min": self.jcfg.min_image_similarity}, op)

    def _mask_report(self, image_id: int, s: ImageScores) -> None:
        """The composite editor's person-mask report, recorded by enrich (``signals.segmentation``)."""
        from flywheel.signals.segmentation import SCORER

        row = self.project.catalog.query("SELECT value, details_json FROM scores WHERE image_id = ? AND scorer = ? "
                                         "ORDER BY id DESC LIMIT 1", (image_id, SCORER))
        if row and row[0]["value"] is not None:
            s.mask_coverage, s.mask_problem = row[0]["value"], json.loads(row[0]["details_json"]).get("problem")

    def _copy(self, image_id: int, image: Image.Image, s: ImageScores) -> None:
        """Too close: structure and colour against the nearest source, straight or mirrored (``signals.copies``)."""
        from flywheel.signals.copies import SourceCopies

        if self._copies is None:
            rows = self.project.catalog.query("SELECT id, sha256 FROM images WHERE kind = 'source' ORDER BY id")
            self._copies = SourceCopies([(r["id"], self.project.store.open_image(r["sha256"])) for r in rows])
        m = self._copies.nearest(image)
        if m is None:
            return
        s.copy_similarity, s.copy_source_id = m.ssim, m.source_id
        s.copy_mirrored, s.copy_color_difference = m.mirrored, m.color_difference
        details = {**m.as_dict(), "face_distance": s.face_distances.get(m.source_id),
                   "max_similarity": self.jcfg.max_copy_similarity,
                   "max_color_difference": self.jcfg.max_copy_color_difference,
                   "min_face_distance": self.jcfg.min_face_distance_copy}
        self.record(image_id, "copy", "pixels:ssim", m.ssim, details)
        self.record(image_id, "copy", "pixels:delta_e", m.color_difference,
                    {"source_id": m.source_id, "mirrored": m.mirrored})

    # -- everything for one image -------------------------------------------------------------------
    def score(self, row: dict[str, Any], image: Image.Image) -> ImageScores:
        from flywheel.signals.change import measure_change
        from flywheel.signals.quality import measure_quality

        s = ImageScores()
        image_id = row["id"]
        self._identity(image_id, image, s)
        if self.embedder is not None and self.source_ids:
            self._image_similarity(image_id, image, s)
        if row["parent_id"]:
            parent_sha = self.project.catalog.query("SELECT sha256 FROM images WHERE id = ?", (row["parent_id"],))[0][0]
            change = measure_change(self.project.store.open_image(parent_sha), image)
            s.changed_fraction = change.changed_fraction
            self.record(image_id, "edit_applied", "pixels:change", change.changed_fraction,
                        {**change.as_dict(), "parent_id": row["parent_id"], "min": self.jcfg.min_changed_fraction})
        self._mask_report(image_id, s)
        self._copy(image_id, image, s)
        q = measure_quality(image)
        s.sharpness, s.noise_sigma = q.sharpness, q.noise_sigma
        self.record(image_id, "quality", "pixels:sharpness", q.sharpness,
                    {**q.as_dict(), "min": self.jcfg.min_sharpness})
        self.record(image_id, "quality", "pixels:noise", q.noise_sigma, {"max": self.jcfg.max_noise_sigma})
        return s

    def duplicate(self, row: dict[str, Any], image: Image.Image, pool: HashPool, s: ImageScores) -> None:
        """Nearest earlier image by perceptual hash (``signals.duplicates``), confirmed by pixel change."""
        from flywheel.signals.change import measure_change

        limit = self.jcfg.near_duplicate_distance
        # The parent is edit_applied's business: an unchanged edit is "not applied", not a duplicate.
        compared, nearest = pool.nearest(row["id"], int(row["phash"], 16), exclude=(row["parent_id"],))
        if nearest:
            s.dup_distance, s.dup_of = nearest[0][0], nearest[0][1]
        self.record(row["id"], "duplicate", "phash:dct64", s.dup_distance,
                    {"nearest_image_id": s.dup_of, "compared_with": compared, "max_distance": limit,
                     "pool": "sources and earlier training candidates (smaller id) not rejected"})
        near = [(d, k, sha) for d, k, sha in nearest if d <= limit]
        if not near:
            return
        # Same layout by hash; only near-identical pixels make it a duplicate. Ties go to the earlier image.
        changes = [(measure_change(self.project.store.open_image(sha), image).changed_fraction, d, k)
                   for d, k, sha in near]
        s.dup_change, s.dup_distance, s.dup_of = min(changes, key=lambda t: (t[0], t[2]))
        self.record(row["id"], "duplicate", "pixels:change", s.dup_change,
                    {"image_id": s.dup_of, "phash_distance": s.dup_distance,
                     "max": self.jcfg.near_duplicate_max_change})
