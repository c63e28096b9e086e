"""chatrex.images.load_image: every input kind and mode → RGB, or a typed error that says what to do."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from chatrex.errors import InvalidImageError
from chatrex.images import load_image


def _exif_rotated_jpeg(path, w=40, h=20, orientation=6):
    """A w×h JPEG whose EXIF says 'rotate 90° CW to display' (orientation 6) → shown as h×w."""
    img = Image.new("RGB", (w, h), (200, 30, 30))
    img.paste((20, 20, 220), (0, 0, w // 2, h))  # left half blue in the stored frame
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif.tobytes(), quality=95)
    return path


def test_path_and_pil_and_array_agree(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    for source in (path, str(path), Image.fromarray(arr), arr):
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (17, 12)
        assert np.array_equal(np.asarray(out), arr)


def test_pil_input_not_modified():
    src = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    out = load_image(src)
    assert out is not src and src.mode == "RGBA" and out.mode == "RGB"


def test_exif_orientation_applied(tmp_path):
    path = _exif_rotated_jpeg(tmp_path / "rot.jpg")
    assert Image.open(path).size == (40, 20)
    out = load_image(path)
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[2, 10], np.asarray(out)[37, 10]
    # Stored left half (blue) ends up on top after a 90° clockwise display rotation.
    assert top[2] > 150 and top[0] < 100
    assert bottom[0] > 150 and bottom[2] < 100


def test_rgba_composited_on_white():
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = (255, 0, 0, 255)      # opaque red
    arr[0, 1] = (255, 0, 0, 0)        # fully transparent red → white
    arr[1, 0] = (0, 0, 0, 128)        # half transparent black → mid grey
    out = np.asarray(load_image(Image.fromarray(arr, mode="RGBA")))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)
    assert 120 <= out[1, 0, 0] <= 135
    assert np.array_equal(np.asarray(load_image(arr)), out)  # same rule for (H, W, 4) arrays


def test_16bit_png_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.shape == (1, 4, 3)
    assert list(out[0, :, 0]) == [0, 1, 128, 255]
    assert list(np.asarray(load_image(values))[0, :, 1]) == [0, 1, 128, 255]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "1", "CMYK", "I", "F", "YCbCr", "I;16"])
def test_modes_become_rgb(mode):
    out = load_image(Image.new(mode, (5, 3)))
    assert out.mode == "RGB" and out.size == (5, 3)


def test_cmyk_white_and_palette_transparency():
    assert tuple(np.asarray(load_image(Image.new("CMYK", (1, 1), (0, 0, 0, 0))))[0, 0]) == (255, 255, 255)
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    out = np.asarray(load_image(pal))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (0, 255, 0)


def test_array_dtypes():
    assert np.asarray(load_image(np.ones((2, 3), dtype=bool)))[0, 0, 0] == 255
    assert np.asarray(load_image(np.full((2, 3, 3), 0.5)))[0, 0, 0] == 128
    assert load_image(np.zeros((2, 3, 1), dtype=np.uint8)).size == (3, 2)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.zeros((3, 4, 5), dtype=np.uint8), "shape"),
        (np.zeros((1, 3, 8, 8), dtype=np.uint8), "shape"),
        (np.zeros((4, 4, 3), dtype=np.int64), "dtype"),
        (np.full((4, 4, 3), 2.0), r"\[0, 1\]"),
        (np.full((4, 4), np.nan), r"\[0, 1\]"),
        (np.zeros((0, 5, 3), dtype=np.uint8), "empty"),
    ],
)
def test_bad_arrays(array, match):
    with pytest.raises(InvalidImageError, match=match):
        load_image(array)


def test_missing_corrupt_and_folder(tmp_path):
    with pytest.raises(InvalidImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(InvalidImageError, match="cannot decode"):
        load_image(bad)
    good = tmp_path / "good.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InvalidImageError):
        load_image(truncated)
    with pytest.raises(InvalidImageError, match="folder"):
        load_image(tmp_path)
    with pytest.raises(InvalidImageError, match="file path"):
        load_image(12345)


def test_pixel_limit(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(path)
    with pytest.raises(InvalidImageError, match="limit"):
        load_image(path, max_pixels=50_000)
    with pytest.raises(InvalidImageError, match="limit"):
        load_image(np.zeros((300, 200), dtype=np.uint8), max_pixels=50_000)
    assert load_image(path, max_pixels=60_000).size == (300, 200)


def test_zero_size_pil():
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(Image.new("RGB", (0, 0)))
