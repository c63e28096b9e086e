"""`chatrex.train.ship`: trained output folders -> package assets (bf16 weights + metadata + held-out scores)."""

from __future__ import annotations

import io
import json

import pytest
import torch

from chatrex.errors import ConfigError
from chatrex.train import ship

torch.set_num_threads(1)


def test_ship_upn_writes_bf16_weights_scores_and_a_note(tmp_path):
    from safetensors.torch import load_file

    from chatrex.train.upn_trainer import train_upn
    from test_train_upn import micro_config

    train_upn(micro_config(steps=2), tmp_path / "run", stream=io.StringIO())
    assets = tmp_path / "assets"
    assets.mkdir()
    meta = ship.ship_upn(tmp_path / "run", assets, eval_scenes=2)
    weights = load_file(str(assets / "tiny_upn.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in weights.values() if v.is_floating_point())
    saved = json.loads((assets / "tiny_upn.json").read_text())
    assert saved == json.loads(json.dumps(meta))
    assert {"default_fine", "default_coarse", "alt_fine", "alt_coarse", "heldout"} <= set(saved["eval"])
    assert saved["eval"]["default_fine"]["images"] == 2
    assert saved["note"].startswith("preliminary")  # a 2-step model misses the bars, and says which


def test_ship_refuses_folders_that_are_not_finished_runs(tmp_path):
    with pytest.raises(ConfigError, match="upn.safetensors"):
        ship.ship_upn(tmp_path, tmp_path)
    with pytest.raises(ConfigError, match="checkpoint.pt"):
        ship.ship_chatrex(tmp_path, tmp_path)
    assert ship.main(["--upn", str(tmp_path), "--to", str(tmp_path)]) == 2
