"""Image bytes <-> RGB uint8 arrays, with every failure a RowError.

Decoding checks the pixel count from the header *before* any pixel is decoded (a 40 KB PNG can
declare 400 megapixels), never accepts a truncated file as a partial image, applies the EXIF
orientation so edits are upright, and brings every mode the model could meet to RGB uint8: alpha
is composited on white, 16-bit grey is scaled (not clipped), animated files give their first frame.

Encoding is deterministic: same array, same bytes (no timestamps, no metadata).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from step1x_batch.errors import (
    CORRUPT_IMAGE,
    EMPTY_OBJECT,
    TOO_MANY_PIXELS,
    TRUNCATED_IMAGE,
    UNSUPPORTED_FORMAT,
    RowError,
)

# Output formats: name -> (Pillow format, file extension)
FORMATS = {"png": ("PNG", "png"), "webp": ("WEBP", "webp"), "jpeg": ("JPEG", "jpg")}
_ALIASES = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}

# Leading bytes of formats Pillow reads: a file that starts like one of these but cannot be
# opened is damaged, not of an unsupported kind.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_WHITE = (255, 255, 255, 255)


def image_format(fmt: str) -> str:
    """The canonical output format name (``png``, ``webp`` or ``jpeg``) for ``fmt``."""
    name = _ALIASES.get(str(fmt).lower().lstrip("."))
    if name is None:
        raise ValueError(f"unknown image format {fmt!r}; expected one of png, webp, jpeg")
    return name


def image_extension(fmt: str) -> str:
    """The file extension written for output format ``fmt`` (``png``, ``webp``, ``jpg``)."""
    return FORMATS[image_format(fmt)][1]


def _sniff(data: bytes) -> str | None:
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _cut_off(data: bytes, fmt: str | None) -> bool:
    """Whether ``data`` lacks the end its format requires (so a failure means truncation)."""
    if fmt is None:
        return any(magic.startswith(data) for magic, _ in _SIGNATURES)  # shorter than a signature
    if fmt == "PNG":
        return b"IEND" not in data[-12:]
    if fmt == "JPEG":
        return not data.rstrip(b"\x00").endswith(b"\xff\xd9")
    if fmt == "GIF":
        return not data.rstrip(b"\x00").endswith(b";")
    if fmt == "WEBP":
        return len(data) < 12 or int.from_bytes(data[4:8], "little") + 8 > len(data)
    if fmt == "BMP":
        return len(data) < 6 or int.from_bytes(data[2:6], "little") > len(data)
    return False


def _is_truncation(exc: BaseException, data: bytes, fmt: str | None) -> bool:
    text = str(exc).lower()
    return _cut_off(data, fmt) or any(
        s in text
        for s in ("truncated", "unexpected end", "premature end", "end of file", "eof", "incomplete")
    )


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and enforce the pixel limit before any decoding."""
    sniffed = _sniff(data)
    try:
        # Pillow refuses > 2 * Image.MAX_IMAGE_PIXELS itself (DecompressionBombError) and only
        # warns above MAX_IMAGE_PIXELS; our own, usually stricter, limit is checked right below.
        # (No warnings.catch_warnings here: it is not thread-safe and callers decode in threads.)
        im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RowError(
            TOO_MANY_PIXELS,
            f"The image declares more pixels than can be decoded safely (Pillow: {exc}); the "
            f"job's limit is {max_pixels} pixels. Downscale the image or raise the pixel limit.",
        ) from None
    except UnidentifiedImageError:
        if _cut_off(data, sniffed):
            raise RowError(
                TRUNCATED_IMAGE,
                f"The file ({len(data)} bytes) starts like a {sniffed or 'known'} image but ends "
                "too early; it was cut off during upload or copy. Re-upload the complete file.",
            ) from None
        if sniffed:
            raise RowError(
                CORRUPT_IMAGE,
                f"The file starts like a {sniffed} image but its header cannot be read "
                f"({len(data)} bytes); the file is damaged. Re-export or re-upload it.",
            ) from None
        raise RowError(
            UNSUPPORTED_FORMAT,
            f"The file ({len(data)} bytes, starting {data[:8]!r}) is not an image format this "
            "job can read; use PNG, JPEG, WebP, GIF, BMP or TIFF.",
        ) from None
    except Exception as exc:  # noqa: BLE001 - any header failure is a damaged file
        what = f"The {sniffed or 'image'} header cannot be read ({type(exc).__name__}: {exc})"
        if _is_truncation(exc, data, sniffed):
            raise RowError(
                TRUNCATED_IMAGE,
                f"{what}: the file ends too early; it was cut off during upload or copy. "
                "Re-upload the complete file.",
            ) from None
        raise RowError(CORRUPT_IMAGE, f"{what}; the file is damaged. Re-export or re-upload it.") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise RowError(CORRUPT_IMAGE, f"The {im.format} image declares a {width}x{height} size.")
    if width * height > max_pixels:
        raise RowError(
            TOO_MANY_PIXELS,
            f"The {im.format} image is {width}x{height} = {width * height} pixels, over the "
            f"limit of {max_pixels}; downscale it or raise the pixel limit.",
        )
    return im


def _load(im: Image.Image, data: bytes) -> None:
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone flipped Pillow's global; refuse partial images
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; decode_image refuses it")
    try:
        im.seek(0)  # animated GIF / WebP / APNG, multi-page TIFF: the first frame
        im.load()
    except Exception as exc:  # noqa: BLE001
        fmt = im.format or "image"
        if _is_truncation(exc, data, _sniff(data)):
            raise RowError(
                TRUNCATED_IMAGE,
                f"The {fmt} file ends before its pixel data does ({exc}); it was cut off during "
                "upload or copy. Re-upload the complete file.",
            ) from None
        raise RowError(
            CORRUPT_IMAGE,
            f"The {fmt} pixel data cannot be decoded ({type(exc).__name__}: {exc}); the file is "
            "damaged. Re-export or re-upload it.",
        ) from None


def _on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (PNG, TIFF): scale the full range to 8 bits; Pillow's own convert clips.
        # Mode "I" (32-bit) holding only 0..255 is already 8-bit data.
        a = np.asarray(im).astype(np.int64)
        if mode != "I" or a.max(initial=0) > 255:
            a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
        grey = a.astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "F":
        a = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if a.max(initial=0.0) <= 1.0:
            a = a * 255.0
        grey = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if has_alpha:
        rgb = _on_white(im)
    elif mode == "RGB":
        rgb = im
    else:  # L, 1, P, CMYK, YCbCr, LAB, HSV
        rgb = im.convert("RGB")
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes to an upright RGB uint8 array (H, W, 3) or raise RowError:
    EMPTY_OBJECT (zero bytes), TOO_MANY_PIXELS (header over ``max_pixels``, checked before
    decoding), UNSUPPORTED_FORMAT, TRUNCATED_IMAGE, CORRUPT_IMAGE. Thread-safe.

    Pillow's own bomb limit (``2 * PIL.Image.MAX_IMAGE_PIXELS``, about 179 megapixels) also
    applies: a ``max_pixels`` above it needs Pillow's limit raised too."""
    if data is None or len(data) == 0:
        raise RowError(EMPTY_OBJECT, "The object is empty (0 bytes); re-upload the image.")
    data = bytes(data)
    im = _open(data, max_pixels)
    return _decode_opened(im, data)


def _decode_opened(im: Image.Image, data: bytes) -> np.ndarray:
    try:
        _load(im, data)
        try:
            upright = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - unreadable EXIF: keep the stored orientation
            upright = im
        try:
            return _to_rgb(upright if upright is not None else im)
        except Exception as exc:  # noqa: BLE001
            raise RowError(
                UNSUPPORTED_FORMAT,
                f"The {im.format} image uses pixel mode {im.mode!r}, which cannot be converted "
                f"to RGB ({type(exc).__name__}: {exc}); convert it to 8-bit RGB first.",
            ) from None
    finally:
        im.close()


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode an RGB uint8 (H, W, 3) array. Same array, same arguments: same bytes (no
    timestamps or metadata are written). ``quality`` applies to jpeg and webp."""
    name = image_format(fmt)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {arr.dtype} {arr.shape}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    im = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    buf = io.BytesIO()
    if name == "png":
        im.save(buf, format="PNG", optimize=False, compress_level=6)
    elif name == "jpeg":
        im.save(buf, format="JPEG", quality=int(quality), optimize=False, progressive=False,
                subsampling="4:2:0" if quality < 90 else "4:4:4")
    else:
        im.save(buf, format="WEBP", quality=int(quality), method=4, lossless=False, exact=False)
    return buf.getvalue()
