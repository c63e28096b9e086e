"""`load_upn` / `save_upn`: strict loading of reference-layout weights and the key report."""

from __future__ import annotations

import pytest
import torch

from chatrex.errors import CheckpointError, ConfigError, MissingWeightsError
from chatrex.upn import UPN, UPNConfig, load_upn
from chatrex.upn.checkpoint import read_state_dict, save_upn


@pytest.fixture(scope="module")
def state(upn_golden):
    return torch.load(upn_golden / "small_state_dict.pt", weights_only=True)


def _same_weights(model: UPN, state: dict) -> bool:
    sd = model.state_dict()
    return set(sd) == set(state) and all(torch.equal(sd[k], v) for k, v in state.items())


def test_load_from_path_and_dict(upn_golden, state):
    from_path = load_upn(upn_golden / "small_state_dict.pt", config="small")
    from_dict = load_upn(state, config=UPNConfig.from_name("small"))
    for model in (from_path, from_dict):
        assert isinstance(model, UPN) and not model.training
        assert _same_weights(model, state)
        assert model.transformer.level_embed.dtype == torch.float32
    # Loading copies: the caller's dict is not aliased by the model.
    assert from_dict.transformer.level_embed.data_ptr() != state["transformer.level_embed"].data_ptr()


def test_reference_pth_layout_and_module_prefix(tmp_path, state):
    path = tmp_path / "upn.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)
    model = load_upn(str(path), config="small", dtype=torch.float64)
    assert model.transformer.tgt_embed.weight.dtype == torch.float64
    torch.testing.assert_close(model.transformer.level_embed, state["transformer.level_embed"].double())


def test_safetensors_round_trip(tmp_path, state):
    model = load_upn(state, config="small")
    path = tmp_path / "upn.safetensors"
    save_upn(model, path)
    assert _same_weights(load_upn(path, config="small"), state)
    pth = tmp_path / "upn.pth"
    save_upn(model, pth)
    assert set(torch.load(pth, weights_only=True)["model"]) == set(state)
    assert _same_weights(load_upn(pth, config="small"), state)


def test_missing_key_is_reported(state):
    bad = {k: v for k, v in state.items() if k != "transformer.fine_grained_prompt.weight"}
    with pytest.raises(CheckpointError) as err:
        load_upn(bad, config="small")
    msg = str(err.value)
    assert "missing (1)" in msg and "transformer.fine_grained_prompt.weight" in msg
    assert "unexpected" not in msg and "incomplete" in msg


def test_extra_key_is_reported(state):
    bad = dict(state, **{"transformer.label_enc.weight": torch.zeros(3, 256)})
    with pytest.raises(CheckpointError, match=r"unexpected \(1\):\n\s+transformer\.label_enc\.weight"):
        load_upn(bad, config="small")


def test_wrong_shape_is_reported(state):
    bad = dict(state, **{"transformer.tgt_embed.weight": torch.zeros(300, 256)})
    with pytest.raises(CheckpointError) as err:
        load_upn(bad, config="small")
    assert "transformer.tgt_embed.weight: checkpoint (300, 256) vs model (900, 256)" in str(err.value)


def test_wrong_preset_is_grouped_and_hinted(state):
    with pytest.raises(CheckpointError) as err:
        load_upn(state, config="large")
    msg = str(err.value)
    assert "pass config='small'" in msg
    assert "(24 keys)" in msg or "more" in msg  # grouped by pattern, truncated
    assert len(msg.splitlines()) < 60


def test_foreign_prefix_is_hinted(state):
    with pytest.raises(CheckpointError, match="every key starts with 'upn.'"):
        load_upn({f"upn.{k}": v for k, v in state.items()}, config="small")


def test_benign_gaps_are_filled(state):
    """Deterministic index buffers and duplicate aliases may be absent; parameters may not."""
    no_buffers = {k: v for k, v in state.items() if not k.endswith("relative_position_index")}
    assert len(no_buffers) == len(state) - 8
    assert _same_weights(load_upn(no_buffers, config="small"), state)
    one_alias = {k: v for k, v in state.items() if not k.startswith("transformer.decoder.bbox_embed.")}
    assert _same_weights(load_upn(one_alias, config="small"), state)
    no_box = {k: v for k, v in one_alias.items() if not k.startswith("bbox_embed.")}
    with pytest.raises(CheckpointError, match="missing"):
        load_upn(no_box, config="small")


def test_inconsistent_aliases_or_index_raise(state):
    bad = dict(state)
    bad["bbox_embed.1.layers.0.weight"] = bad["bbox_embed.1.layers.0.weight"] + 1
    with pytest.raises(CheckpointError, match="aliases"):
        load_upn(bad, config="small")
    key = "backbone.model.backbone.layers.0.blocks.0.attn.relative_position_index"
    bad = dict(state, **{key: state[key].flip(0)})
    with pytest.raises(CheckpointError, match="relative-position index"):
        load_upn(bad, config="small")


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(MissingWeightsError):
        load_upn(tmp_path / "nope.pth", config="small")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_upn(junk, config="small")
    with pytest.raises(CheckpointError, match="non-tensor"):
        read_state_dict({"a": torch.zeros(1), "epoch": 3})
    with pytest.raises(ConfigError):
        load_upn({}, config="gigantic")
