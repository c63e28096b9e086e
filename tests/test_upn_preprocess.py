"""UPN preprocessing vs the reference transform (preprocess.json, inputs.pt)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from chatrex.upn.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    batch_images,
    normalize,
    preprocess_image,
    resize_size,
)


@pytest.fixture(scope="module")
def preprocess_json(upn_golden):
    return json.loads((upn_golden / "preprocess.json").read_text())


@pytest.fixture(scope="module")
def inputs(upn_golden):
    return torch.load(upn_golden / "inputs.pt", weights_only=True)


def _recover_uint8(normalized: torch.Tensor) -> np.ndarray:
    """Invert (x/255 - mean)/std back to the uint8 (H, W, 3) array it came from."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    values = (normalized * std + mean) * 255
    rounded = values.round()
    assert (values - rounded).abs().max() < 1e-3  # really was uint8 data
    return rounded.to(torch.uint8).permute(1, 2, 0).numpy()


def test_size_rule_table(preprocess_json):
    table = preprocess_json["size_rule_WxH_to_hw"]
    assert len(table) >= 9
    for key, expected_hw in table.items():
        w, h = map(int, key.split("x"))
        assert resize_size(w, h) == tuple(expected_hw), key


def test_size_rule_recorded_images(preprocess_json):
    for name, rec in preprocess_json.items():
        if name == "size_rule_WxH_to_hw":
            continue
        assert resize_size(*rec["orig_wh"]) == tuple(rec["resized_hw"]), name


def test_size_rule_small_transform(inputs):
    # inputs.pt was made with RandomResize([256], max_size=400) on 2246x1590 and the rotated 375x500.
    for (oh, ow), resized in zip(inputs["orig_sizes_hw"], inputs["resized_sizes_hw"]):
        assert resize_size(ow, oh, short=256, max_size=400) == tuple(resized)


def test_size_rule_properties():
    assert resize_size(800, 800) == (800, 800)
    assert resize_size(1333, 800) == (800, 1333)          # short side already 800: kept
    assert resize_size(10000, 10) == (1, 1000)              # max-size rule: s = round(1.333) = 1
    assert resize_size(640, 480, short=480, max_size=None) == (480, 640)
    assert resize_size(10000, 10, short=128, max_size=200) == (1, 1000)  # s would round to 0: clamped to 1
    with pytest.raises(ValueError):
        resize_size(0, 10)


def test_normalize_matches_recorded_first_pixels(preprocess_json):
    # normalized_first_pixels[c][j] = channel c, row 0, column j. Recover the uint8 value and check our
    # float32 arithmetic reproduces the recorded float exactly (~1e-6 relative).
    for name, rec in preprocess_json.items():
        if name == "size_rule_WxH_to_hw":
            continue
        first = np.array(rec["normalized_first_pixels"], dtype=np.float64)  # (3, 4)
        u8 = np.round((first * np.array(IMAGENET_STD)[:, None] + np.array(IMAGENET_MEAN)[:, None]) * 255)
        ours = normalize(u8.T[None].astype(np.uint8))  # (1, 4, 3) HWC -> (3, 1, 4)
        np.testing.assert_allclose(ours[:, 0, :].numpy(), first, rtol=1e-6, atol=0)


def test_preprocess_image_reproduces_inputs_pt(inputs):
    # Both images in inputs.pt already have their short side at 256, so with short=256 the transform is
    # a pure normalization: feeding the recovered uint8 image must give the stored tensor exactly.
    for b, (h, w) in enumerate(inputs["resized_sizes_hw"]):
        golden = inputs["tensors"][b, :, :h, :w]
        image = Image.fromarray(_recover_uint8(golden), mode="RGB")
        pixels, size = preprocess_image(image, short=256, max_size=400)
        assert size == (h, w)
        assert pixels.dtype == torch.float32
        torch.testing.assert_close(pixels, golden, rtol=0, atol=1e-6)


def test_batch_images_layout_matches_inputs_pt(inputs):
    crops = [inputs["tensors"][b, :, :h, :w].clone() for b, (h, w) in enumerate(inputs["resized_sizes_hw"])]
    pixel_values, pixel_mask = batch_images(crops)
    assert pixel_values.shape == inputs["tensors"].shape == (2, 3, 341, 361)
    assert torch.equal(pixel_values, inputs["tensors"])
    assert torch.equal(pixel_mask, inputs["mask"])
    # Image 0 padded by 85 rows at the bottom, image 1 by 105 columns on the right.
    assert pixel_mask[0, 256:].all() and not pixel_mask[0, :256].any()
    assert pixel_mask[1, :, 256:].all() and not pixel_mask[1, :, :256].any()


def test_preprocess_resizes_with_pil_bilinear():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    pixels, (h, w) = preprocess_image(image, short=64, max_size=100)
    assert (h, w) == resize_size(90, 120, 64, 100) == (85, 64)
    expected = normalize(np.asarray(image.resize((w, h), Image.BILINEAR)))
    assert torch.equal(pixels, expected)


def test_preprocess_rejects_non_rgb():
    with pytest.raises(ValueError, match="load_image"):
        preprocess_image(Image.new("L", (10, 10)))


def test_batch_images_single_and_errors():
    t = torch.randn(3, 5, 7)
    pv, pm = batch_images([t])
    assert torch.equal(pv[0], t) and not pm.any()
    with pytest.raises(ValueError):
        batch_images([])
    with pytest.raises(ValueError):
        batch_images([t, torch.randn(1, 5, 7)])
