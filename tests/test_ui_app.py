"""Web demo in process (no browser): app construction, handlers, streaming, chat history, errors.

Uses the tiny random models of tests/tiny_models.py: `scripted` always answers SCRIPTED_ANSWER,
`tiny` is random (its text is arbitrary but deterministic under greedy decoding).
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the web demo needs gradio (pip install gradio)")

import gradio as gr  # noqa: E402

from chatrex.ui.handlers import DemoHandlers, error_text  # noqa: E402
from chatrex.ui.session import ChatSession, stream_call  # noqa: E402
from tiny_models import SCRIPTED_ANSWER, scripted_chatrex_dir, tiny_chatrex_dir, tiny_upn_ckpt  # noqa: E402,F401

MB = 2**20


@pytest.fixture(scope="module")
def scripted_rex(scripted_chatrex_dir, tiny_upn_ckpt):
    from chatrex.pipeline import ChatRex

    return ChatRex.from_pretrained(mllm=scripted_chatrex_dir, upn=tiny_upn_ckpt, upn_config="tiny", device="cpu",
                                   dtype="fp32", max_new_tokens=24)


@pytest.fixture(scope="module")
def random_rex(tiny_chatrex_dir):
    from chatrex.pipeline import ChatRex

    return ChatRex.from_pretrained(mllm=tiny_chatrex_dir, device="cpu", dtype="fp32", max_new_tokens=12)


@pytest.fixture()
def scene(tmp_path) -> Path:
    path = tmp_path / "scene.png"
    image = Image.new("RGB", (160, 120), (120, 120, 120))
    image.paste((220, 35, 35), (20, 20, 70, 70))
    image.save(path)
    return path


@pytest.fixture(autouse=True)
def _quiet_toasts():
    with warnings.catch_warnings():  # gr.Warning outside a request falls back to warnings.warn
        warnings.simplefilter("ignore", UserWarning)
        yield


def _select(x: float, y: float) -> gr.SelectData:
    return gr.SelectData(None, {"index": [x, y], "value": None})


def _last(gen):
    out = None
    for out in gen:
        pass
    return out


def test_build_app_loads_once_and_owns_its_temp_dir(scripted_rex, tmp_path):
    from chatrex.ui.app import build_app

    calls = []
    saved = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE")}
    try:
        demo = build_app(lambda: calls.append(1) or scripted_rex, tmp_dir=tmp_path / "ui", max_upload_mb=3)
        assert calls == [1] and demo.chatrex_pipeline is scripted_rex
        assert demo.chatrex_max_upload_mb == 3.0 and demo.chatrex_tmp_dir == tmp_path / "ui"
        assert os.environ["GRADIO_TEMP_DIR"] == str(tmp_path / "ui")
        caches = {Path(block.GRADIO_CACHE) for block in demo.blocks.values() if hasattr(block, "GRADIO_CACHE")}
        assert caches == {tmp_path / "ui"}  # every component keeps files in the app's dir
        import gradio.routes

        assert gradio.routes.DEFAULT_TEMP_DIR == str(tmp_path / "ui")  # its scratch folder too
        assert "vibe_edit_history" in {p.name for p in (tmp_path / "ui").iterdir()}
        labels = {getattr(b, "label", None) for b in demo.blocks.values()}
        assert {"Proposals", "Chat"} <= labels
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def test_stream_call_streams_and_matches_the_plain_call(random_rex):
    image = Image.new("RGB", (96, 80), (90, 140, 200))
    boxes = [[5, 5, 40, 40], [30, 20, 90, 70]]
    plain = random_rex.chat(image, "What is here?", boxes=boxes)
    steps = list(stream_call(random_rex, lambda: random_rex.chat(image, "What is here?", boxes=boxes),
                             threading.Lock()))
    partials = [text for text, result in steps if result is None]
    text, result = steps[-1]
    assert len(partials) >= 2 and all(b.startswith(a) for a, b in zip(partials, partials[1:]))
    assert result.raw == plain.raw  # streaming does not change greedy decoding
    eos = random_rex.processor.tokenizer.eos_token
    assert text.replace(eos, "").strip() == result.raw
    assert "generate" not in vars(random_rex.model)  # the streamer hook is removed again


def test_stream_call_reraises_and_releases(random_rex):
    lock = threading.Lock()

    def boom():
        raise ValueError("bad boxes")

    with pytest.raises(ValueError, match="bad boxes"):
        list(stream_call(random_rex, boom, lock))
    assert not lock.locked() and "generate" not in vars(random_rex.model)


def test_chat_flow_two_turns_keep_history_and_reuse_the_image(scripted_rex, scene):
    h = DemoHandlers(scripted_rex, 10 * MB)
    session = _last([h.load(str(scene), ChatSession(), "drawn", 0.3)])[0]
    assert session.image.size == (160, 120) and session.boxes == []
    s = 768 / 160  # canvas scale of a 160 px wide image
    h.click(session, 0.3, _select(18 * s, 18 * s))
    out = h.click(session, 0.3, _select(72 * s, 72 * s))
    assert session.boxes == [[18.0, 18.0, 72.0, 72.0]] and out[3] == "drawn"
    assert out[2] == "<obj0>: [18.0, 18.0, 72.0, 72.0]"
    steps = list(h.send(session, "drawn", 0.3, "Region category", "<obj0>", False, ""))
    session, messages, answer, overlay, raw, phrases, status, question = steps[-1]
    assert raw == SCRIPTED_ANSWER and "Turn 1 answered" in status and "image encoded" in status
    assert messages[0]["content"].startswith("What is the category name of &lt;obj0&gt;")
    assert messages[1]["content"] == "person" and answer.value == [{"token": "person", "class_or_confidence": "person"}]
    assert phrases[0][:2] == ["person", "<obj0>, <obj2> (no box), <obj7> (no box)"]
    assert "only 1 boxes were given" in status  # out-of-range indices are reported, not drawn
    assert len(steps) >= 2  # a "working" update before the answer
    steps = list(h.send(session, "drawn", 0.3, "Free question", "", False, "Which one is red?"))
    _, messages, *_, status, question = steps[-1]
    assert [m["content"] for m in messages[::2]][-1] == "Which one is red?" and len(messages) == 4
    assert "Turn 2 answered" in status and "reused from the cache" in status and question == ""
    assert [q for q, _ in session.history][1] == "Answer the question in grounded format. Which one is red?"
    cleared = h.clear_chat(session)
    assert cleared[1] == [] and session.history == [] and session.boxes  # boxes survive a new chat


def test_upn_boxes_when_none_drawn_and_proposals_tab(scripted_rex, scene):
    h = DemoHandlers(scripted_rex, 10 * MB)
    image, rows, status = h.propose(str(scene), "fine", 0.3, 0.8)
    direct = scripted_rex.upn.predict([Image.open(scene).convert("RGB")], prompt_type="fine_grained_prompt",
                                      min_score=0.3, nms_iou=0.8)[0]
    assert len(rows) == len(direct.boxes) and f"**{len(direct.boxes)} proposals**" in status
    assert [r[0] for r in rows] == list(range(len(rows))) and image.size[0] == 768
    session = h.load(str(scene), ChatSession(), "drawn", 0.3)[0]
    boxes, _, note = h._chat_boxes(session, "drawn", 0.3)
    assert boxes == [list(map(float, b)) for b in direct.boxes] and "no box drawn yet" in note


def test_errors_are_messages_not_tracebacks(scripted_rex, random_rex, scene, tmp_path):
    h = DemoHandlers(scripted_rex, 10 * MB)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    out = h.load(str(corrupt), ChatSession(), "drawn", 0.3)
    assert out[-1].startswith("**Error:**") and "corrupt.png" in out[-1] and "Traceback" not in out[-1]
    assert out[1] is None  # the canvas is cleared
    no_image = _last(h.send(ChatSession(), "drawn", 0.3, "Free question", "", False, "hi"))
    assert "upload an image" in no_image[6]
    too_big = DemoHandlers(scripted_rex, 100).propose(str(scene), "fine", 0.3, 0.8)
    assert "the limit is" in too_big[2]
    no_upn = DemoHandlers(random_rex, 10 * MB).propose(str(scene), "fine", 0.3, 0.8)
    assert "no UPN model is loaded" in no_upn[2] and "--upn" in no_upn[2]
    session = h.load(str(scene), ChatSession(), "drawn", 0.3)[0]
    bad = _last(h.send(session, "drawn", 0.3, "Region category", "<obj99>", False, ""))
    assert "&lt;obj99&gt; does not exist" in bad[6]
    assert "internal error (KeyError" in error_text(KeyError("x")) and "ValueError: v" == error_text(ValueError("v"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_on_localhost_and_cleans_up_on_sigterm(scripted_chatrex_dir, tiny_upn_ckpt, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "chatrex", "ui", "--mllm", str(scripted_chatrex_dir), "--upn", str(tiny_upn_ckpt),
           "--upn-config", "tiny", "--device", "cpu", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # printed after the models loaded, before serving
        assert f"serving on http://127.0.0.1:{port}" in line, line
        deadline, page = time.monotonic() + 60, ""
        while time.monotonic() < deadline and not page:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
            except OSError:
                time.sleep(0.5)
        assert "ChatRex" in page
        owned = [p for p in tmp_path.iterdir() if p.name.startswith("chatrex-ui-")]
        assert len(owned) == 1  # the app's temp dir (TMPDIR points here)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert not owned[0].exists()  # removed on shutdown
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # and nothing else was written in cwd/TMPDIR


def test_cli_missing_weights_is_one_line(tmp_path, capsys):
    from chatrex.cli import main

    assert main(["ui", "--mllm", str(tmp_path / "missing"), "--port", str(_free_port())]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("chatrex ui: error:") and "missing" in err and "\n" not in err
