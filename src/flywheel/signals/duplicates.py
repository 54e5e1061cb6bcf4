"""Near-duplicate candidates by perceptual hash: which earlier images is a candidate to be compared with?

The judge compares every candidate with every source and with every *earlier* training candidate (a
smaller image id) that the same policy has not rejected, accepted or waiting for review alike: of two
near-identical images the earlier one is kept and the later one is the duplicate. Images are judged in
id order, so an earlier candidate's verdict under the policy is always known; human reviews never
enter the comparison, so judging is deterministic and a re-run (or a run resumed after a crash) finds
the same duplicates. An earlier image the policy rejected (blurred, another person, itself a
duplicate) is out of the set, so it makes nothing a duplicate. Held-out evaluation renders are compared
too but never make another image a duplicate: they are not training candidates.

Hamming distances are computed for the whole pool at once (numpy popcount through a byte table), so
thousands of candidates stay cheap; only the few nearest go on to the pixel comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming_many(hashes: np.ndarray, mine: int) -> np.ndarray:
    """Hamming distances (0..64) between the 64-bit hash ``mine`` and every uint64 in ``hashes``."""
    xor = np.ascontiguousarray(hashes ^ np.uint64(mine))
    return _POPCOUNT[xor.view(np.uint8)].reshape(-1, 8).sum(axis=1, dtype=np.int64)


@dataclass
class HashPool:
    """Perceptual hashes of the sources and the training candidates (``images`` rows: id, phash, sha256, kind)."""

    ids: np.ndarray  # int64
    hashes: np.ndarray  # uint64
    shas: list[str]
    is_source: np.ndarray  # bool
    active: np.ndarray  # bool: False once dropped (rejected by the policy)

    @classmethod
    def from_rows(cls, rows) -> HashPool:
        rows = sorted(rows, key=lambda r: r["id"])
        return cls(ids=np.array([r["id"] for r in rows], dtype=np.int64),
                   hashes=np.array([int(r["phash"], 16) for r in rows], dtype=np.uint64),
                   shas=[r["sha256"] for r in rows],
                   is_source=np.array([r["kind"] == "source" for r in rows], dtype=bool),
                   active=np.ones(len(rows), dtype=bool))

    def drop(self, image_id: int) -> None:
        """Leave ``image_id`` out of every later comparison (the policy rejected it: it is not in the set)."""
        self.active[self.ids == image_id] = False

    def compared_with(self, image_id: int, exclude: tuple[int | None, ...] = ()) -> np.ndarray:
        """Boolean mask of the pool images ``image_id`` is compared with: sources, and earlier kept candidates."""
        mask = self.active & (self.is_source | (self.ids < image_id))
        for other in (image_id, *exclude):
            if other is not None:
                mask &= self.ids != other
        return mask

    def nearest(self, image_id: int, phash: int, exclude: tuple[int | None, ...] = (),
                k: int = 5) -> tuple[int, list[tuple[int, int, str]]]:
        """(how many images it is compared with, the ``k`` nearest as (distance, id, sha256)); ties: smaller id."""
        where = np.flatnonzero(self.compared_with(image_id, exclude))
        if not len(where):
            return 0, []
        dist = hamming_many(self.hashes[where], phash)
        order = np.lexsort((self.ids[where], dist))[:k]
        return len(where), [(int(dist[i]), int(self.ids[where[i]]), self.shas[where[i]]) for i in order]
