"""End to end: `chatrex ui`'s app on a free localhost port, driven by Playwright in Debian Chromium.

Two apps: the tiny random UPN + the scripted tiny ChatRex (always answers SCRIPTED_ANSWER, so the page
logic is checked exactly), and the embedded tiny model (`ChatRex.from_pretrained()`), whose answers
must name the right shape. Screenshots go to `artifacts/ui/` (override with CHATREX_ARTIFACTS); with
CHATREX_UPDATE_DOCS=1 the embedded-model screenshot is also copied to docs/ui.png for the README
(CHATREX_UI_MLLM=folder runs that test on another trained ChatRex folder).
Skips only when playwright or chromium is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install playwright)")
pytest.importorskip("gradio", reason="the web demo needs gradio (pip install gradio)")
CHROMIUM = os.environ.get("CHATREX_CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).is_file():
    pytest.skip(f"needs Chromium at {CHROMIUM} (apt-get install chromium, or set CHATREX_CHROMIUM)",
                allow_module_level=True)

from chatrex.ui.examples import example_manifest  # noqa: E402
from chatrex.ui.render import hex_color  # noqa: E402
from tiny_models import SCRIPTED_ANSWER, scripted_chatrex_dir, tiny_upn_ckpt  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("CHATREX_ARTIFACTS", REPO / "artifacts")) / "ui"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
TIMEOUT_MS = 60_000
MANIFEST = example_manifest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(rex, tmp_dir: Path):
    """Build the app around `rex`, serve it on a free 127.0.0.1 port in a thread; yields (url, demo)."""
    from chatrex.ui.app import build_app, launch

    saved = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE")}
    demo = build_app(rex, tmp_dir=tmp_dir, max_upload_mb=5)
    port = _free_port()
    launch(demo, host="127.0.0.1", port=port, block=False, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", demo
    finally:
        demo.close()
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=TIMEOUT_MS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An empty current directory for the server: the app must write nothing here."""
    cwd, path = Path.cwd(), tmp_path_factory.mktemp("ui_cwd")
    os.chdir(path)
    yield path
    os.chdir(cwd)


def _page(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#p-run")
    return page


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def _status(page, prefix="c") -> str:
    return page.inner_text("#chatrex-status" if prefix == "c" else "#chatrex-p-status")


def load_example(page, prefix: str, k: int) -> None:
    page.locator(f"#{prefix}-examples button", has_text=f"example {k}").click()
    status = "#chatrex-status" if prefix == "c" else "#chatrex-p-status"
    page.wait_for_selector(f"{status}:has-text('Loaded example_{k}.png')")


def draw_box(page, box, image_width: int) -> None:
    """Click the two corners of `box` (xyxy px of the original image) on the displayed canvas."""
    img = page.locator("#chatrex-canvas img")
    img.scroll_into_view_if_needed()
    rect = img.bounding_box()
    k = rect["width"] / image_width  # displayed px per original px (the canvas is letterbox-free)
    page.mouse.click(rect["x"] + box[0] * k, rect["y"] + box[1] * k)
    page.wait_for_selector("#chatrex-status:has-text('first corner')")
    page.mouse.click(rect["x"] + box[2] * k, rect["y"] + box[3] * k)
    page.wait_for_selector("#chatrex-status:has-text('= [')")


def drawn_boxes(page) -> list[list[float]]:
    text = page.input_value("#c-boxes textarea")
    return [[float(v) for v in m.split(",")] for m in re.findall(r"<obj\d+>: \[([^\]]+)\]", text)]


def ask(page, turn: int, template: str = "Free question", field: str = "", question: str = "") -> str:
    """Send one question and wait for turn `turn` to be answered; returns the status line."""
    page.locator("#c-template input").click()
    page.get_by_role("option", name=template, exact=True).click()
    page.locator("#c-field textarea").fill(field)
    page.locator("#c-question textarea").fill(question)
    page.click("#c-send")
    page.wait_for_selector(f"#chatrex-status:has-text('Turn {turn} answered'), #chatrex-status:has-text('Error')")
    return _status(page)


def highlighted_phrases(page) -> dict[str, str]:
    """{phrase: background colour} of the highlighted answer tokens."""
    tokens = page.locator("#c-answer .token.highlighted")
    return {tokens.nth(i).inner_text().strip(): tokens.nth(i).evaluate("e => e.style.backgroundColor")
            for i in range(tokens.count())}


def _rgba(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, 0.5)"


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# ----------------------------------------------------------------------------- scripted model: page logic
@pytest.fixture(scope="module")
def scripted_app(scripted_chatrex_dir, tiny_upn_ckpt, tmp_path_factory, workdir):
    from chatrex.pipeline import ChatRex

    rex = ChatRex.from_pretrained(mllm=scripted_chatrex_dir, upn=tiny_upn_ckpt, upn_config="tiny", device="cpu",
                                  dtype="fp32", max_new_tokens=24)
    tmp_dir = tmp_path_factory.mktemp("ui_tmp")
    with serve(rex, tmp_dir) as (url, demo):
        yield url, rex, tmp_dir


def test_proposals_tab_shows_every_box(browser, scripted_app):
    url, rex, _ = scripted_app
    example = MANIFEST[2]
    page = _page(browser, url)
    load_example(page, "p", 2)
    page.locator("#p-prompt label", has_text="coarse-grained").click()
    page.click("#p-run")
    page.wait_for_selector("#chatrex-p-status:has-text('proposals')")
    from chatrex.images import load_image
    from chatrex.ui.examples import examples_dir

    expected = rex.upn.predict([load_image(examples_dir() / example["file"])], prompt_type="coarse_grained_prompt",
                               min_score=0.3, nms_iou=0.8)[0]
    assert len(expected.boxes) > 0
    assert f"{len(expected.boxes)} proposals (coarse-grained" in _status(page, "p")
    rows = int(page.get_attribute("#p-table [role=grid]", "aria-rowcount")) - 1  # minus the header row
    assert rows == len(expected.boxes)
    assert page.locator("#p-image img").evaluate("e => e.naturalWidth") > example["width"]  # shown enlarged
    _shot(page, "proposals_scripted.png")
    page.close()


def test_chat_tab_draw_ask_detect_follow_up_and_corrupt_upload(browser, scripted_app, workdir, tmp_path):
    url, rex, tmp_dir = scripted_app
    example = MANIFEST[2]
    target = next(o for o in example["objects"] if o["shape"] == "hexagon")
    page = _page(browser, url)
    page.get_by_role("tab", name="Chat").click()
    load_example(page, "c", 2)
    page.locator("#c-source label", has_text="UPN coarse-grained").click()  # canvas shows what will be sent
    page.wait_for_selector("#chatrex-status:has-text('UPN coarse-grained proposals')")
    assert len(drawn_boxes(page)) == int(re.search(r"(\d+) UPN", _status(page)).group(1))
    draw_box(page, target["box"], example["width"])
    assert page.is_checked("#c-source input[value=drawn]")  # drawing switches back to drawn boxes
    (box,) = drawn_boxes(page)
    assert all(abs(a - b) <= 1.5 for a, b in zip(box, target["box"])), (box, target["box"])

    status = ask(page, 1, "Region category", field="<obj0>")
    assert "Turn 1 answered" in status and "1 drawn box" in status
    assert page.input_value("#c-raw textarea") == SCRIPTED_ANSWER
    assert "What is the category name of <obj0>?" in page.inner_text("#c-chatbot")

    status = ask(page, 2, "Grounding (detect categories)", field="person")
    assert highlighted_phrases(page) == {"person": _rgba(hex_color("person"))}
    row = page.locator("#c-phrases [role=row]").nth(1).inner_text()
    assert "person" in row and "<obj0>" in row and f"[{box[0]:.0f}, {box[1]:.0f}" in row
    assert page.locator("#c-overlay img").count() == 1
    assert "image features reused from the cache" in status

    ask(page, 3, question="Which shape is blue?")
    chat = page.inner_text("#c-chatbot")
    assert "What is the category name of <obj0>?" in chat and "Which shape is blue?" in chat
    assert "Please detect person in this image." in chat
    _shot(page, "chat_scripted.png")

    corrupt = tmp_path / "corrupt_upload.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 64)
    page.click("#c-upload button[aria-label=Clear]")  # the user removes the example, then uploads
    page.wait_for_selector("#chatrex-status:has-text('Upload an image')")
    page.set_input_files("#c-upload input[type=file]", str(corrupt))
    page.wait_for_selector("#chatrex-status:has-text('Error')")
    message = _status(page)
    assert "corrupt_upload.png" in message and re.search(r"corrupt|cannot|decode", message, re.I)
    assert "Traceback" not in page.content()
    _shot(page, "corrupt_upload.png")
    page.close()
    # the upload landed in the app's temp dir, and nothing was written in the current directory
    assert list(Path(tmp_dir).rglob("corrupt_upload.png"))
    assert list(workdir.iterdir()) == []


def test_oversized_upload_is_refused_with_a_message(browser, scripted_app, tmp_path):
    url, _, tmp_dir = scripted_app
    big = tmp_path / "huge_photo.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(6 * 2**20))  # the test app allows 5 MB
    page = _page(browser, url)
    page.set_input_files("#p-upload input[type=file]", str(big))
    page.wait_for_selector("text=exceed the maximum allowed size")
    assert "huge_photo.png" in page.inner_text("body")
    page.close()
    assert not list(Path(tmp_dir).rglob("huge_photo.png"))  # never stored


# ----------------------------------------------------------------------------- embedded model: real answers
@pytest.fixture(scope="module")
def embedded_app(tmp_path_factory, workdir):
    from chatrex.errors import MissingWeightsError
    from chatrex.pipeline import ChatRex

    try:  # CHATREX_UI_MLLM: run this test on another trained model folder (drawn boxes need no UPN)
        rex = ChatRex.from_pretrained(mllm=os.environ.get("CHATREX_UI_MLLM"), device="cpu")
    except MissingWeightsError as exc:
        pytest.skip(f"the embedded tiny model is not bundled in this build ({exc})")
    with serve(rex, tmp_path_factory.mktemp("ui_tmp_embedded")) as (url, demo):
        yield url, rex


def test_embedded_upn_proposes_every_shape(browser, embedded_app):
    url, rex = embedded_app
    if rex.upn is None:
        pytest.skip("this model folder comes without a UPN")
    example = MANIFEST[2]
    page = _page(browser, url)
    load_example(page, "p", 2)
    page.locator("#p-prompt label", has_text="coarse-grained").click()
    page.click("#p-run")
    page.wait_for_selector("#chatrex-p-status:has-text('proposals')")
    n = int(re.search(r"(\d+) proposals", _status(page, "p")).group(1))
    rows = [page.locator("#p-table [role=row]").nth(i).inner_text().split() for i in range(1, n + 1)]
    boxes = [[float(v) for v in row[2:6]] for row in rows]
    assert len(boxes) == n == int(page.get_attribute("#p-table [role=grid]", "aria-rowcount")) - 1
    for obj in example["objects"]:  # the shipped UPN's recall bar, seen through the page
        assert max(_iou(b, obj["box"]) for b in boxes) >= 0.5, (obj, boxes)
    _shot(page, "proposals_embedded.png")
    page.close()


def test_embedded_model_names_the_drawn_shape_and_finds_a_category(browser, embedded_app):
    url, rex = embedded_app
    example = MANIFEST[2]  # five shapes, no overlaps
    page = _page(browser, url)
    page.get_by_role("tab", name="Chat").click()
    load_example(page, "c", 2)
    for obj in example["objects"]:
        draw_box(page, obj["box"], example["width"])
    drawn = drawn_boxes(page)
    assert len(drawn) == len(example["objects"])

    k, region = next((k, o) for k, o in enumerate(example["objects"]) if o["shape"] == "triangle")
    ask(page, 1, "Region category", field=f"<obj{k}>")
    answer = page.input_value("#c-raw textarea")
    assert region["shape"] in answer, (answer, region)

    target = next(o for o in example["objects"] if o["shape"] == "hexagon")
    status = ask(page, 2, "Grounding (detect categories)", field=target["category"])
    assert "Turn 2 answered" in status, status
    raw = page.input_value("#c-raw textarea")
    assert highlighted_phrases(page) == {target["category"]: _rgba(hex_color(target["category"]))}, raw
    row = page.locator("#c-phrases [role=row]").nth(1).inner_text()
    found = [float(v) for v in re.search(r"\[([\d., ]+)\]", row).group(1).split(",")]
    assert _iou(found, target["box"]) > 0.8, (row, target)
    chat = page.inner_text("#c-chatbot")
    assert f"What is the category name of <obj{k}>?" in chat and "Please detect" in chat
    shot = _shot(page, "chat_embedded.png")
    if os.environ.get("CHATREX_UPDATE_DOCS") == "1":
        shutil.copyfile(shot, REPO / "docs" / "ui.png")
    page.close()


def test_manifest_matches_the_bundled_pngs():
    from PIL import Image

    from chatrex.ui.examples import example_paths

    assert len(MANIFEST) == 3
    for item, path in zip(MANIFEST, example_paths()):
        with Image.open(path) as image:
            assert image.size == (item["width"], item["height"])
        shapes = [o["shape"] for o in item["objects"]]
        assert len(set(shapes)) == len(shapes) and json.dumps(item)
