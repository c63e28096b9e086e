"""`chatrex propose` end to end, in-process, with a tiny random UPN checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from chatrex.cli import expand_images, main, unique_stems

FAST = ["--short", "96", "--max-size", "160", "--device", "cpu", "--config", "tiny"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from chatrex.upn.config import UPNConfig
    from chatrex.upn.model import UPN

    torch.manual_seed(0)
    model = UPN(UPNConfig.from_name("tiny"))
    with torch.no_grad():  # scores spread around 0.5 so some boxes pass the 0.3 threshold
        model.transformer.fine_grained_prompt.weight.mul_(0.05)
        model.transformer.coarse_grained_prompt.weight.mul_(0.05)
    path = tmp_path_factory.mktemp("ckpt") / "upn_tiny.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def _image(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def images(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    _image(folder / "a.png", 120, 80, 0)
    (folder / "notes.txt").write_text("not an image")
    other = tmp_path / "other"
    other.mkdir()
    _image(other / "b.jpg", 70, 110, 1)
    _image(other / "a.png", 64, 64, 2)  # same stem as folder/a.png: must not overwrite it
    return folder, str(other / "*.*")


def test_propose_folder_and_glob(tiny_ckpt, images, tmp_path, capsys):
    folder, pattern = images
    out = tmp_path / "out"
    rc = main(["propose", str(folder), pattern, "--checkpoint", str(tiny_ckpt), "--out", str(out),
               "--prompt", "coarse", "--batch-size", "2", *FAST])
    assert rc == 0, capsys.readouterr().err
    written = sorted(p.name for p in out.iterdir())
    assert written == ["a.json", "a_2.json", "a_2_proposals.png", "a_proposals.png", "b.json", "b_proposals.png"]
    expected_sizes = {"a": (120, 80), "a_2": (64, 64), "b": (70, 110)}
    for stem, (w, h) in expected_sizes.items():
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["image_size"] == [w, h] and record["prompt_type"] == "coarse_grained_prompt"
        assert record["box_format"] == "xyxy" and record["source"].endswith((".png", ".jpg"))
        assert len(record["boxes"]) == len(record["scores"]) > 0
        assert all(s >= 0.3 for s in record["scores"])
        assert all(0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h for x1, y1, x2, y2 in record["boxes"])
        with Image.open(out / f"{stem}_proposals.png") as overlay:
            assert overlay.size == (w, h)
    assert json.loads((out / "a.json").read_text())["source"] == str(folder / "a.png")
    assert capsys.readouterr().out.count("proposals ->") == 3


def test_missing_checkpoint_names_the_file(images, tmp_path, capsys, monkeypatch):
    folder, _ = images
    from chatrex import embedded

    monkeypatch.setattr(embedded, "upn", lambda: None)  # a build that ships no embedded UPN
    rc = main(["propose", str(folder), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0
    assert "upn_large.pth" in err and "--checkpoint" in err
    assert "Traceback" not in err and err.count("\n") == 1
    rc = main(["propose", str(folder), "--checkpoint", str(tmp_path / "nope.pth")])
    err = capsys.readouterr().err
    assert rc != 0 and "not found" in err and "upn_large.pth" in err


def test_unreadable_image_reported_others_written(tiny_ckpt, tmp_path, capsys):
    good = _image(tmp_path / "good.png", 50, 40, 3)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"garbage bytes, not a jpeg")
    out = tmp_path / "out"
    rc = main(["propose", str(bad), str(good), str(tmp_path / "missing.png"), "--checkpoint", str(tiny_ckpt),
               "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 1
    assert "bad.jpg" in err and "cannot decode" in err and "missing.png" in err and "not found" in err
    assert "2 of 3 images failed" in err and "Traceback" not in err
    assert (out / "good.json").is_file() and not (out / "bad.json").exists()


def test_wrong_config_for_checkpoint_is_one_line(tiny_ckpt, images, tmp_path, capsys):
    folder, _ = images
    rc = main(["propose", str(folder), "--checkpoint", str(tiny_ckpt), "--config", "small", "--device", "cpu",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("chatrex propose: error:") and "Traceback" not in err


def test_empty_glob_and_help(tmp_path, capsys):
    with pytest.raises(Exception, match="no files match"):
        expand_images([str(tmp_path / "*.jpg")])
    assert main(["propose", "--help"]) == 0
    assert "--checkpoint" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["propose"]) == 2  # missing IMAGE: argparse usage error


def test_unique_stems():
    from pathlib import Path

    assert unique_stems([Path("x/a.jpg"), Path("y/a.png"), Path("b.jpg"), Path("z/a.jpg")]) == ["a", "a_2", "b", "a_3"]


def test_python_dash_m_help():
    done = subprocess.run([sys.executable, "-m", "chatrex", "propose", "--help"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "--min-score" in done.stdout


def test_cli_import_is_light():
    code = "import sys, chatrex.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False"  # --help and argument errors never pay for torch
