"""roi_align: torchvision fixture cases, an independent per-sample formula, input forms and edge cases."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from chatrex.ops.roi_align import roi_align, roi_align_mean

# the package re-exports the function under the module's name, so fetch the module itself
roi_align_module = importlib.import_module("chatrex.ops.roi_align")


@pytest.fixture(scope="module")
def roi_fixture(upn_golden):
    tensors = load_file(str(upn_golden / "roi_align_fixture.safetensors"))
    meta = json.loads((upn_golden / "roi_align_fixture.json").read_text())
    return tensors, meta


def _configs():
    return [(sr, al) for sr in (-1, 2) for al in (0, 1)]


@pytest.mark.parametrize("sr,aligned", _configs())
def test_matches_torchvision_fixture(roi_fixture, sr, aligned):
    tensors, meta = roi_fixture
    assert len(meta["cases"]) == 7
    for case in meta["cases"]:
        cid = case["id"]
        x, rois = tensors[f"{cid}.input"], tensors[f"{cid}.rois"]
        out = roi_align(x, rois, 7, spatial_scale=0.25, sampling_ratio=sr, aligned=bool(aligned))
        exp = tensors[f"{cid}.out_sr{sr}_aligned{aligned}"]
        assert out.shape == exp.shape and out.dtype == torch.float32
        torch.testing.assert_close(out, exp, atol=2e-4, rtol=0, msg=f"{cid} fp32")
        out64 = roi_align(x.double(), rois.double(), (7, 7), 0.25, sr, bool(aligned))
        exp64 = tensors[f"{cid}.out64_sr{sr}_aligned{aligned}"]
        torch.testing.assert_close(out64, exp64, atol=1e-10, rtol=0, msg=f"{cid} fp64")
        # RoI kinds the fixture records as all-zero are exactly zero here too
        kinds = case["roi_kinds"]
        for kind in case["outputs"][f"sr{sr}_aligned{aligned}"]["all_zero_roi_kinds"]:
            assert out64[kinds.index(kind)].abs().max() == 0, f"{cid}: {kind} should give zeros"


def test_list_of_boxes_equals_rois_tensor(roi_fixture):
    tensors, _ = roi_fixture
    x, rois = tensors["case_01.input"], tensors["case_01.rois"]  # N = 2
    per_image = [rois[rois[:, 0] == b, 1:] for b in range(2)]
    order = torch.cat([torch.nonzero(rois[:, 0] == b).flatten() for b in range(2)])
    from_list = roi_align(x, per_image, 7, 0.25)
    from_rois = roi_align(x, rois, 7, 0.25)
    torch.testing.assert_close(from_list, from_rois[order], atol=0, rtol=0)


# ---------------------------------------------------------------- independent per-sample formula
def _slow_roi_align(x, rois, oh, ow, scale, sr, aligned):
    """torchvision's algorithm, one sample at a time, in float64 Python arithmetic."""
    n, c, h, w = x.shape
    v = x.double()
    out = torch.zeros(len(rois), c, oh, ow, dtype=torch.float64)
    off = 0.5 if aligned else 0.0
    for r, (b, x1, y1, x2, y2) in enumerate(rois.double().tolist()):
        sx, sy, ex, ey = x1 * scale - off, y1 * scale - off, x2 * scale - off, y2 * scale - off
        rw, rh = ex - sx, ey - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / oh, rw / ow
        gh = sr if sr > 0 else math.ceil(rh / oh)
        gw = sr if sr > 0 else math.ceil(rw / ow)
        count = max(gh * gw, 1)
        for ph in range(oh):
            for pw in range(ow):
                acc = torch.zeros(c, dtype=torch.float64)
                for iy in range(max(gh, 0)):
                    yy = sy + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(max(gw, 0)):
                        xx = sx + pw * bw + (ix + 0.5) * bw / gw
                        if yy < -1 or yy > h or xx < -1 or xx > w:
                            continue
                        y, xq = max(yy, 0.0), max(xx, 0.0)
                        yl, xl = int(y), int(xq)
                        yh, xh = yl + 1, xl + 1
                        if yl >= h - 1:
                            yl = yh = h - 1
                            y = float(yl)
                        if xl >= w - 1:
                            xl = xh = w - 1
                            xq = float(xl)
                        ly, lx = y - yl, xq - xl
                        bb = int(b)
                        acc += ((1 - ly) * (1 - lx) * v[bb, :, yl, xl] + (1 - ly) * lx * v[bb, :, yl, xh]
                                + ly * (1 - lx) * v[bb, :, yh, xl] + ly * lx * v[bb, :, yh, xh])
                out[r, :, ph, pw] = acc / count
    return out


@pytest.mark.parametrize("sr,aligned", _configs())
def test_non_square_output_and_other_scale_match_slow_formula(sr, aligned):
    gen = torch.Generator().manual_seed(7 + sr + 3 * aligned)
    x = torch.randn(2, 3, 9, 13, generator=gen, dtype=torch.float64)
    xy = torch.rand(12, 2, generator=gen, dtype=torch.float64) * 30 - 4  # image px; scale 0.5 -> map px
    wh = torch.rand(12, 2, generator=gen, dtype=torch.float64) * 14
    rois = torch.cat([torch.randint(0, 2, (12, 1), generator=gen).double(), xy, xy + wh], dim=1)
    rois[0, 1:] = torch.tensor([0.0, 0.0, 26.0, 18.0])  # the whole map
    rois[1, 1:] = torch.tensor([5.0, 5.0, 5.0, 5.0])  # a point
    out = roi_align(x, rois, (3, 5), spatial_scale=0.5, sampling_ratio=sr, aligned=bool(aligned))
    assert out.shape == (12, 3, 3, 5)
    torch.testing.assert_close(out, _slow_roi_align(x, rois, 3, 5, 0.5, sr, bool(aligned)), atol=1e-12, rtol=0)


def test_channel_chunking_gives_same_result(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 10, 20, 20, generator=gen)
    rois = torch.tensor([[0, 0.0, 0.0, 80.0, 80.0], [0, 10.0, 12.0, 50.0, 33.0]])
    full = roi_align(x, rois, 7, 0.25)
    monkeypatch.setattr(roi_align_module, "_MAX_CROP_ELEMENTS", 1000)  # -> a couple of channels per chunk
    torch.testing.assert_close(roi_align(x, rois, 7, 0.25), full, atol=0, rtol=0)


def test_small_and_large_crop_paths_agree(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 30, 41, generator=gen, dtype=torch.float64)
    rois = torch.tensor([[0, 0.0, 0.0, 164.0, 120.0], [1, 10.0, 12.0, 50.0, 33.0], [1, 3.0, 7.0, 4.0, 7.5]],
                        dtype=torch.float64)
    monkeypatch.setattr(roi_align_module, "_SMALL_CROP_ELEMENTS", 0)  # every crop takes the batched path
    batched = roi_align(x, rois, (7, 6), 0.25, 3, True)
    monkeypatch.setattr(roi_align_module, "_SMALL_CROP_ELEMENTS", 10**9)  # every crop takes the copy path
    copied = roi_align(x, rois, (7, 6), 0.25, 3, True)
    torch.testing.assert_close(batched, copied, atol=1e-12, rtol=0)
    torch.testing.assert_close(copied, _slow_roi_align(x, rois, 7, 6, 0.25, 3, True), atol=1e-12, rtol=0)


def test_empty_boxes():
    x = torch.randn(2, 4, 8, 8)
    assert roi_align(x, torch.zeros(0, 5), 7).shape == (0, 4, 7, 7)
    out = roi_align(x, [torch.zeros(0, 4), torch.zeros(0, 4)], (2, 3))
    assert out.shape == (0, 4, 2, 3) and out.dtype == x.dtype


def test_one_axis_inverted_roi_raises_like_torchvision():
    x = torch.randn(1, 1, 40, 40)
    # aligned=True, adaptive grid: width -> ceil(-10/7) = -1 samples, height positive -> torchvision fails
    rois = torch.tensor([[0.0, 100.0, 10.0, 60.0, 90.0]])
    with pytest.raises(ValueError, match="inverted"):
        roi_align(x, rois, 7, 0.25, sampling_ratio=-1, aligned=True)
    # both axes inverted by > 7 px: grid -1 x -1 -> zeros, no error (as torchvision)
    both = torch.tensor([[0.0, 100.0, 100.0, 60.0, 60.0]])
    assert roi_align(x, both, 7, 0.25, aligned=True).abs().max() == 0


def test_rejects_bad_shapes_and_batch_index():
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError):
        roi_align(x, torch.zeros(3, 4), 7)
    with pytest.raises(ValueError, match="batch"):
        roi_align(x, torch.tensor([[1.0, 0, 0, 4, 4]]), 7)
    with pytest.raises(ValueError):
        roi_align(x[0], torch.zeros(1, 5), 7)


def test_gradient_wrt_input():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0.0, 1.0, 2.0, 20.0, 18.0], [0.0, -3.0, 5.0, 9.0, 30.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_align(t, rois, 3, 0.25), (x,))


@pytest.mark.parametrize("sr,aligned", _configs())
def test_roi_align_mean_equals_mean_of_bins(roi_fixture, sr, aligned):
    tensors, _ = roi_fixture
    for cid in ("case_01", "case_03", "case_06"):
        x, rois = tensors[f"{cid}.input"].double(), tensors[f"{cid}.rois"].double()
        mean = roi_align_mean(x, rois, 7, 0.25, sr, bool(aligned))
        assert mean.shape == (rois.shape[0], x.shape[1])
        exp = tensors[f"{cid}.out64_sr{sr}_aligned{aligned}"].mean((2, 3))
        torch.testing.assert_close(mean, exp, atol=1e-10, rtol=0)
    assert roi_align_mean(x, torch.zeros(0, 5), 7).shape == (0, x.shape[1])
