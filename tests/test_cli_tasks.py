"""Task CLI: detect / refer / caption / chat on tiny models; outputs, COCO file, one-line errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chatrex.cli import main
from chatrex.viz import color_for
from tiny_models import scripted_chatrex_dir, tiny_chatrex_dir, tiny_upn_ckpt  # noqa: F401

BOXES = ["10,10,60,50", "70,20,150,110", "5,60,40,115"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    for i, size in enumerate([(160, 120), (128, 128), (100, 150)]):
        arr = np.full((size[1], size[0], 3), 30, np.uint8)
        arr[15:80, 20:90] = rng.integers(0, 255, (65, 70, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i + 1:012d}.png")
    return folder


def _model_args(mllm, upn=None):
    args = ["--mllm", str(mllm), "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "20"]
    if upn is not None:
        args += ["--upn", str(upn), "--upn-config", "tiny", "--upn-short", "224"]
    return args


@pytest.mark.parametrize("command", ["detect", "refer", "caption", "chat"])
def test_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: chatrex {command}" in out and "--mllm" in out and "--out" in out


def test_detect_many_images_json_png_and_coco(scripted_chatrex_dir, tiny_upn_ckpt, images, tmp_path, capsys):
    out, coco = tmp_path / "out", tmp_path / "coco.json"
    code = main(["detect", str(images), "-c", "person; dog", "--box", *BOXES, "--out", str(out),
                 "--coco", str(coco), *_model_args(scripted_chatrex_dir)])
    assert code == 0
    err = capsys.readouterr().err
    assert "3/3" in err  # progress bar on multi-image runs
    records = sorted(out.glob("*.json"))
    assert [p.name for p in records] == ["000000000001.json", "000000000002.json", "000000000003.json",
                                         "coco_images.json"]
    rec = json.loads(records[0].read_text())
    assert rec["image_id"] == 1 and [d["index"] for d in rec["detections"]] == [0, 2]
    assert any("<obj7>" in w for w in rec["warnings"])
    # Overlay: selected boxes 0 and 2 drawn in the category colour, box 1 (not selected) nowhere.
    overlay = np.asarray(Image.open(out / "000000000001.png"))
    original = np.asarray(Image.open(images / "000000000001.png").convert("RGB"))
    assert tuple(overlay[30, 10]) == color_for("person")
    assert np.array_equal(overlay[60:110, 148:151], original[60:110, 148:151])
    results = json.loads(coco.read_text())
    assert len(results) == 6 and {r["category_id"] for r in results} == {1}
    pycocotools = pytest.importorskip("pycocotools.coco", reason="pycocotools not installed")
    gt = pycocotools.COCO(str(out / "coco_images.json"))
    dt = gt.loadRes(str(coco))
    assert len(dt.getAnnIds(imgIds=[2])) == 2
    assert dt.loadAnns(dt.getAnnIds(imgIds=[1]))[0]["bbox"] == [10.0, 10.0, 50.0, 40.0]


def test_detect_with_upn_and_an_unreadable_image(scripted_chatrex_dir, tiny_upn_ckpt, images, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    code = main(["detect", str(images / "000000000001.png"), str(bad), "-c", "person", "--out", str(out),
                 *_model_args(scripted_chatrex_dir, tiny_upn_ckpt)])
    captured = capsys.readouterr()
    assert code == 1
    assert "chatrex detect: error: cannot decode" in captured.err and "Traceback" not in captured.err
    rec = json.loads((out / "000000000001.json").read_text())  # the good image was still processed
    assert rec["input_boxes"]["source"] == "fine_grained_prompt"
    assert rec["raw"] == "<ground>person</ground><objects><obj0><obj2><obj7></objects>"


def test_refer_and_caption_commands(scripted_chatrex_dir, tiny_upn_ckpt, images, tmp_path):
    img = str(images / "000000000002.png")
    out = tmp_path / "out"
    assert main(["refer", img, "-e", "the man in yellow shirt", "--box", *BOXES, "--out", str(out / "r"),
                 *_model_args(scripted_chatrex_dir)]) == 0
    rec = json.loads((out / "r" / "000000000002.json").read_text())
    assert rec["task"] == "refer" and rec["categories"] == ["the man in yellow shirt"]
    assert main(["caption", img, "--region", *BOXES[:2], "--style", "brief", "--out", str(out / "c"),
                 *_model_args(scripted_chatrex_dir)]) == 0
    rec = json.loads((out / "c" / "000000000002.json").read_text())
    assert rec["style"] == "brief" and [r["caption"] for r in rec["regions"]] == ["person", "person"]
    assert main(["caption", img, "--image", "--detailed", "--out", str(out / "i"),
                 *_model_args(scripted_chatrex_dir, tiny_upn_ckpt)]) == 0
    rec = json.loads((out / "i" / "000000000002.json").read_text())
    assert rec["question"].startswith("Please provide a detailed description") and rec["text"] == "person"
    assert (out / "i" / "000000000002.png").is_file()


def test_chat_repl_keeps_history_and_handles_commands(tiny_chatrex_dir, tiny_upn_ckpt, images, tmp_path,
                                                     monkeypatch, capsys):
    lines = "\n".join([":boxes", "What is this?", "And that?", ":boxes", ":reset", "Again?", ":quit",
                       "never asked"]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    out = tmp_path / "chat"
    assert main(["chat", str(images / "000000000003.png"), "--out", str(out),
                 *_model_args(tiny_chatrex_dir, tiny_upn_ckpt)]) == 0
    stdout = capsys.readouterr().out
    assert "UPN proposes them at the first question" in stdout and "<obj0> [" in stdout
    assert "(history cleared)" in stdout
    transcript = json.loads((out / "000000000003_chat.json").read_text())
    turns = transcript["turns"]
    assert len(turns) == 3
    assert [len(t["history"]) for t in turns] == [1, 2, 1]  # :reset started a new conversation
    assert turns[1]["history"][0][0] == "Answer the question in grounded format. What is this?"
    assert all(Path(t["overlay"]).is_file() for t in turns)
    assert turns[0]["input_boxes"]["source"] == "coarse_grained_prompt"


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("CHATREX_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "chatrex", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_one_line_errors_without_traceback(tiny_chatrex_dir, images):
    img = str(images / "000000000001.png")
    # a model folder but no UPN and no boxes (without --mllm the embedded pair brings its own UPN)
    missing = _run_cli("detect", img, "-c", "dog", "--mllm", str(tiny_chatrex_dir))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip().count("\n") == 0 and "error:" in missing.stderr and "--upn" in missing.stderr
    from chatrex import embedded

    if embedded.mllm_dir() is None:  # a build without the embedded model says what to pass
        no_model = _run_cli("detect", img, "-c", "dog", "--box", "1,1,5,5")
        assert no_model.returncode == 1 and "mllm=" in no_model.stderr and "Traceback" not in no_model.stderr
    many = _run_cli("detect", img, "-c", "dog", "--mllm", str(tiny_chatrex_dir), "--device", "cpu",
                    "--box", *(["1,1,5,5"] * 101))
    assert many.returncode == 1 and "at most 100" in many.stderr and "Traceback" not in many.stderr
    bad_box = _run_cli("caption", img, "--region", "1,2,3")
    assert bad_box.returncode == 2 and "four numbers" in bad_box.stderr
