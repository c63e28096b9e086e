"""The seed README's four ChatRex example scripts (examples/*.py, adapted only in paths, device and UPN
size) run against a tiny random model folder and a tiny UPN, in a fresh process: the only chatrex
imports are the seed's own (`chatrex.tools.visualize`, `chatrex.upn`), so this also checks that
`AutoProcessor` / `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` give our
classes with no remote code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tiny_models import tiny_chatrex_dir, tiny_upn_ckpt  # noqa: F401

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = {
    "chatrex_detection.py": "test_chatrex_detection.jpeg",
    "chatrex_region_caption.py": "test_chatrex_region_caption.jpeg",
    "chatrex_grounded_image_caption.py": "test_chatrex_grounded_image_caption.jpeg",
    "chatrex_grounded_conversation.py": "test_chatrex_grounded_conversation.jpeg",
}

# Runs every script as __main__ in one fresh interpreter and reports what each produced.
_RUNNER = """
import json, runpy, sys
from transformers import AutoModelForCausalLM, AutoProcessor
report = {}
for script in list(sys.argv[1:]):
    sys.argv = [script]  # as if run as `python script` (the scripts read an optional argv[1])
    env = runpy.run_path(script, run_name="__main__")
    report[script] = {
        "prediction_type": type(env["prediction"]).__name__,
        "prediction": env["prediction"] if isinstance(env["prediction"], str) else None,
        "processor": type(env["processor"]).__module__ + "." + type(env["processor"]).__name__,
        "model": type(env["model"]).__module__ + "." + type(env["model"]).__name__,
        "vis_type": type(env["vis_image"]).__module__,
    }
print("REPORT=" + json.dumps(report))
"""


@pytest.mark.slow
def test_seed_examples_run_and_save_images(tiny_chatrex_dir, tiny_upn_ckpt, tmp_path):
    image = tmp_path / "input.jpg"
    Image.new("RGB", (200, 150), (90, 140, 60)).save(image)
    out = tmp_path / "tests"
    out.mkdir()
    env = dict(os.environ, CHATREX_MLLM=str(tiny_chatrex_dir), CHATREX_UPN=str(tiny_upn_ckpt),
               CHATREX_UPN_CONFIG="tiny", CHATREX_IMAGE=str(image), CHATREX_OUT=str(out),
               CHATREX_DEVICE="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    scripts = [str(EXAMPLES / name) for name in SCRIPTS]
    proc = subprocess.run([sys.executable, "-c", _RUNNER, *scripts], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT="))
    report = json.loads(line[len("REPORT="):])
    for name, saved in SCRIPTS.items():
        info = report[str(EXAMPLES / name)]
        assert info["prediction_type"] == "str"
        assert info["processor"] == "chatrex.model.processing.ChatRexProcessor"
        assert info["model"] == "chatrex.model.modeling.ChatRexForConditionalGeneration"
        assert info["vis_type"].startswith("PIL.")
        assert f"prediction is saved at {out / saved}" in proc.stdout
        with Image.open(out / saved) as vis:
            assert vis.size == (200, 150)
