"""decode_image / encode_image: every mode that must convert, every failure with its code."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import draw_rgb
from step1x_batch import errors
from step1x_batch.errors import RowError
from step1x_batch.io.images import decode_image, encode_image, image_extension, image_format

W, H = 48, 32
LIMIT = 10_000_000
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def corners(img: np.ndarray) -> list[tuple[int, int, int]]:
    """Colours at the centres of the four solid corner blocks of draw_rgb (TL, TR, BL, BR)."""
    h, w = img.shape[:2]
    qh, qw = h // 8, w // 8
    return [tuple(int(v) for v in img[y, x]) for y, x in
            ((qh, qw), (qh, w - 1 - qw), (h - 1 - qh, qw), (h - 1 - qh, w - 1 - qw))]


def near(a, b, tol):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def check_rgb(out: np.ndarray, shape=(H, W)) -> None:
    assert out.dtype == np.uint8 and out.shape == (*shape, 3) and out.flags.c_contiguous


# --- conversions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("BMP", {}), ("TIFF", {}),
                                    ("WEBP", {"lossless": True})])
def test_lossless_rgb_formats_round_trip_exactly(fmt, kw, image_factory):
    out = decode_image(image_factory.bytes("RGB", fmt, **kw), LIMIT)
    check_rgb(out)
    np.testing.assert_array_equal(out, draw_rgb(W, H))


def test_jpeg_rgb(image_factory):
    out = decode_image(image_factory.bytes("RGB", "JPEG", quality=95), LIMIT)
    check_rgb(out)
    assert [near(c, e, 12) for c, e in zip(corners(out), (RED, GREEN, BLUE, WHITE))] == [True] * 4


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_grey_bilevel_and_palette_match_pillows_rgb_view(mode, image_factory):
    src = image_factory.pil(mode)
    out = decode_image(image_factory.encode(src, "PNG"), LIMIT)
    check_rgb(out)
    np.testing.assert_array_equal(out, np.asarray(src.convert("RGB")))
    if mode == "1":
        assert set(np.unique(out)) <= {0, 255}
    if mode == "L":
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_rgba_is_composited_on_white(image_factory):
    src = image_factory.pil("RGBA")  # left half fully transparent
    rgba = np.asarray(src).copy()
    rgba[0, -1, 3] = 128  # one half-transparent pixel on the right
    rgba[0, -1, :3] = (0, 0, 0)
    out = decode_image(image_factory.encode(Image.fromarray(rgba, "RGBA"), "PNG"), LIMIT)
    check_rgb(out)
    assert (out[:, : W // 2] == 255).all()
    expected = draw_rgb(W, H)
    np.testing.assert_array_equal(out[1:, W // 2:], expected[1:, W // 2:])
    assert near(out[0, -1], (127, 127, 127), 1)  # black at alpha 128 over white


def test_la_is_composited_on_white(image_factory):
    grey = np.asarray(image_factory.pil("L"))
    alpha = np.full_like(grey, 255)
    alpha[:, : W // 2] = 0
    la = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)])
    out = decode_image(image_factory.encode(la, "PNG"), LIMIT)
    assert (out[:, : W // 2] == 255).all()
    np.testing.assert_array_equal(out[:, W // 2:, 0], grey[:, W // 2:])


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_white(fmt, image_factory):
    im = Image.new("P", (W, H), 0)
    im.putpalette([10, 20, 30, 255, 0, 0] + [0, 0, 0] * 254)
    px = np.zeros((H, W), np.uint8)
    px[:, W // 2:] = 1  # right half red, left half palette index 0 (transparent)
    im = Image.fromarray(px, "P")
    im.putpalette([10, 20, 30, 255, 0, 0] + [0, 0, 0] * 254)
    out = decode_image(image_factory.encode(im, fmt, transparency=0), LIMIT)
    check_rgb(out)
    assert (out[:, : W // 2] == 255).all()
    assert (out[:, W // 2:] == np.array(RED, np.uint8)).all()


def test_cmyk_tiff_exact_and_jpeg_close(image_factory):
    out = decode_image(image_factory.bytes("CMYK", "TIFF"), LIMIT)
    check_rgb(out)
    np.testing.assert_array_equal(out, draw_rgb(W, H))
    out = decode_image(image_factory.bytes("CMYK", "JPEG", quality=95), LIMIT)
    check_rgb(out)
    assert [near(c, e, 24) for c, e in zip(corners(out), (RED, GREEN, BLUE, WHITE))] == [True] * 4


def test_16_bit_grey_png_is_scaled_not_clipped(image_factory):
    values = np.array([0, 257, 32896, 40000, 65535], np.uint16)
    a = np.resize(values, (H, W)).astype(np.uint16)
    src = Image.fromarray(a)
    assert src.mode == "I;16"
    out = decode_image(image_factory.encode(src, "PNG"), LIMIT)
    check_rgb(out)
    expected = ((a.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out[..., 0].flat[:5].tolist() == [0, 1, 128, 156, 255]


def test_32_bit_int_and_float_tiff(image_factory):
    wide = np.resize(np.array([0, 1000, 65535], np.int32), (H, W))
    out = decode_image(image_factory.encode(Image.fromarray(wide), "TIFF"), LIMIT)
    assert out[..., 0].flat[:3].tolist() == [0, 4, 255]
    narrow = np.resize(np.array([0, 7, 255], np.int32), (H, W))  # 8-bit data held in mode I
    out = decode_image(image_factory.encode(Image.fromarray(narrow), "TIFF"), LIMIT)
    assert out[..., 0].flat[:3].tolist() == [0, 7, 255]
    unit = np.resize(np.array([0.0, 0.5, 1.0], np.float32), (H, W))
    out = decode_image(image_factory.encode(Image.fromarray(unit), "TIFF"), LIMIT)
    assert out[..., 2].flat[:3].tolist() == [0, 128, 255]


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_orientation_comes_out_upright(orientation, image_factory):
    data = image_factory.exif_rotated(orientation)
    stored = Image.open(io.BytesIO(data))
    assert stored.getexif()[0x0112] == orientation
    if orientation >= 5:
        assert stored.size == (H, W)  # stored sideways
    out = decode_image(data, LIMIT)
    check_rgb(out)
    assert [near(c, e, 30) for c, e in zip(corners(out), (RED, GREEN, BLUE, WHITE))] == [True] * 4


def test_animated_gif_gives_first_frame(image_factory):
    data = image_factory.animated_gif(frames=3)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = decode_image(data, LIMIT)
    check_rgb(out)
    assert [near(c, e, 8) for c, e in zip(corners(out), (RED, GREEN, BLUE, WHITE))] == [True] * 4


@pytest.mark.parametrize("fmt,kw", [("WEBP", {"lossless": True}), ("PNG", {})])
def test_animated_webp_and_apng_give_first_frame(fmt, kw, image_factory):
    first = Image.fromarray(draw_rgb(W, H))
    rest = [Image.new("RGB", (W, H), (0, 0, 0)), Image.new("RGB", (W, H), (9, 9, 9))]
    buf = io.BytesIO()
    first.save(buf, format=fmt, save_all=True, append_images=rest, duration=100, loop=0, **kw)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    np.testing.assert_array_equal(decode_image(buf.getvalue(), LIMIT), draw_rgb(W, H))


# --- failures ------------------------------------------------------------------------------------


def code_of(data: bytes, limit: int = LIMIT) -> str:
    with pytest.raises(RowError) as info:
        decode_image(data, limit)
    assert info.value.message  # always a sentence
    return info.value.code


def test_empty_object():
    assert code_of(b"") == errors.EMPTY_OBJECT


@pytest.mark.parametrize(
    "data",
    [b"hello, this is text not an image", b"<svg xmlns='http://www.w3.org/2000/svg'/>",
     b"%PDF-1.4\n%...", b"\x00" * 100, b"RIFF\x10\x00\x00\x00WAVEfmt "],
)
def test_unsupported_formats(data):
    assert code_of(data) == errors.UNSUPPORTED_FORMAT


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("JPEG", {"quality": 90}), ("GIF", {}),
                                    ("WEBP", {}), ("BMP", {}), ("TIFF", {})])
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.9])
def test_truncated_files(fmt, kw, fraction, image_factory):
    data = image_factory.bytes("RGB", fmt, 64, 48, **kw)
    cut = data[: max(8, int(len(data) * fraction))]
    assert code_of(cut) == errors.TRUNCATED_IMAGE


def test_truncated_signature():
    assert code_of(b"\x89PN") == errors.TRUNCATED_IMAGE


def test_corrupt_png_data_and_header(image_factory):
    png = image_factory.bytes("RGB", "PNG")
    bad = bytearray(png)
    i = png.index(b"IDAT") + 10
    bad[i:i + 10] = b"\x00" * 10  # damaged compressed pixels, file still complete
    assert code_of(bytes(bad)) == errors.CORRUPT_IMAGE
    bad = bytearray(png)
    bad[16:24] = b"\xff" * 8  # damaged IHDR
    assert code_of(bytes(bad)) == errors.CORRUPT_IMAGE


def test_corrupt_gif(image_factory):
    assert code_of(b"GIF89a" + bytes(range(256)) * 2 + b";") == errors.CORRUPT_IMAGE


def test_pixel_limit_is_checked_from_the_header(image_factory):
    data = image_factory.bytes("RGB", "PNG")  # 48 x 32 = 1536 pixels
    assert code_of(data, limit=1535) == errors.TOO_MANY_PIXELS
    assert decode_image(data, 1536).shape == (H, W, 3)


@pytest.mark.parametrize("limit", [LIMIT, 150_000_000, 10**9])
def test_decompression_bomb_is_refused_before_decoding(limit, image_factory):
    bomb = image_factory.bomb_png(20000, 20000)  # 400 megapixels in ~50 KB
    assert len(bomb) < 200_000
    start = time.perf_counter()
    with pytest.raises(RowError) as info:
        decode_image(bomb, limit)
    assert info.value.code == errors.TOO_MANY_PIXELS
    assert time.perf_counter() - start < 1.0  # never decoded (decoding would take seconds)


def test_moderate_bomb_under_pillows_limit_but_over_ours(image_factory):
    bomb = image_factory.bomb_png(5000, 4000)  # 20 MP: under Pillow's own limits
    with pytest.raises(RowError) as info:
        decode_image(bomb, LIMIT)
    assert info.value.code == errors.TOO_MANY_PIXELS
    assert "5000x4000" in info.value.message


def test_refuses_when_pillow_is_told_to_load_truncated_images(monkeypatch, image_factory):
    data = image_factory.bytes("RGB", "PNG")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError):
        decode_image(data[: len(data) // 2], LIMIT)


# --- encoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg", "jpg"])
def test_encode_is_deterministic_and_decodable(fmt):
    img = draw_rgb(W, H)
    a, b = encode_image(img, fmt, 90), encode_image(img.copy(), fmt, 90)
    assert a == b
    out = decode_image(a, LIMIT)
    assert out.shape == img.shape
    if fmt == "png":
        np.testing.assert_array_equal(out, img)
    else:
        assert np.abs(out.astype(int) - img.astype(int)).mean() < 12
    assert Image.open(io.BytesIO(a)).format == {"png": "PNG", "webp": "WEBP"}.get(fmt, "JPEG")


def test_encode_writes_no_metadata():
    png = encode_image(draw_rgb(W, H), "png")
    chunks, i = [], 8
    while i < len(png):
        n = int.from_bytes(png[i:i + 4], "big")
        chunks.append(png[i + 4:i + 8])
        i += 12 + n
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}
    jpg = Image.open(io.BytesIO(encode_image(draw_rgb(W, H), "jpeg")))
    assert len(jpg.getexif()) == 0 and "icc_profile" not in jpg.info


def test_encode_rejects_non_rgb_uint8():
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.uint8), "gif")


def test_format_names():
    assert image_format("JPG") == "jpeg" and image_extension("jpeg") == "jpg"
    assert image_extension("png") == "png" and image_extension(".webp") == "webp"
    with pytest.raises(ValueError):
        image_format("tiff")


def test_decoding_in_threads_gives_each_row_its_own_answer(image_factory):
    """Callers decode with a thread pool: results and error codes must not bleed across threads."""
    from concurrent.futures import ThreadPoolExecutor

    good = image_factory.bytes("RGBA", "PNG")
    cases = [(good, None), (image_factory.bomb_png(), errors.TOO_MANY_PIXELS),
             (good[: len(good) // 2], errors.TRUNCATED_IMAGE), (b"", errors.EMPTY_OBJECT),
             (image_factory.exif_rotated(6), None), (b"text", errors.UNSUPPORTED_FORMAT)] * 8

    def run(case):
        data, _ = case
        try:
            return decode_image(data, LIMIT)
        except RowError as exc:
            return exc.code

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, cases))
    for (data, expected), got in zip(cases, results):
        if expected is None:
            assert isinstance(got, np.ndarray) and got.shape == (H, W, 3)
        else:
            assert got == expected
