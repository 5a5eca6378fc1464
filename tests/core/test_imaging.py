import io

import numpy as np
import pytest
from PIL import Image

from core.errors import ImageTooLarge, InvalidImage
from core.imaging import load_image, load_input
from loadtest.images import decompression_bomb_png

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
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and (a.width, a.height, a.format) == (64, 48, "JPEG")
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
