import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core import imaging
from core.contract import InputSpec
from core.errors import ImageTooLarge, InvalidImage
from core.geometry import resize_to_input
from core.imaging import decoded_bytes, load_image, load_input
from loadtest.images import decompression_bomb_png
from tests.support.images import float_tiff, grey16_png

LIMITS = {"max_bytes": 10_000_000, "max_pixels": 20_000_000}


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (60, 40), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # red square at top-left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    d = load_image(_encode(img, "JPEG", exif=exif, quality=95), **LIMITS)
    assert (d.width, d.height) == (40, 60) and d.image.size == (40, 60)
    arr = np.asarray(d.image)
    assert arr[3, 36, 0] > 200 and arr[3, 3, 0] < 60  # top-left moved to top-right


def test_alpha_is_composited_over_white() -> None:
    img = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 255))   # opaque red
    img.putpixel((2, 0), (0, 0, 255, 128))   # half-transparent blue
    img.putpixel((3, 0), (10, 20, 30, 255))
    arr = np.asarray(load_image(_encode(img), **LIMITS).image)
    assert arr[0, 0].tolist() == [255, 255, 255]        # fully transparent -> white
    assert arr[0, 1].tolist() == [255, 0, 0]
    assert arr[0, 2].tolist() == [127, 127, 255]        # 0.5 blue + 0.5 white
    assert arr[0, 3].tolist() == [10, 20, 30]


def test_palette_transparency_is_composited_over_white() -> None:
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 0, 200, 10, 10, 5, 5, 5] + [0] * (256 * 3 - 9))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.putpixel((2, 0), 2)
    data = _encode(img, transparency=0)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    arr = np.asarray(load_image(data, **LIMITS).image)
    assert arr[0].tolist() == [[255, 255, 255], [200, 10, 10], [5, 5, 5]]


def test_sixteen_bit_grey_is_scaled_to_eight_bits() -> None:
    values = np.array([[0, 257, 32896, 65535]], np.uint16)  # 0, 1, 128, 255 in 8 bits
    data = _encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    arr = np.asarray(load_image(data, **LIMITS).image)
    assert arr[0, :, 0].tolist() == [0, 1, 128, 255] and (arr[..., 0] == arr[..., 2]).all()


def test_float_images_in_unit_range_are_scaled() -> None:
    arr = np.asarray(load_image(_encode(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)), "TIFF"),
                                **LIMITS).image)
    assert arr[0, :, 1].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    img = Image.new(mode, (8, 6))
    fmt = "TIFF" if mode in ("CMYK", "I;16", "I", "F") else "PNG"
    d = load_image(_encode(img, fmt), **LIMITS)
    assert d.image.mode == "RGB" and d.image.size == (8, 6)


def test_not_an_image_empty_and_truncated() -> None:
    with pytest.raises(InvalidImage, match="not an image Pillow can identify"):
        load_image(b"hello world", **LIMITS)
    with pytest.raises(InvalidImage, match="empty"):
        load_image(b"", **LIMITS)
    data = _encode(Image.effect_noise((200, 200), 50).convert("RGB"), "JPEG")
    with pytest.raises(InvalidImage, match="truncated or corrupt"):
        load_image(data[: len(data) // 2], **LIMITS)


def test_byte_and_pixel_limits() -> None:
    data = _encode(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageTooLarge, match="bytes"):
        load_image(data, max_bytes=10, max_pixels=10**9)
    with pytest.raises(ImageTooLarge, match="pixels"):
        load_image(data, max_bytes=10**9, max_pixels=5000)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = decompression_bomb_png(60000, 60000)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLarge, match="60000x60000"):
        load_image(bomb, **LIMITS)


def test_a_path_loads_like_its_bytes(tmp_path) -> None:
    data = _encode(Image.effect_noise((64, 48), 40).convert("RGB"), "JPEG")
    (tmp_path / "x.jpg").write_bytes(data)
    a, b = load_image(tmp_path / "x.jpg", **LIMITS), load_image(data, **LIMITS)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert (a.width, a.height, a.format) == (64, 48, "JPEG")
    with pytest.raises(ImageTooLarge, match="bytes"):
        load_image(tmp_path / "x.jpg", max_bytes=10)
    with pytest.raises(InvalidImage, match="cannot be read"):
        load_image(tmp_path / "missing.jpg")


def test_load_input_fits_the_model_and_maps_back() -> None:
    from core.contract import InputSpec

    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 255, 255), (100, 50, 120, 70))
    spec = InputSpec(name="images", height=64, width=64, resize="letterbox", pad_value=114)
    decoded, arr, geo = load_input(_encode(img), spec)
    assert arr.shape == (64, 64, 3) and (arr[32:, :] == 114).all()      # bottom half is padding
    box = geo.boxes_to_original(np.array([[32, 16, 38.4, 22.4]], np.float32))[0]
    np.testing.assert_allclose(box, [100, 50, 120, 70], atol=1e-4)


def test_large_jpeg_is_drafted_but_reports_original_size() -> None:
    img = Image.new("RGB", (2000, 1200), (10, 200, 30))
    d = load_image(_encode(img, "JPEG"), **LIMITS, draft_to=224)
    assert (d.width, d.height) == (2000, 1200)
    assert d.image.size[0] < 2000 and min(d.image.size) >= 224


# --- wide modes, strips and the memory budget (issue 20) -----------------------------------

def _float64_reference(arr: np.ndarray) -> np.ndarray:
    """The whole-image float64 conversion the strips replace, verbatim."""
    a = arr.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if arr.dtype.kind in "iu" and lo >= 0 and hi <= 65535:
        return np.round(a * (255.0 / 65535.0)).astype(np.uint8)
    if arr.dtype.kind == "f" and lo >= 0 and hi <= 1:
        return np.round(a * 255.0).astype(np.uint8)
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


_RNG = np.random.default_rng(20)
WIDE = {
    "16-bit": Image.fromarray(_RNG.integers(0, 65536, (37, 23), dtype=np.uint16)),
    "16-bit dark": Image.fromarray(_RNG.integers(0, 300, (37, 23), dtype=np.uint16)),
    "16-bit big-endian": Image.frombytes("I;16B", (23, 37),
                                         _RNG.integers(0, 65536, 37 * 23, dtype=np.uint16).astype(">u2").tobytes()),
    "32-bit in 16-bit range": Image.fromarray(_RNG.integers(0, 65536, (37, 23), dtype=np.int32), "I"),
    "32-bit signed": Image.fromarray(_RNG.integers(-70000, 200000, (37, 23), dtype=np.int32), "I"),
    "32-bit constant": Image.fromarray(np.full((37, 23), -5, np.int32), "I"),
    "float in 0..1": Image.fromarray(_RNG.random((37, 23), dtype=np.float32), "F"),
    "float wide": Image.fromarray(_RNG.random((37, 23), dtype=np.float32) * 1000 - 300, "F"),
    "float constant": Image.fromarray(np.full((37, 23), 3.5, np.float32), "F"),
}


@pytest.mark.parametrize("name", sorted(WIDE))
@pytest.mark.parametrize("strip", [7, 1 << 18])
def test_wide_modes_give_the_uint8_of_the_whole_image_float64_conversion(name: str, strip: int,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(imaging, "_STRIP_PIXELS", strip)  # 7: many strips, one cut mid-row
    img = WIDE[name]
    want = _float64_reference(np.asarray(img))
    for data in (_encode(img, "TIFF"),) + ((_encode(img),) if img.mode == "I;16" else ()):
        assert Image.open(io.BytesIO(data)).mode == img.mode
        got = np.asarray(load_image(data, **LIMITS).image)
        assert got.shape == (37, 23, 3) and np.array_equal(got[..., 0], want) and (got[..., 0] == got[..., 2]).all()
        assert np.array_equal(np.asarray(load_image(data, **LIMITS, color="L").image), want)


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_grey_uploads_are_resized_as_l_into_the_rgb_the_model_always_got(resize: str) -> None:
    """load_input resizes a grey image as "L" and copies it into the three channels: the
    array of resizing its RGB conversion, as it did before, for every grey mode."""
    spec = InputSpec(name="images", height=48, width=64, resize=resize, pad_value=114)
    big = _RNG.integers(0, 65536, (300, 500), dtype=np.uint16)
    for img in (Image.fromarray(big), Image.fromarray((big >> 8).astype(np.uint8)), Image.fromarray(big > 30000),
                Image.fromarray(big.astype(np.float32) / 65535, "F")):
        data = _encode(img, "TIFF")
        decoded, arr, geometry = load_input(data, spec)
        want, want_geometry = resize_to_input(load_image(data).image, spec)
        assert decoded.image.mode == "L" and arr.shape == (48, 64, 3)
        assert np.array_equal(arr, want) and geometry == want_geometry


def test_alpha_and_transparency_are_composited_strip_by_strip(monkeypatch: pytest.MonkeyPatch) -> None:
    rgba = Image.fromarray(_RNG.integers(0, 256, (41, 29, 4), dtype=np.uint8), "RGBA")
    palette = rgba.convert("RGB").quantize(16)
    for data in (_encode(rgba), _encode(rgba.convert("LA")), _encode(palette, transparency=3)):
        whole = np.asarray(load_image(data, **LIMITS).image)
        monkeypatch.setattr(imaging, "_STRIP_PIXELS", 100)
        assert np.array_equal(np.asarray(load_image(data, **LIMITS).image), whole)
        monkeypatch.undo()
        src = Image.open(io.BytesIO(data)).convert("RGBA")
        canvas = Image.new("RGB", src.size, (255, 255, 255))
        canvas.paste(src, mask=src.getchannel("A"))
        assert np.array_equal(whole, np.asarray(canvas))


def test_decoded_bytes_count_the_mode_as_pillow_holds_it_and_the_decoder() -> None:
    def opened(img: Image.Image, fmt: str = "PNG", **kw) -> Image.Image:
        return Image.open(io.BytesIO(_encode(img, fmt, **kw)))

    rgb = Image.new("RGB", (10, 10), (1, 2, 3))
    assert decoded_bytes(opened(Image.new("L", (10, 10)))) == 100
    assert decoded_bytes(opened(Image.new("I;16", (10, 10)))) == 200
    assert decoded_bytes(opened(rgb)) == 400            # Pillow holds RGB as 4 bytes a pixel
    assert decoded_bytes(opened(Image.new("F", (10, 10)), "TIFF")) == 400
    assert decoded_bytes(opened(rgb, "JPEG")) == 400
    assert decoded_bytes(opened(rgb, "JPEG", progressive=True)) == 1000  # + whole-image DCT coefficients
    assert decoded_bytes(opened(rgb, "WEBP", lossless=True)) == 1600     # + two canvases and a copy
    one_strip, row_strips = (Image.open(io.BytesIO(float_tiff(2100, 2100, rows))) for rows in (2100, 1))
    assert decoded_bytes(row_strips) == 2100 * 2100 * 4              # a one-row strip: the budget's margin
    assert decoded_bytes(one_strip) == 2100 * 2100 * 4 * 2           # + libtiff's 17.6 MB strip


def test_decoded_bytes_limit_is_checked_from_the_header_before_decoding() -> None:
    header = grey16_png(6000, 6000)[:200]  # a 16-bit 6000x6000 header and the start of its pixels
    with pytest.raises(ImageTooLarge, match=r"6000x6000 PNG I;16: decoding it takes 72000000 bytes \(2 a pixel\); "
                                            r"the limit is 50000000 decoded bytes"):
        load_image(header, max_pixels=10**9, max_decoded_bytes=50_000_000)
    with pytest.raises(InvalidImage, match="truncated"):  # under the limit, it is decoded (and found cut short)
        load_image(header, max_pixels=10**9, max_decoded_bytes=80_000_000)


def test_decoded_bytes_limit_defaults_to_four_bytes_a_pixel_at_the_pixel_limit() -> None:
    rgb = Image.new("RGB", (100, 100), (9, 9, 9))
    for fmt in ("PNG", "TIFF", "JPEG"):
        assert load_image(_encode(rgb, fmt), max_pixels=10_000).image.size == (100, 100)
    load_image(_encode(Image.new("F", (100, 100)), "TIFF"), max_pixels=10_000)
    webp = _encode(rgb, "WEBP", lossless=True)
    with pytest.raises(ImageTooLarge, match=r"WEBP RGB: decoding it takes 160000 bytes \(16 a pixel\); the limit is 4"):
        load_image(webp, max_pixels=10_000)
    assert load_image(webp, max_pixels=10_000, max_decoded_bytes=160_000).width == 100


PEAK_SCRIPT = """
import resource, sys
from core.contract import InputSpec
from core.imaging import load_input
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decoded, arr, _ = load_input(data, InputSpec(name="images", height=128, width=128), max_pixels=100_000_000)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, decoded.image.mode, arr.shape)
"""


def test_a_100_mp_16_bit_png_decodes_within_its_own_size_and_an_8_bit_copy(tmp_path) -> None:
    """Peak RSS growth of load_input on a 10000x10000 16-bit PNG, in a fresh process: the
    decoded image (2 bytes a pixel) and its 8-bit "L" copy (1), plus 100 MB for the strips
    and the allocator. Measured: 293-310 MB (2.67 GB through whole-image float64 copies)."""
    path = tmp_path / "grey16.png"
    path.write_bytes(grey16_png(10_000, 10_000))
    r = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True, timeout=300,
                       cwd=Path(imaging.__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    peak, mode, shape = r.stdout.split(maxsplit=2)
    assert mode == "L" and shape.strip() == "(128, 128, 3)"
    assert int(peak) < 3 * 100_000_000 + 100_000_000, f"peak RSS growth {int(peak) / 1e6:.0f} MB"
