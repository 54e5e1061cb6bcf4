"""Content-addressed image store under ``.flywheel/store``.

Images are stored once, named by the SHA-256 of their bytes (``ab/abcdef....png``); writing the same
bytes twice is a no-op, and a file is written to a temporary name and renamed so a killed process never
leaves a half-written image under a real name. The user's original files are copied in unchanged
(``originals/``); the pipeline works on normalised RGB PNGs (``images/``).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path

from PIL import Image

from flywheel.catalog import oserrors
from flywheel.errors import CatalogError

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_png(image: Image.Image) -> bytes:
    """Deterministic PNG bytes for an RGB image (no timestamps or metadata)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


class ImageStore:
    def __init__(self, root: Path):
        self.root = root

    def _path(self, folder: str, sha: str, suffix: str) -> Path:
        if not _SHA_RE.match(sha):  # the only way a name reaches the filesystem: never a user string
            raise CatalogError(f"not a content hash: {sha!r}")
        return self.root / folder / sha[:2] / f"{sha}{suffix}"

    def _write(self, path: Path, data: bytes) -> None:
        if path.exists():
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except OSError as err:  # a read-only project, or a disk too full for a directory entry
            storage = oserrors.from_os_error(err, path.parent)
            if storage is None:
                raise
            raise storage from err
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            Path(tmp).unlink(missing_ok=True)  # never leave a half-written file, even under a temporary name
            storage = oserrors.from_os_error(err, path) if isinstance(err, OSError) else None
            if storage is not None:
                raise storage from err
            raise

    def put_image(self, image: Image.Image) -> tuple[str, Path]:
        """Store an RGB image as PNG; returns (sha256 of the PNG bytes, path)."""
        data = encode_png(image)
        sha = sha256_bytes(data)
        path = self.image_path(sha)
        self._write(path, data)
        return sha, path

    def put_original(self, data: bytes, suffix: str) -> tuple[str, Path]:
        sha = sha256_bytes(data)
        suffix = suffix.lower() if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix or "") else ".bin"
        path = self._path("originals", sha, suffix)
        self._write(path, data)
        return sha, path

    def image_path(self, sha: str) -> Path:
        return self._path("images", sha, ".png")

    def open_image(self, sha: str) -> Image.Image:
        with Image.open(self.image_path(sha)) as im:
            return im.convert("RGB")
