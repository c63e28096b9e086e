"""UPN model parity against the `upn_small` fixture (fp32 and fp64), tolerances from its README.

The fixture README's caveat: near-ties in the top-900 selection make slot order fragile (fp32 vs
fp64, 1 vs 2 threads). Everything after the selection is therefore compared while FEEDING the saved
`topk_indices`; the direct (unfed) selection is checked tie-robustly.
"""

from __future__ import annotations

import pytest
import torch

from chatrex.upn import UPNConfig, load_upn

PROMPTS = ("fine_grained_prompt", "coarse_grained_prompt")
FEAT = dict(rtol=1e-4, atol=1e-4)  # feature-like tensors
BOX = dict(rtol=0.0, atol=1e-5)  # normalized boxes


def _close_with_inf(actual: torch.Tensor, expected: torch.Tensor, **tol) -> None:
    """Infinite entries must match exactly (position and sign); finite ones within `tol`."""
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), "inf positions differ"
    assert torch.equal(actual[~finite], expected[~finite])
    torch.testing.assert_close(actual[finite], expected[finite], **tol)


@pytest.fixture(scope="module")
def golden(upn_golden):
    load = lambda name: torch.load(upn_golden / name, weights_only=True)  # noqa: E731
    return {"inputs": load("inputs.pt"), "fp32": load("outputs_fp32.pt"), "fp64": load("outputs_fp64.pt"),
            "state": load("small_state_dict.pt")}


@pytest.fixture(scope="module")
def model32(golden):
    return load_upn(golden["state"], config="small")


@pytest.fixture(scope="module")
def encoding32(model32, golden):
    inp = golden["inputs"]
    with torch.no_grad():
        return model32.encode(inp["tensors"], inp["mask"], return_intermediates=True)


@pytest.fixture(scope="module")
def decoded32(model32, encoding32, golden):
    """Per prompt: (direct output, output fed with the saved topk_indices). The coarse direct output
    comes from a full `forward` call (no feeding anywhere), the rest reuse the shared encoding."""
    out = {}
    inp = golden["inputs"]
    with torch.no_grad():
        for p in PROMPTS:
            fed = golden["fp32"][p]["topk_indices"]
            if p == "coarse_grained_prompt":
                direct = model32(inp["tensors"], inp["mask"], p, return_intermediates=True)
            else:
                direct = model32.decode(encoding32, p, return_intermediates=True)
            out[p] = (direct, model32.decode(encoding32, p, topk_indices=fed, return_intermediates=True))
    return out


# ---------------------------------------------------------------------------------------- shared


def test_backbone_features(encoding32, golden):
    g = golden["fp32"]["shared"]
    feats = encoding32.backbone_features
    assert [list(f.shape) for f in feats] == g["backbone_feat_shapes"]
    sums = torch.stack([f.double().sum() for f in feats])
    torch.testing.assert_close(sums, g["backbone_feat_sums"], rtol=0, atol=5e-2)
    torch.testing.assert_close(feats[3], g["backbone_feat3"], **FEAT)


def test_flattened_inputs_and_geometry(encoding32, golden):
    g = golden["fp32"]["shared"]
    torch.testing.assert_close(encoding32.pos_embeds[0][:, :, ::16, ::16], g["pos_embed_level0_sample"], **FEAT)
    torch.testing.assert_close(encoding32.src_flatten[:, ::128], g["src_flatten_sample"], **FEAT)
    torch.testing.assert_close(encoding32.lvl_pos_embed[:, ::128], g["lvl_pos_embed_sample"], **FEAT)
    assert torch.equal(encoding32.spatial_shapes, g["spatial_shapes"])
    assert torch.equal(encoding32.level_start_index, g["level_start_index"])
    assert torch.equal(encoding32.valid_ratios, g["valid_ratios"])  # nearest-mask quirk, exact
    assert torch.equal(encoding32.mask_flatten, g["mask_flatten"])


def test_encoder_memory_and_proposals(encoding32, golden):
    g = golden["fp32"]["shared"]
    torch.testing.assert_close(encoding32.memory[:, ::128], g["memory_sample"], **FEAT)
    torch.testing.assert_close(encoding32.memory.double().sum(), g["memory_sum"], rtol=0, atol=5e-2)
    _close_with_inf(encoding32.proposals, g["enc_output_proposals_unsig"], **FEAT)
    assert torch.isinf(g["enc_output_proposals_unsig"]).any()  # the +inf path is exercised


# ---------------------------------------------------------------------------------------- per prompt


@pytest.mark.parametrize("prompt", PROMPTS)
def test_selection_scores_and_tie_robust_selection(decoded32, golden, prompt):
    g = golden["fp32"][prompt]
    direct, _ = decoded32[prompt]
    torch.testing.assert_close(direct.enc_topk_logits, g["enc_topk_logits_all"], **FEAT)
    gold_scores = g["enc_topk_logits_all"]
    k = g["topk_indices"].shape[1]
    assert direct.topk_indices.shape == g["topk_indices"].shape
    # k-th selected token's (golden) score == golden k-th best score: sets/orders differ only in ties.
    picked = torch.gather(gold_scores, 1, direct.topk_indices)
    torch.testing.assert_close(picked, gold_scores.topk(k, dim=1).values, rtol=0, atol=1e-4)
    assert (direct.topk_indices != g["topk_indices"]).sum() <= 8


@pytest.mark.parametrize("prompt", PROMPTS)
def test_decoder_parity_fed_selection(decoded32, golden, prompt):
    g = golden["fp32"][prompt]
    _, fed = decoded32[prompt]
    assert torch.equal(fed.topk_indices, g["topk_indices"])
    _close_with_inf(fed.init_refpoint_unsig, g["init_refpoint_unsig"], **FEAT)
    torch.testing.assert_close(fed.dec_references, g["dec_references"], **BOX)
    torch.testing.assert_close(fed.per_layer_boxes, g["per_layer_boxes"], **BOX)
    torch.testing.assert_close(fed.pred_boxes, g["pred_boxes"], **BOX)
    torch.testing.assert_close(fed.hs[-1][:, :32], g["hs_last_first32"], **FEAT)
    torch.testing.assert_close(fed.pred_logits, g["pred_logits"], **FEAT)
    assert torch.equal(fed.per_layer_boxes[-1], fed.pred_boxes)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_direct_outputs_match_where_slots_agree(decoded32, golden, prompt):
    """Without feeding: slots whose token agrees match within the README's swap-affected bounds
    (~1e-3 logit / 5e-5 box); swapped slots must be exchanges of near-tied tokens."""
    g = golden["fp32"][prompt]
    direct, _ = decoded32[prompt]
    same = direct.topk_indices == g["topk_indices"]
    if same.all():
        torch.testing.assert_close(direct.pred_boxes, g["pred_boxes"], **BOX)
        torch.testing.assert_close(direct.pred_logits, g["pred_logits"], **FEAT)
        return
    torch.testing.assert_close(direct.pred_boxes[same], g["pred_boxes"][same], rtol=0, atol=5e-5)
    torch.testing.assert_close(direct.pred_logits[same], g["pred_logits"][same], rtol=0, atol=1e-3)
    scores = g["enc_topk_logits_all"]
    for b, slot in (~same).nonzero().tolist():
        ours, theirs = direct.topk_indices[b, slot], g["topk_indices"][b, slot]
        assert abs(scores[b, ours] - scores[b, theirs]) < 1e-4


def test_coarse_prompt_direct_forward(decoded32, golden):
    """The coarse prompt end to end through `forward` with the model's own top-k: an image whose
    selection equals the golden one matches to the fed tolerances; the output is dict-like."""
    g = golden["fp32"]["coarse_grained_prompt"]
    out, _ = decoded32["coarse_grained_prompt"]
    assert out.pred_logits.shape == (2, 900, 1) and out["pred_boxes"] is out.pred_boxes
    same = out.topk_indices == g["topk_indices"]
    assert same.float().mean() > 0.99
    for b in range(2):
        if same[b].all():
            torch.testing.assert_close(out.pred_boxes[b], g["pred_boxes"][b], **BOX)
            torch.testing.assert_close(out.pred_logits[b], g["pred_logits"][b], **FEAT)


# ---------------------------------------------------------------------------------------- fp64


@pytest.fixture(scope="module")
def fp64_results(golden):
    model = load_upn(golden["state"], config="small", dtype=torch.float64)
    inp = golden["inputs"]
    out = {}
    with torch.no_grad():
        enc = model.encode(inp["tensors"].double(), inp["mask"], return_intermediates=True)
        for p in PROMPTS:
            out[p] = model.decode(enc, p, topk_indices=golden["fp64"][p]["topk_indices"], return_intermediates=True)
    return enc, out


def test_fp64_keeps_everything_in_double(fp64_results):
    enc, out = fp64_results
    for t in (enc.memory, enc.valid_ratios, enc.proposals, enc.pos_embeds[0], enc.lvl_pos_embed,
              out["fine_grained_prompt"].pred_boxes, out["fine_grained_prompt"].dec_references):
        assert t.dtype == torch.float64


@pytest.mark.parametrize("prompt", PROMPTS)
def test_fp64_parity(fp64_results, golden, prompt):
    # Measured max |Δ|: logits 1.1e-6, boxes 6.6e-8 (the reference keeps its geometry in float32).
    g = golden["fp64"][prompt]
    out = fp64_results[1][prompt]
    torch.testing.assert_close(out.pred_logits, g["pred_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.pred_boxes, g["pred_boxes"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out.per_layer_boxes, g["per_layer_boxes"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------- contract


def test_unknown_prompt_type_raises(model32):
    x, mask = torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    for bad in ("universal_prompt", "fine_grained", None):
        with pytest.raises(ValueError, match="prompt_type"):
            model32(x, mask, bad)


def test_bad_inputs_raise(model32):
    with pytest.raises(ValueError, match="pixel_values"):
        model32(torch.zeros(1, 1, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool), "fine_grained_prompt")
    with pytest.raises(ValueError, match="pixel_mask"):
        model32(torch.zeros(1, 3, 64, 64), torch.zeros(1, 64, 64), "fine_grained_prompt")


def test_fewer_tokens_than_queries_keeps_all_tokens(model32):
    # 64×64 → S = 256+64+16+4+1 = 341 < 900: the reference crashes; we keep K = S queries.
    x, mask = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        out = model32(x, mask, "fine_grained_prompt")
    assert out.pred_logits.shape == (1, 341, 1) and out.pred_boxes.shape == (1, 341, 4)
    assert torch.isfinite(out.pred_boxes).all()


def test_fed_topk_longer_than_num_queries_raises(model32, encoding32):
    too_many = torch.zeros(2, 901, dtype=torch.long)
    with pytest.raises(ValueError, match="topk_indices"):
        model32.decode(encoding32, "fine_grained_prompt", topk_indices=too_many)


def test_output_is_dict_like(decoded32):
    direct, _ = decoded32["fine_grained_prompt"]
    assert direct["pred_logits"] is direct.pred_logits
    assert {"pred_logits", "pred_boxes", "topk_indices"} <= set(direct.keys())
    with pytest.raises(KeyError):
        direct["nope"]


def test_state_dict_round_trip_and_alias(model32, golden):
    sd = model32.state_dict()
    assert set(sd) == set(golden["state"]) and len(sd) == 311
    assert model32.bbox_embed[0] is model32.transformer.decoder.bbox_embed[2]
    assert sd["bbox_embed.1.layers.0.weight"].data_ptr() == sd["transformer.decoder.bbox_embed.0.layers.0.weight"].data_ptr()
    n_unique = sum(p.numel() for p in model32.parameters())
    assert n_unique == 5_243_988


def test_large_preset_layout():
    from chatrex.upn import UPN

    with torch.device("meta"):
        model = UPN(UPNConfig.from_name("large"))
    sd = model.state_dict()
    assert len(sd) == 701
    assert sum(p.numel() for p in model.parameters()) == 217_638_460
    assert sum(k.endswith("relative_position_index") for k in sd) == 24
    assert tuple(sd["input_proj.4.0.weight"].shape) == (256, 1536, 3, 3)
    assert tuple(sd["transformer.tgt_embed.weight"].shape) == (900, 256)
