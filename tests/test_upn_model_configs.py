"""UPNConfig presets/validation and UPN on configs that are not in the fixtures (fp32 and fp64)."""

from __future__ import annotations

import json

import pytest
import torch

from chatrex.errors import ConfigError
from chatrex.upn import UPN, UPNConfig

PROMPT = "coarse_grained_prompt"

OTHER_CONFIGS = {
    # window 7, uneven depths, tiny FFN, 1 encoder layer, 2 points, 50 queries, d_model 64
    "w7": UPNConfig(embed_dim=24, depths=(1, 2, 1, 1), num_heads=(2, 4, 4, 8), window_size=7, d_model=64,
                    d_ffn=64, n_heads=4, n_levels=5, n_points=2, enc_layers=1, dec_layers=2, num_queries=50),
    # two Swin stages + two extra conv levels (the second reads the previous projected level)
    "2stages": UPNConfig(embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=5, d_model=96, d_ffn=128,
                         n_heads=6, n_levels=4, n_points=3, enc_layers=2, dec_layers=1, num_queries=30),
    # fewer levels than stages (the last three), no encoder layer, more queries than tokens
    "3levels": UPNConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(2, 2, 2, 2), window_size=4, d_model=64,
                         d_ffn=128, n_heads=8, n_levels=3, n_points=1, enc_layers=0, dec_layers=1,
                         num_queries=2000),
    "tiny": UPNConfig.from_name("tiny"),
}


def _batch(h: int = 150, w: int = 173) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, h, w, generator=g)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[0, h - 30:] = True  # image 0 padded at the bottom
    mask[1, :, w - 70:] = True  # image 1 padded on the right
    x[mask[:, None].expand_as(x)] = 0.0
    return x, mask


def test_presets():
    large = UPNConfig.from_name("large")
    assert (large.embed_dim, large.depths, large.num_heads, large.window_size) == (192, (2, 2, 18, 2), (6, 12, 24, 48), 12)
    assert (large.d_model, large.d_ffn, large.n_heads, large.n_levels, large.n_points) == (256, 2048, 8, 5, 4)
    assert (large.enc_layers, large.dec_layers, large.num_queries) == (6, 6, 900)
    tiny = UPNConfig.from_name("tiny")
    assert hash(tiny) == hash(UPNConfig.from_name("tiny")) and tiny == UPNConfig.from_dict(tiny.to_dict())
    with pytest.raises(ConfigError, match="preset"):
        UPNConfig.from_name("huge")


def test_small_preset_equals_fixture_config(upn_golden):
    cfg = json.loads((upn_golden / "small_config.json").read_text())
    assert UPNConfig.from_reference_config(cfg) == UPNConfig.from_name("small")


def test_lists_become_tuples():
    cfg = UPNConfig(depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], embed_dim=96)
    assert cfg.depths == (2, 2, 6, 2) and isinstance(cfg.num_heads, tuple)
    hash(cfg)


@pytest.mark.parametrize("bad", [
    dict(depths=(2, 2), num_heads=(1, 2, 4)),  # length mismatch
    dict(embed_dim=30, num_heads=(4, 8, 16, 32)),  # 30 channels / 4 heads
    dict(d_model=250),  # not divisible by 8 heads / 32 groups
    dict(n_points=0),
    dict(window_size=0),
    dict(enc_layers=-1),
    dict(num_queries=2.5),
])
def test_validation(bad):
    with pytest.raises(ConfigError):
        UPNConfig(**bad)


@pytest.mark.parametrize("name", sorted(OTHER_CONFIGS))
def test_other_configs_fp32_matches_fp64(name):
    cfg = OTHER_CONFIGS[name]
    torch.manual_seed(0)
    model = UPN(cfg).eval()
    x, mask = _batch()
    with torch.no_grad():
        out = model(x, mask, PROMPT, return_intermediates=True)
        model64 = UPN(cfg).eval()
        model64.load_state_dict(model.state_dict())
        model64.double()
        out64 = model64(x.double(), mask, PROMPT, topk_indices=out.topk_indices, return_intermediates=True)
    enc = out.encoding
    s = int(enc.spatial_shapes.prod(1).sum())
    k = min(cfg.num_queries, s)
    assert enc.spatial_shapes.shape == (cfg.n_levels, 2) and enc.memory.shape == (2, s, cfg.d_model)
    assert out.pred_logits.shape == (2, k, 1) and out.pred_boxes.shape == (2, k, 4)
    assert out.per_layer_boxes.shape == (cfg.dec_layers, 2, k, 4)
    assert out.dec_references.shape == (cfg.dec_layers + 1, 2, k, 4)
    assert out64.pred_logits.dtype == torch.float64 and out64.encoding.valid_ratios.dtype == torch.float64
    assert torch.isfinite(out.pred_logits).all() and ((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all()
    torch.testing.assert_close(out.pred_logits.double(), out64.pred_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.pred_boxes.double(), out64.pred_boxes, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.encoding.memory.double(), out64.encoding.memory, rtol=1e-4, atol=1e-4)


def test_batch_order_does_not_change_per_image_results():
    """Given one padded tensor, each image's result depends only on its own pixels and mask."""
    torch.manual_seed(0)
    model = UPN(OTHER_CONFIGS["tiny"]).eval()
    x, mask = _batch()
    with torch.no_grad():
        a = model(x, mask, PROMPT)
        b = model(x.flip(0), mask.flip(0), PROMPT)
        single = model(x[1:], mask[1:], PROMPT)
    torch.testing.assert_close(a.pred_boxes, b.pred_boxes.flip(0), rtol=0, atol=1e-5)
    torch.testing.assert_close(a.pred_logits, b.pred_logits.flip(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single.pred_boxes[0], a.pred_boxes[1], rtol=0, atol=1e-5)


def test_padding_leaks_into_backbone_like_the_reference():
    """The same image, padded more, gives different features (Swin ignores the mask): a documented
    reference behaviour we reproduce rather than fix."""
    torch.manual_seed(0)
    model = UPN(OTHER_CONFIGS["tiny"]).eval()
    x, _ = _batch(96, 96)
    img = x[:1]
    padded = torch.nn.functional.pad(img, (0, 40, 0, 0))
    mask = torch.zeros(1, 96, 136, dtype=torch.bool)
    mask[:, :, 96:] = True
    with torch.no_grad():
        f1 = model.encode(img, torch.zeros(1, 96, 96, dtype=torch.bool), return_intermediates=True)
        f2 = model.encode(padded, mask, return_intermediates=True)
    assert not torch.allclose(f1.backbone_features[0], f2.backbone_features[0][..., :24], atol=1e-4)


def test_training_mode_backward():
    """Gradients reach the backbone, the prompts and the shared box head (the tiny model trains)."""
    torch.manual_seed(0)
    model = UPN(OTHER_CONFIGS["w7"]).train()
    x, mask = _batch(96, 112)
    out = model(x, mask, "fine_grained_prompt")
    (out.pred_logits.sum() + out.pred_boxes.sum()).backward()
    tr = model.transformer
    assert model.swin.patch_embed.proj.weight.grad is not None
    assert tr.fine_grained_prompt.weight.grad is not None and tr.coarse_grained_prompt.weight.grad is None
    assert model.bbox_embed[0].layers[0].weight.grad is not None
