"""Multi-scale deformable attention: fixture parity, both cores equal, module vs a scalar formula."""

from __future__ import annotations

import math

import pytest
import torch

from chatrex.ops import msda
from chatrex.ops.msda import (
    MultiScaleDeformableAttention,
    get_msda_implementation,
    ms_deform_attn_core,
    ms_deform_attn_core_pytorch,
    ms_deform_attn_core_reference,
    register_msda_implementation,
    set_msda_implementation,
)

CORES = {"pytorch": ms_deform_attn_core_pytorch, "reference": ms_deform_attn_core_reference}


# ----------------------------------------------------------------------------------------------
# Independent slow formula: out = Σ_l Σ_p a · bilinear(V_l, x·W − 0.5, y·H − 0.5), zeros outside.
# ----------------------------------------------------------------------------------------------
def _bilinear(vmap: list, h: int, w: int, px: float, py: float, dim: int) -> list:
    """vmap[y][x] is a list of `dim` floats; returns the bilinear sample at pixel (px, py)."""
    x0, y0 = math.floor(px), math.floor(py)
    out = [0.0] * dim
    for yy, wy in ((y0, 1.0 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1.0 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                for c in range(dim):
                    out[c] += wy * wx * vmap[yy][xx][c]
    return out


def slow_core(value, shapes, locs, weights) -> torch.Tensor:
    n, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = locs.shape
    v, sl, a = value.double().tolist(), locs.double().tolist(), weights.double().tolist()
    starts = [0]
    for h, w in shapes.tolist():
        starts.append(starts[-1] + h * w)
    out = torch.zeros(n, lq, m * d, dtype=torch.float64)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                acc = [0.0] * d
                for lvl, (h, w) in enumerate(shapes.tolist()):
                    vmap = [[v[b][starts[lvl] + y * w + x][head] for x in range(w)] for y in range(h)]
                    for p in range(n_points):
                        x, y = sl[b][q][head][lvl][p]
                        s = _bilinear(vmap, h, w, x * w - 0.5, y * h - 0.5, d)
                        for c in range(d):
                            acc[c] += a[b][q][head][lvl][p] * s[c]
                out[b, q, head * d : (head + 1) * d] = torch.tensor(acc, dtype=torch.float64)
    return out


def _random_case(gen, n=2, lq=7, m=2, d=3, shapes=((5, 7), (3, 2), (1, 4)), p=3, dtype=torch.float64):
    spatial = torch.tensor(shapes, dtype=torch.int64)
    s = int((spatial[:, 0] * spatial[:, 1]).sum())
    value = torch.randn(n, s, m, d, generator=gen, dtype=dtype)
    # locations in [-0.3, 1.3]: many points partly or fully outside the map
    locs = (torch.rand(n, lq, m, len(shapes), p, 2, generator=gen, dtype=dtype) * 1.6 - 0.3)
    w = torch.randn(n, lq, m, len(shapes) * p, generator=gen, dtype=dtype).softmax(-1)
    return value, spatial, locs, w.view(n, lq, m, len(shapes), p)


@pytest.fixture(scope="module")
def msda_fixture(upn_golden):
    return torch.load(upn_golden / "msda_core.pt", weights_only=True)


@pytest.fixture(autouse=True)
def _restore_switch():
    before = get_msda_implementation()
    yield
    set_msda_implementation(before)


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", sorted(CORES))
def test_core_matches_fixture_fp32_and_fp64(msda_fixture, impl):
    f, core = msda_fixture, CORES[impl]
    out = core(f["value"], f["spatial_shapes"], f["sampling_locations"], f["attention_weights"])
    assert out.dtype == torch.float32 and out.shape == f["output"].shape
    torch.testing.assert_close(out, f["output"], atol=1e-6, rtol=0)
    args64 = [f["value"].double(), f["spatial_shapes"], f["sampling_locations"].double(), f["attention_weights"].double()]
    out64 = core(*args64)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, f["output_fp64"], atol=1e-12, rtol=0)


def test_fixture_against_slow_formula(msda_fixture):
    f = msda_fixture
    ref = slow_core(f["value"], f["spatial_shapes"], f["sampling_locations"], f["attention_weights"])
    torch.testing.assert_close(f["output_fp64"], ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cores_equal_slow_formula_on_random_cases(seed):
    gen = torch.Generator().manual_seed(seed)
    value, spatial, locs, w = _random_case(gen)
    ref = slow_core(value, spatial, locs, w)
    for impl, core in CORES.items():
        torch.testing.assert_close(core(value, spatial, locs, w), ref, atol=1e-12, rtol=0, msg=impl)


def test_default_core_chunking_equals_reference():
    gen = torch.Generator().manual_seed(5)
    value, spatial, locs, w = _random_case(gen, n=2, lq=53, m=4, d=8, p=4, dtype=torch.float32)
    ref = ms_deform_attn_core_reference(value, spatial, locs, w)
    for budget in (1, 100, 2**25):  # 1 -> one query per chunk, 2**25 -> a single chunk
        out = ms_deform_attn_core_pytorch(value, spatial, locs, w, max_sample_elements=budget)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_core_gradients_equal_between_implementations():
    gen = torch.Generator().manual_seed(3)
    inputs = _random_case(gen, lq=4)
    grads = {}
    for impl, core in CORES.items():
        value, locs, w = (t.clone().requires_grad_(True) for t in (inputs[0], inputs[2], inputs[3]))
        core(value, inputs[1], locs, w).pow(2).sum().backward()
        grads[impl] = (value.grad, locs.grad, w.grad)
    for a, b in zip(grads["pytorch"], grads["reference"]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_switch_selects_implementation_and_rejects_unknown():
    calls = []

    def spy(value, spatial_shapes, locs, weights):
        calls.append(value.shape)
        return ms_deform_attn_core_reference(value, spatial_shapes, locs, weights)

    register_msda_implementation("spy", spy)
    set_msda_implementation("spy")
    assert get_msda_implementation() == "spy"
    gen = torch.Generator().manual_seed(0)
    value, spatial, locs, w = _random_case(gen)
    ms_deform_attn_core(value, spatial, locs, w)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="unknown MSDA implementation"):
        set_msda_implementation("cuda-kernel-that-does-not-exist")
    msda._IMPLEMENTATIONS.pop("spy")


def test_core_rejects_mismatched_shapes():
    gen = torch.Generator().manual_seed(0)
    value, spatial, locs, w = _random_case(gen)
    with pytest.raises(ValueError, match="tokens"):
        ms_deform_attn_core(value[:, :-1], spatial, locs, w)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn_core(value, spatial, locs, w[..., :-1])


# ----------------------------------------------------------------------------------------------
def _slow_module(module: MultiScaleDeformableAttention, query, ref, value, spatial, mask) -> torch.Tensor:
    """The module written out by hand: projections, softmax, location rule, slow core."""
    n, lq, _ = query.shape
    m, n_levels, p = module.n_heads, module.n_levels, module.n_points
    v = value @ module.value_proj.weight.T + module.value_proj.bias
    if mask is not None:
        v = v * (~mask)[..., None].to(v.dtype)
    v = v.view(n, -1, m, module.d_model // m)
    off = (query @ module.sampling_offsets.weight.T + module.sampling_offsets.bias).view(n, lq, m, n_levels, p, 2)
    logits = (query @ module.attention_weights.weight.T + module.attention_weights.bias).view(n, lq, m, -1)
    a = torch.exp(logits - logits.amax(-1, keepdim=True))
    a = (a / a.sum(-1, keepdim=True)).view(n, lq, m, n_levels, p)
    locs = torch.empty_like(off)
    for lvl, (h, w) in enumerate(spatial.tolist()):
        if ref.shape[-1] == 2:
            locs[:, :, :, lvl, :, 0] = ref[:, :, None, lvl, None, 0] + off[:, :, :, lvl, :, 0] / w
            locs[:, :, :, lvl, :, 1] = ref[:, :, None, lvl, None, 1] + off[:, :, :, lvl, :, 1] / h
        else:
            for k in range(2):
                locs[:, :, :, lvl, :, k] = (
                    ref[:, :, None, lvl, None, k] + off[:, :, :, lvl, :, k] / p * ref[:, :, None, lvl, None, k + 2] * 0.5
                )
    core = slow_core(v, spatial, locs, a)
    return core @ module.output_proj.weight.T + module.output_proj.bias


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_forward_matches_slow_formula(ref_dim):
    gen = torch.Generator().manual_seed(10 + ref_dim)
    torch.manual_seed(ref_dim)
    d_model, n_levels, n_heads, n_points = 8, 2, 2, 3
    module = MultiScaleDeformableAttention(d_model, n_levels, n_heads, n_points).double()
    with torch.no_grad():  # non-trivial weights everywhere (the reference init zeroes some)
        for prm in module.parameters():
            prm.copy_(torch.randn(prm.shape, generator=gen, dtype=torch.float64) * 0.5)
    spatial = torch.tensor([[4, 5], [2, 3]])
    n, lq, s = 2, 5, 26
    query = torch.randn(n, lq, d_model, generator=gen, dtype=torch.float64)
    value = torch.randn(n, s, d_model, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, s, generator=gen) < 0.3
    if ref_dim == 2:
        ref = torch.rand(n, lq, n_levels, 2, generator=gen, dtype=torch.float64)
    else:
        ref = torch.cat([torch.rand(n, lq, n_levels, 2, generator=gen, dtype=torch.float64),
                         torch.rand(n, lq, n_levels, 2, generator=gen, dtype=torch.float64) * 0.6], dim=-1)
    expected = _slow_module(module, query, ref, value, spatial, mask)
    for impl in ("pytorch", "reference"):
        set_msda_implementation(impl)
        out = module(query, ref, value, spatial, padding_mask=mask)
        assert out.shape == (n, lq, d_model) and out.dtype == torch.float64
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=0, msg=impl)
    # the mask matters: without it the output changes
    assert not torch.allclose(module(query, ref, value, spatial), out)


def test_module_parameter_names_shapes_and_init():
    module = MultiScaleDeformableAttention(d_model=32, n_levels=5, n_heads=8, n_points=4)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (320, 32), "sampling_offsets.bias": (320,),
        "attention_weights.weight": (160, 32), "attention_weights.bias": (160,),
        "value_proj.weight": (32, 32), "value_proj.bias": (32,),
        "output_proj.weight": (32, 32), "output_proj.bias": (32,),
    }
    assert module.sampling_offsets.weight.abs().sum() == 0
    assert module.attention_weights.weight.abs().sum() == 0 and module.attention_weights.bias.abs().sum() == 0
    assert module.value_proj.bias.abs().sum() == 0 and module.output_proj.bias.abs().sum() == 0
    bias = module.sampling_offsets.bias.view(8, 5, 4, 2)
    # head 0 points right (1, 0), head 1 diagonal (1, 1), head 2 up (0, 1) ..., scaled by point index 1..4
    torch.testing.assert_close(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[1, 3, 1], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(bias[2, 4, 2], torch.tensor([0.0, 3.0]), atol=1e-6, rtol=0)
    assert torch.equal(bias[:, 0], bias[:, 4])  # same for every level
    assert bias.abs().amax(-1)[:, :, 0].eq(1).all()  # the larger component is 1 at point 1


def test_module_rejects_bad_config_and_refs():
    from chatrex.errors import ConfigError

    with pytest.raises(ConfigError):
        MultiScaleDeformableAttention(d_model=30, n_heads=8)
    module = MultiScaleDeformableAttention(d_model=16, n_levels=1, n_heads=2, n_points=2)
    spatial = torch.tensor([[2, 2]])
    with pytest.raises(ValueError, match="last dim"):
        module(torch.zeros(1, 3, 16), torch.zeros(1, 3, 1, 3), torch.zeros(1, 4, 16), spatial)


def test_reduced_precision_samples_in_float32():
    # bf16 sampling locations carry ~3 digits (a pixel off on wide levels) and CPU bf16 grid_sample gave
    # NaN: the dispatcher samples in float32 and returns the caller's dtype.
    gen = torch.Generator().manual_seed(7)
    value, spatial, locs, w = _random_case(gen, n=2, lq=40, m=2, d=8, p=4, dtype=torch.float32)
    ref = ms_deform_attn_core(value, spatial, locs, w)
    out = ms_deform_attn_core(value.bfloat16(), spatial, locs.bfloat16(), w.bfloat16())
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)
