"""`chatrex demo`: every task on the bundled example scenes, here with tiny models given by path.

The scripted tiny ChatRex always answers `SCRIPTED_ANSWER`, so the printed grounded answers are known.
"""

from __future__ import annotations

from PIL import Image

from chatrex.demo import example_scenes, main
from tiny_models import SCRIPTED_ANSWER, scripted_chatrex_dir, tiny_upn_ckpt  # noqa: F401


def test_bundled_examples_load_with_their_categories():
    scenes = example_scenes()
    assert len(scenes) >= 3
    for name, image, cats in scenes:
        assert image.mode == "RGB" and min(image.size) >= 100 and cats


def test_demo_runs_every_task_and_writes_overlays(scripted_chatrex_dir, tiny_upn_ckpt, tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["--mllm", str(scripted_chatrex_dir), "--upn", str(tiny_upn_ckpt), "--upn-config", "tiny",
                 "--device", "cpu", "--dtype", "fp32", "--max-new-tokens", "48", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    n = len(example_scenes())
    for task in ("detect", "region <obj0>", "grounded caption", "chat", "grained proposals"):
        assert task in printed
    assert printed.count(SCRIPTED_ANSWER) >= 2 * n  # caption + chat answers, verbatim
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 5 * n  # fine + coarse proposals, detect, caption, chat per scene
    assert all(Image.open(p).size[0] >= 100 for p in pngs)
