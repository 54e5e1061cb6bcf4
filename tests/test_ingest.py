"""Ingest: every bad-input case is generated here and its exact outcome asserted."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flywheel.errors import StageError
from flywheel.ingest import ingest
from flywheel.sample import astronaut


def _rgb(size=(320, 300), seed=0) -> Image.Image:
    """A natural-ish image (smooth random field) so perceptual hashes of different seeds differ."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _outcome(result, path: Path):
    for kind in ("added", "skipped", "rejected"):
        for item in getattr(result, kind):
            if Path(item.path) == path:
                return kind, item.reason
    raise AssertionError(f"{path} not in result")


def _stored(project, image_id) -> Image.Image:
    sha = project.catalog.query("SELECT sha256 FROM images WHERE id = ?", (image_id,))[0][0]
    return project.store.open_image(sha)


def test_rejects_each_bad_file_with_its_reason(project, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    jpeg = io.BytesIO()
    _rgb().save(jpeg, format="JPEG")
    (d / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (d / "empty.png").write_bytes(b"")
    (d / "notes.png").write_text("these are my notes, not a picture\n")
    _save(Image.new("RGB", (1, 1)), d / "pixel.png")
    # A decompression bomb: a tiny file that claims 400 megapixels.
    _save(Image.new("1", (20000, 20000)), d / "bomb.png")
    assert (d / "bomb.png").stat().st_size < 200_000

    result = ingest(project, [str(d)])

    assert _outcome(result, d / "truncated.jpg")[0] == "rejected"
    assert _outcome(result, d / "truncated.jpg")[1].startswith("truncated or corrupt image data")
    assert _outcome(result, d / "empty.png") == ("rejected", "empty file (0 bytes)")
    assert _outcome(result, d / "notes.png") == ("rejected", "not an image Pillow can read (the file contains text)")
    assert _outcome(result, d / "pixel.png") == (
        "rejected", "too small: 1x1 (short side 1 px < ingest.min_side 256 px)")
    kind, reason = _outcome(result, d / "bomb.png")
    assert kind == "rejected" and "decompression bomb" in reason
    assert result.added == [] and project.catalog.query("SELECT COUNT(*) FROM images")[0][0] == 0


def test_bomb_below_pillows_own_limit_is_refused_by_ours(project, tmp_path):
    project.config.ingest.max_pixels = 1_000_000
    path = _save(Image.new("L", (1500, 1000)), tmp_path / "big.png")
    kind, reason = _outcome(ingest(project, [str(path)]), path)
    assert kind == "rejected"
    assert reason == "refused: 1500x1000 is 2 MP, above ingest.max_pixels (1 MP); possible decompression bomb"


def test_normalises_modes_and_says_so(project, tmp_path):
    cmyk = _save(_rgb(seed=1).convert("CMYK"), tmp_path / "cmyk.jpg")
    gradient = (np.linspace(0, 65535, 300 * 300).reshape(300, 300)).astype(np.uint16)
    sixteen = _save(Image.fromarray(gradient), tmp_path / "sixteen.png")
    assert Image.open(sixteen).mode.startswith("I")
    pal = _rgb(seed=2).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    palette = _save(pal, tmp_path / "palette.png", transparency=0)
    transparent_index_pixel = next(
        (x, y) for y in range(pal.height) for x in range(pal.width) if pal.getpixel((x, y)) == 0)

    result = ingest(project, [str(cmyk), str(sixteen), str(palette)])

    assert _outcome(result, cmyk) == ("added", "CMYK converted to RGB; 0 face(s)")
    kind, reason = _outcome(result, sixteen)
    assert (kind, reason) == ("added", "16-bit grayscale scaled to 8-bit RGB; 0 face(s)")
    img16 = _stored(project, next(i.image_id for i in result.added if Path(i.path) == sixteen))
    # Scaled, not clipped: Pillow's plain convert() would make this nearly all white.
    assert abs(np.asarray(img16).mean() - gradient.mean() / 257) < 1.0
    kind, reason = _outcome(result, palette)
    assert (kind, reason) == (
        "added", "palette image converted to RGB; transparency flattened onto RGB(255, 255, 255); 0 face(s)")
    imgp = _stored(project, next(i.image_id for i in result.added if Path(i.path) == palette))
    assert imgp.getpixel(transparent_index_pixel) == (255, 255, 255)
    assert {r[0] for r in project.catalog.query("SELECT width FROM images")} == {300, 320}


def test_animated_gif_first_frame_or_refused(project, tmp_path):
    frames = [Image.new("RGB", (300, 300), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)

    project.config.ingest.animated = "refuse"
    assert _outcome(ingest(project, [str(path)]), path) == (
        "rejected", "animated image (3 frames); set ingest.animated = 'first_frame' to use frame 0")

    project.config.ingest.animated = "first_frame"
    result = ingest(project, [str(path)])
    assert _outcome(result, path) == ("added", "animated (3 frames): kept the first frame; palette image converted to RGB; 0 face(s)")
    r, g, b = _stored(project, result.added[0].image_id).getpixel((150, 150))
    assert r > 150 and g < 80 and b < 80


def test_exif_orientation_is_applied(project, tmp_path):
    img = _rgb((400, 300), seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = _save(img, tmp_path / "rotated.jpg", exif=exif.tobytes())
    result = ingest(project, [str(path)])
    assert _outcome(result, path) == ("added", "rotated upright per EXIF orientation 6; 0 face(s)")
    row = project.catalog.query("SELECT width, height FROM images")[0]
    assert (row["width"], row["height"]) == (300, 400)


def test_duplicates_exact_and_near(project, tmp_path):
    base = _rgb(seed=4)
    a = _save(base, tmp_path / "a.png")
    same_bytes = tmp_path / "copy_of_a.png"
    same_bytes.write_bytes(a.read_bytes())
    same_pixels = _save(base, tmp_path / "a.bmp")
    near = _save(base.resize((330, 309), Image.Resampling.LANCZOS), tmp_path / "a_resized.jpg", quality=80)
    other = _save(_rgb(seed=5), tmp_path / "other.png")

    result = ingest(project, [str(a), str(same_bytes), str(same_pixels), str(near), str(other)])

    assert _outcome(result, a)[0] == "added"
    assert _outcome(result, other)[0] == "added"
    assert _outcome(result, same_bytes) == ("rejected", "exact duplicate of a.png (same bytes)")
    assert _outcome(result, same_pixels) == ("rejected", "exact duplicate of a.png (same pixels)")
    kind, reason = _outcome(result, near)
    assert kind == "rejected" and reason.startswith("near-duplicate of a.png (perceptual hash distance ")


def test_rerun_is_a_noop_and_user_files_untouched(project, tmp_path):
    d = tmp_path / "mine"
    (d / "sub").mkdir(parents=True)
    _save(_rgb(seed=6), d / "one.png")
    _save(_rgb(seed=7), d / "sub" / "two.jpg")
    (d / "caption.txt").write_text("a caption")
    (d / ".hidden.png").write_bytes(b"junk")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}

    first = ingest(project, [str(d)])
    second = ingest(project, [str(d)])

    assert len(first.added) == 2
    assert _outcome(first, d / "caption.txt") == ("skipped", "not an image file extension (.txt)")
    assert second.added == [] and second.rejected == []
    assert sorted(i.reason for i in second.skipped) == [
        "already in the catalog", "already in the catalog", "not an image file extension (.txt)"]
    assert project.catalog.query("SELECT COUNT(*) FROM images")[0][0] == 2
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}
    assert after == before


def test_unicode_names_globs_and_originals_kept(project, tmp_path):
    path = _save(_rgb(seed=8), tmp_path / "Zoë — 東京 📷.png")
    _save(_rgb(seed=9), tmp_path / "second.png")
    result = ingest(project, [str(tmp_path / "*.png")])
    assert len(result.added) == 2
    row = project.catalog.query("SELECT original_name, original_sha256 FROM images ORDER BY id")[0]
    assert row["original_name"] == "Zoë — 東京 📷.png"
    stored = list((project.workspace / "store" / "originals").rglob(f"{row['original_sha256']}.png"))
    assert len(stored) == 1 and stored[0].read_bytes() == path.read_bytes()


def test_missing_path_is_an_error(project, tmp_path):
    with pytest.raises(StageError, match="not found"):
        ingest(project, [str(tmp_path / "nope.png")])
    with pytest.raises(StageError, match="no file matches"):
        ingest(project, [str(tmp_path / "*.nothing")])


def test_faces_are_detected_and_stored(project, tmp_path):
    path = _save(astronaut(), tmp_path / "astronaut.png")
    result = ingest(project, [str(path)])
    assert result.added and "face" in result.added[0].reason
    box = project.catalog.query("SELECT * FROM faces ORDER BY (right_px-left_px)*(bottom_px-top_px) DESC")[0]
    # The astronaut's face is at about (175,76)-(265,166) in the 512x512 photo.
    assert abs(box["left_px"] - 175) < 15 and abs(box["top_px"] - 76) < 15
    assert box["detector"] == "dlib_hog"


def test_unreadable_file_is_rejected_not_fatal(project, tmp_path, monkeypatch):
    locked = _save(_rgb(seed=10), tmp_path / "locked.png")
    fine = _save(_rgb(seed=11), tmp_path / "fine.png")
    real_read = Path.read_bytes

    def read_bytes(self):  # CI runs as root, where chmod 0 does not stop reads: simulate EACCES
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    result = ingest(project, [str(locked), str(fine)])
    assert _outcome(result, locked) == ("rejected", "cannot read the file (Permission denied)")
    assert _outcome(result, fine)[0] == "added"
