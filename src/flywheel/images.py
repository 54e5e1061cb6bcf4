"""Safe image decoding and normalisation, plus the hashes used for duplicate detection.

Every image that enters Flywheel passes through ``decode_image``: it refuses what it cannot use with a
one-line reason (``ImageRejected``) and otherwise returns an RGB image plus notes saying exactly what
was normalised (EXIF rotation, CMYK, 16-bit, palette, transparency, animation), so nothing is silently
changed. The user's file itself is never modified.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from flywheel.errors import ImageRejected

# Extensions picked up when a folder is ingested (explicitly named files are always tried).
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif"}


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, 8 bits per channel, EXIF orientation applied
    notes: list[str] = field(default_factory=list)
    source_format: str | None = None


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(b >= 32 or b in b"\t\r\n" for b in head)


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    min_side: int,
    animated: str = "first_frame",
    alpha_background: tuple[int, int, int] = (255, 255, 255),
) -> DecodedImage:
    """Decode untrusted bytes into a normalised RGB image, or raise ImageRejected with the reason."""
    # 1. Cheap checks before Pillow sees the bytes.
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    # 2. Open lazily: only the header is parsed, so a decompression bomb is refused before decoding.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageRejected(f"refused: too many pixels, possible decompression bomb ({err})") from None
        except UnidentifiedImageError:
            kind = "the file contains text" if _looks_like_text(data) else "unknown or corrupt format"
            raise ImageRejected(f"not an image Pillow can read ({kind})") from None
    width, height = im.size
    if width * height > max_pixels:
        raise ImageRejected(
            f"refused: {width}x{height} is {width * height / 1e6:.0f} MP, above ingest.max_pixels "
            f"({max_pixels / 1e6:.0f} MP); possible decompression bomb"
        )
    notes: list[str] = []
    fmt = im.format
    # 3. Animation: keep frame 0 (and say so) or refuse, per config.
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        if animated == "refuse":
            raise ImageRejected(f"animated image ({frames} frames); set ingest.animated = 'first_frame' to use frame 0")
        im.seek(0)
        notes.append(f"animated ({frames} frames): kept the first frame")
    # 4. Decode the pixels; truncated or corrupt data fails here.
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageRejected(f"truncated or corrupt image data ({err})") from None
    # 5. EXIF orientation: store what a viewer shows, not the sensor's raw orientation.
    orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
    if orientation not in (0, 1):
        im = ImageOps.exif_transpose(im)
        notes.append(f"rotated upright per EXIF orientation {orientation}")
    # 6. Normalise the mode to 8-bit RGB.
    im = _to_rgb(im, notes, alpha_background)
    # 7. Size floor (after rotation, so it is the size the user sees).
    w, h = im.size
    if min(w, h) < min_side:
        raise ImageRejected(f"too small: {w}x{h} (short side {min(w, h)} px < ingest.min_side {min_side} px)")
    return DecodedImage(image=im, notes=notes, source_format=fmt)


def _to_rgb(im: Image.Image, notes: list[str], background: tuple[int, int, int]) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's convert() clips 16-bit values at 255 (a white image); scale to 8 bits instead.
        arr = np.asarray(im).astype(np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(np.round(arr / hi * 255.0), 0, 255).astype(np.uint8)
        notes.append(f"{'16' if hi > 255 else '32'}-bit grayscale scaled to 8-bit RGB")
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr8 = np.zeros_like(arr, dtype=np.uint8) if hi <= lo else ((arr - lo) / (hi - lo) * 255).astype(np.uint8)
        notes.append("floating-point image rescaled to 8-bit RGB")
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        notes.append("palette image converted to RGB")
        if im.mode == "RGB":
            return im
    elif mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        alpha = np.asarray(im.getchannel("A"))
        if alpha.min() < 255:
            flat = Image.new("RGB", im.size, background)
            flat.paste(im, mask=im.getchannel("A"))
            notes.append(f"transparency flattened onto RGB{tuple(background)}")
            return flat
        return im.convert("RGB")
    if mode == "CMYK":
        notes.append("CMYK converted to RGB")
    elif mode in ("1", "L"):
        notes.append("grayscale converted to RGB")
    else:
        notes.append(f"{mode} converted to RGB")
    return im.convert("RGB")


def pixel_sha256(image: Image.Image) -> str:
    """Hash of the decoded RGB pixels: equal for the same picture saved in different lossless files."""
    rgb = image.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def phash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (the classic pHash): robust to resizing and recompression."""
    from scipy.fft import dctn

    gray = image.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    coeffs = dctn(np.asarray(gray, dtype=np.float64), norm="ortho")[:8, :8]
    # Median without the DC term (overall brightness), as in the reference pHash.
    bits = (coeffs > np.median(np.delete(coeffs.ravel(), 0))).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def phash_hex(value: int) -> str:
    return f"{value:016x}"
