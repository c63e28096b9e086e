"""The ChatRex web demo: one Gradio app with a Proposals tab (UPN) and a Chat tab (ChatRex).

    from chatrex.ui.app import build_app, launch
    demo = build_app(lambda: ChatRex.from_pretrained())   # models load here, once
    launch(demo, host="127.0.0.1", port=7860)

or `chatrex ui [--mllm PATH] [--upn CKPT] [--host 127.0.0.1] [--port 7860]`.

Files: gradio keeps uploads and example copies in its cache folder; `build_app` points that folder at
a temp dir the app owns (`tmp_dir`, default a fresh `chatrex-ui-*` under the system temp dir), so
nothing is written elsewhere, and `launch` removes a dir it created when the server stops.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_MAX_UPLOAD_MB = 10.0
_TITLE = "ChatRex — proposals and grounded chat"
_CSS = """
#chatrex-canvas img { cursor: crosshair; }
#chatrex-status, #chatrex-p-status { min-height: 2em; }
"""
_HELP = (
    "**Draw boxes**: click two opposite corners on the image (box K becomes `<objK>`, in drawing order). "
    "**Ask**: pick a task template (fill *Object ids or categories*, e.g. `<obj0>` or `red circle, star`), "
    "or type a free question — a typed question wins. Follow-up questions keep the conversation."
)


def _own_temp_dir(tmp_dir: str | Path | None) -> tuple[Path, bool]:
    """(the app's temp dir, whether we created it). Gradio reads GRADIO_TEMP_DIR when components and the
    server are built, so it is set here and again in `launch`."""
    created = tmp_dir is None
    path = Path(tempfile.mkdtemp(prefix="chatrex-ui-")) if created else Path(tmp_dir)
    path.mkdir(parents=True, exist_ok=True)
    _point_gradio_at(path)
    return path, created


def _point_gradio_at(path: Path) -> None:
    """Make gradio keep every file under `path`: uploads and example copies (GRADIO_TEMP_DIR, read when
    components and the server are built) and the scratch folder `gradio.routes` makes whenever an app
    object is created (a copy of GRADIO_TEMP_DIR taken when gradio was first imported)."""
    os.environ["GRADIO_TEMP_DIR"] = str(path)
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(path / "examples")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    routes = sys.modules.get("gradio.routes")
    if routes is not None:  # gradio was imported before us: its copy still names the default dir
        routes.DEFAULT_TEMP_DIR = str(path)


def _resolve_pipeline(pipeline: Any) -> Any:
    """A loaded `ChatRex`, or a zero-argument factory that loads one (called now, once)."""
    if pipeline is None:
        from chatrex.pipeline import ChatRex

        return ChatRex.from_pretrained()
    if callable(pipeline) and not hasattr(pipeline, "chat"):
        return pipeline()
    return pipeline


def build_app(pipeline: Any = None, *, tmp_dir: str | Path | None = None,
              max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, examples: list[str | Path] | None = None):
    """Build the demo (a `gr.Blocks`) around one `ChatRex`.

    Args:
        pipeline: a loaded `ChatRex`, a zero-argument callable returning one (called here, once), or
            None for `ChatRex.from_pretrained()` (the embedded tiny model).
        tmp_dir: folder for uploads and gradio's copies (created; default: a new temp dir).
        max_upload_mb: upload size limit (enforced by the server at `launch` and by every handler).
        examples: example image paths (default: the bundled synthetic scenes).
    Returns:
        the `gr.Blocks`; `demo.chatrex_tmp_dir` / `demo.chatrex_max_upload_mb` are read by `launch`.
    """
    rex = _resolve_pipeline(pipeline)  # first: a failed load leaves no temp dir behind
    tmp_path, created = _own_temp_dir(tmp_dir)
    try:
        demo = _blocks(rex, max_upload_mb, examples)
    except BaseException:
        if created:
            shutil.rmtree(tmp_path, ignore_errors=True)
        raise
    demo.chatrex_tmp_dir, demo.chatrex_owns_tmp = tmp_path, created
    demo.chatrex_max_upload_mb = float(max_upload_mb)
    demo.chatrex_pipeline = rex
    return demo


def _blocks(rex: Any, max_upload_mb: float, examples: list[str | Path] | None):
    import gradio as gr  # after GRADIO_TEMP_DIR is set: components read it when built

    from chatrex.ui.examples import example_paths
    from chatrex.ui.handlers import DemoHandlers

    handlers = DemoHandlers(rex, int(max_upload_mb * 2**20))
    example_files = [str(p) for p in (examples if examples is not None else example_paths())]
    with gr.Blocks(title=_TITLE, analytics_enabled=False, delete_cache=(3600, 6 * 3600)) as demo:
        gr.Markdown(f"# {_TITLE}")
        with gr.Tabs():
            with gr.Tab("Proposals", id="proposals"):
                _proposals_tab(gr, handlers, example_files)
            with gr.Tab("Chat", id="chat"):
                _chat_tab(gr, handlers, example_files)
    return demo


def _upload(gr: Any, elem_id: str):
    return gr.File(label="Image (PNG / JPEG)", file_types=["image"], type="filepath", elem_id=elem_id)


def _examples(gr: Any, files: list[str], target: Any, elem_id: str) -> None:
    if files:
        gr.Examples([[f] for f in files], inputs=[target], label="Examples (synthetic scenes) — one click loads",
                    example_labels=[Path(f).stem.replace("_", " ") for f in files], elem_id=elem_id,
                    cache_examples=False)


def _proposals_tab(gr: Any, h: Any, example_files: list[str]) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            upload = _upload(gr, "p-upload")
            _examples(gr, example_files, upload, "p-examples")
            prompt = gr.Radio([("fine-grained (parts and objects)", "fine"), ("coarse-grained (instances)", "coarse")],
                              value="fine", label="Prompt", elem_id="p-prompt")
            threshold = gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="Score threshold", elem_id="p-threshold")
            nms = gr.Slider(0.0, 1.0, value=0.8, step=0.05, label="NMS IoU (0 = off)", elem_id="p-nms")
            run = gr.Button("Propose", variant="primary", elem_id="p-run")
        with gr.Column(scale=2):
            status = gr.Markdown("Upload an image or click an example, then press **Propose**.",
                                 elem_id="chatrex-p-status")
            image = gr.Image(label="Proposals (index: score)", type="pil", format="png", interactive=False,
                             elem_id="p-image")
            table = gr.Dataframe(headers=["index", "score", "x1", "y1", "x2", "y2"], label="Boxes (xyxy px)",
                                 interactive=False, elem_id="p-table")
    upload.change(h.preview, [upload], [image, table, status])
    run.click(h.propose, [upload, prompt, threshold, nms], [image, table, status], concurrency_id="model")


def _chat_tab(gr: Any, h: Any, example_files: list[str]) -> None:
    from chatrex.ui.render import TEMPLATE_NAMES
    from chatrex.ui.session import ChatSession

    session = gr.State(ChatSession())
    gr.Markdown(_HELP)
    with gr.Row():
        with gr.Column(scale=1):
            upload = _upload(gr, "c-upload")
            _examples(gr, example_files, upload, "c-examples")
            canvas = gr.Image(label="Click two corners to draw a box", type="pil", format="png",
                              interactive=False, elem_id="chatrex-canvas")
            source = gr.Radio([("drawn boxes (UPN fine if none)", "drawn"), ("UPN fine-grained", "fine"),
                               ("UPN coarse-grained", "coarse")], value="drawn", label="Boxes", elem_id="c-source")
            threshold = gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="UPN score threshold", elem_id="c-threshold")
            with gr.Row():
                undo = gr.Button("Undo box", elem_id="c-undo")
                clear_boxes = gr.Button("Clear boxes", elem_id="c-clear-boxes")
            box_text = gr.Textbox(label="Boxes (<objK>: xyxy px of the image)", lines=4, max_lines=8, interactive=False,
                                  elem_id="c-boxes")
        with gr.Column(scale=1):
            template = gr.Dropdown(list(TEMPLATE_NAMES), value=TEMPLATE_NAMES[0], label="Task template",
                                   elem_id="c-template")
            with gr.Row():
                field = gr.Textbox(label="Object ids or categories", placeholder="<obj0>, <obj1>  or  red circle, star",
                                   elem_id="c-field", scale=3)
                all_regions = gr.Checkbox(label="All regions", elem_id="c-all", scale=1)
            question = gr.Textbox(label="Free question (wins over the template when typed)", elem_id="c-question")
            with gr.Row():
                send = gr.Button("Send", variant="primary", elem_id="c-send")
                new_chat = gr.Button("New chat", elem_id="c-new-chat")
            status = gr.Markdown("Upload an image or click an example.", elem_id="chatrex-status")
            chatbot = gr.Chatbot(label="Conversation", height=300, elem_id="c-chatbot")
            answer = gr.HighlightedText(label="Answer (grounded phrases in the colour of their boxes)",
                                        show_inline_category=False, elem_id="c-answer")
            overlay = gr.Image(label="Answer boxes", type="pil", format="png", interactive=False, elem_id="c-overlay")
            phrases = gr.Dataframe(headers=["phrase", "objects", "boxes (xyxy px)"], label="Grounded phrases",
                                   interactive=False, elem_id="c-phrases")
            raw = gr.Textbox(label="Raw model text", lines=3, interactive=False, elem_id="c-raw")
    box_view = [canvas, box_text, status]
    upload.change(h.load, [upload, session, source, threshold],
                  [session, canvas, box_text, chatbot, answer, overlay, raw, phrases, status], concurrency_id="model")
    canvas.select(h.click, [session, threshold], [session, canvas, box_text, source, status])
    undo.click(h.undo, [session, source, threshold], [session, *box_view])
    clear_boxes.click(h.clear_boxes, [session, source, threshold], [session, *box_view])
    source.input(h.show_boxes, [session, source, threshold], box_view, concurrency_id="model")
    threshold.release(h.show_boxes, [session, source, threshold], box_view, concurrency_id="model")
    ask_inputs = [session, source, threshold, template, field, all_regions, question]
    ask_outputs = [session, chatbot, answer, overlay, raw, phrases, status, question]
    send.click(h.send, ask_inputs, ask_outputs, concurrency_id="model")
    question.submit(h.send, ask_inputs, ask_outputs, concurrency_id="model")
    new_chat.click(h.clear_chat, [session], [session, chatbot, answer, overlay, raw, phrases, status])


def launch(demo: Any, host: str = "127.0.0.1", port: int | None = 7860, *, block: bool = True,
           quiet: bool = False) -> Any:
    """Serve `demo` on http://host:port (localhost by default; no share link, no SSR).

    `block=False` returns at once with the server running in a thread (tests); call `demo.close()`
    to stop it. With `block=True` this returns when the server stops, then removes the temp dir if
    `build_app` created it. Returns the demo.
    """
    tmp_path = Path(demo.chatrex_tmp_dir)
    _point_gradio_at(tmp_path)  # again: another app may have been built in this process since
    max_mb = demo.chatrex_max_upload_mb
    demo.queue(default_concurrency_limit=1)
    try:
        demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                    max_file_size=f"{int(max_mb * 1024)}kb", show_error=False, quiet=quiet, ssr_mode=False,
                    pwa=False, mcp_server=False, inbrowser=False, css=_CSS, footer_links=[])
    finally:
        if block and demo.chatrex_owns_tmp:
            shutil.rmtree(tmp_path, ignore_errors=True)
    return demo


def run(mllm: str | None = None, upn: str | None = None, *, host: str = "127.0.0.1", port: int = 7860,
        device: str | None = None, dtype: str | None = None, upn_config: str = "large",
        max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, max_new_tokens: int = 512) -> None:
    """`chatrex ui`: load the models once, build the app and serve it until interrupted."""
    from chatrex.pipeline import ChatRex

    def factory() -> Any:
        return ChatRex.from_pretrained(mllm=mllm, upn=upn, device=device, dtype=dtype, upn_config=upn_config,
                                       max_new_tokens=max_new_tokens)

    demo = build_app(factory, max_upload_mb=max_upload_mb)
    print(f"chatrex ui: serving on http://{host}:{port} (uploads under {demo.chatrex_tmp_dir}; Ctrl+C stops)",
          flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops like Ctrl+C: temp dir removed
    try:
        launch(demo, host=host, port=port, block=True)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


__all__ = ["DEFAULT_MAX_UPLOAD_MB", "build_app", "launch", "run"]
