"""Event handlers of the web demo: page inputs → `ChatRex` calls → page outputs.

Every handler turns expected failures (`ChatRexError`, `ValueError`, `OSError`) into a readable message
in the tab's status line (and a toast); anything else is logged with its traceback on the server and
shown as one line. The page never sees a traceback. Handlers return tuples in the order documented on
each method; `gr.skip()` leaves an output unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial, wraps
from pathlib import Path
from typing import Any

import gradio as gr

from chatrex.errors import ChatRexError, MissingWeightsError
from chatrex.grounding import parse_answer
from chatrex.ui import render
from chatrex.ui.session import ChatSession, read_upload, stream_call

log = logging.getLogger("chatrex.ui")
PROMPTS = {"fine": "fine_grained_prompt", "coarse": "coarse_grained_prompt"}
CHAT_NMS = 0.8  # NMS IoU of the Chat tab's UPN boxes (as the pipeline's default)
EXPECTED = (ChatRexError, ValueError, OSError)


def error_text(exc: BaseException) -> str:
    """One readable line for the page: the message of an expected error, the type of a bug."""
    if isinstance(exc, EXPECTED):
        message = str(exc) or type(exc).__name__
        return message if isinstance(exc, ChatRexError) else f"{type(exc).__name__}: {message}"
    return f"internal error ({type(exc).__name__}: {exc}); the server log has the details"


def _report(exc: BaseException) -> str:
    if not isinstance(exc, EXPECTED):
        log.exception("chatrex ui: unexpected error in a handler")
    message = error_text(exc)
    gr.Warning(message)
    return f"**Error:** {escape(message)}"


def guarded(n_outputs: int, status_at: int, on_error: dict[int, Any] | None = None) -> Callable:
    """Decorate a handler (function or generator) returning `n_outputs` values: on an error, yield /
    return `gr.skip()` everywhere except the status message at `status_at` and `on_error` values."""
    def error_outputs(exc: BaseException) -> tuple:
        values = [gr.skip()] * n_outputs
        for index, value in (on_error or {}).items():
            values[index] = value() if callable(value) else value
        values[status_at] = _report(exc)
        return tuple(values)

    def decorate(fn: Callable) -> Callable:
        if _is_generator(fn):
            @wraps(fn)
            def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator[tuple]:
                try:
                    yield from fn(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - shown on the page, never raised into gradio
                    yield error_outputs(exc)
            return gen_wrapper

        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> tuple:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - shown on the page, never raised into gradio
                return error_outputs(exc)
        return wrapper
    return decorate


def escape(text: str) -> str:
    """`text` for a Markdown component: `<obj0>` and friends shown literally, not dropped as HTML tags."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _is_generator(fn: Callable) -> bool:
    import inspect

    return inspect.isgeneratorfunction(fn)


class DemoHandlers:
    """Handlers bound to one loaded `ChatRex` (`rex`); `max_bytes` caps uploads."""

    def __init__(self, rex: Any, max_bytes: int) -> None:
        self.rex = rex
        self.max_bytes = int(max_bytes)
        self.lock = threading.Lock()  # one model call at a time (caches and generate are shared)

    # ------------------------------------------------------------------ shared steps
    def _require_upn(self) -> Any:
        if getattr(self.rex, "upn", None) is None:
            raise MissingWeightsError("no UPN model is loaded, so there are no proposals; restart with "
                                      "`chatrex ui --upn path/to/upn_large.pth`, or draw boxes in the Chat tab")
        return self.rex.upn

    def _proposals(self, image: Any, prompt: str, min_score: float, nms: float) -> tuple[list, list]:
        """UPN boxes (xyxy px) and scores, best first."""
        upn = self._require_upn()
        with self.lock:
            found = upn.predict([image], prompt_type=PROMPTS[prompt], min_score=float(min_score),
                                nms_iou=float(nms))[0]
        return [list(map(float, b)) for b in found.boxes], [float(s) for s in found.scores]

    def _chat_boxes(self, session: ChatSession, source: str, min_score: float) -> tuple[list, list | None, str]:
        """(boxes sent as <obj0>.., their scores or None, how they were chosen) for the Chat tab."""
        if source == "drawn" and (session.boxes or getattr(self.rex, "upn", None) is None):
            n = len(session.boxes)
            return list(session.boxes), None, f"{n} drawn box{'' if n == 1 else 'es'}"
        prompt = "fine" if source == "drawn" else source
        key = (prompt, round(float(min_score), 4))
        if key not in session.proposals:
            session.proposals[key] = self._proposals(session.image, prompt, min_score, CHAT_NMS)
        boxes, scores = session.proposals[key]
        limit = int(getattr(self.rex, "max_objects", 100))
        note = f"{len(boxes)} UPN {prompt}-grained proposals (score ≥ {min_score:.2f})"
        if len(boxes) > limit:
            boxes, scores, note = boxes[:limit], scores[:limit], f"{note}, the best {limit} kept"
        if source == "drawn":
            note += " (no box drawn yet)"
        return boxes, scores, note

    def _canvas(self, session: ChatSession, source: str, min_score: float) -> tuple[Any, str, str]:
        """(canvas image, box list text, note) showing exactly the boxes the next question uses."""
        if session.image is None:
            return None, "", "upload an image or click an example"
        boxes, scores, note = self._chat_boxes(session, source, min_score)
        scale = render.canvas_scale(session.image.size)
        image = render.draw_canvas(session.image, boxes, scale, session.pending, scores)
        return image, render.format_boxes(boxes), note

    # ------------------------------------------------------------------ Proposals tab
    @guarded(3, 2, on_error={0: None, 1: list})
    def preview(self, path: str | None) -> tuple:
        """Upload changed → (image, table rows, status)."""
        if path is None:
            return None, [], "Upload an image or click an example, then press **Propose**."
        image = read_upload(path, self.max_bytes)
        return render.scaled(image, render.canvas_scale(image.size)), [], (
            f"Loaded {Path(path).name} ({image.width}×{image.height}). Press **Propose**.")

    @guarded(3, 2, on_error={0: None, 1: list})
    def propose(self, path: str | None, prompt: str, min_score: float, nms: float) -> tuple:
        """Propose clicked → (numbered overlay, table rows (index, score, box), status)."""
        image = read_upload(path, self.max_bytes)
        start = time.perf_counter()
        boxes, scores = self._proposals(image, prompt, min_score, nms)
        scale = render.canvas_scale(image.size)
        overlay = render.draw_canvas(image, boxes, scale, scores=scores)
        seconds = time.perf_counter() - start
        return overlay, render.proposal_rows(boxes, scores), (
            f"**{len(boxes)} proposals** ({prompt}-grained, score ≥ {min_score:.2f}, "
            f"NMS {'off' if nms <= 0 else f'{nms:.2f}'}) in {seconds:.2f} s")

    # ------------------------------------------------------------------ Chat tab: image and boxes
    @guarded(9, 8, on_error={1: None})
    def load(self, path: str | None, session: ChatSession, source: str, min_score: float) -> tuple:
        """Upload changed → (session, canvas, box text, chatbot, answer, overlay, raw, phrases, status)."""
        session = session or ChatSession()
        empty_answer = ([], None, None, "", [])
        if path is None:
            session.new_image(None, "")
            return (session, None, "", *empty_answer, "Upload an image or click an example.")
        image = read_upload(path, self.max_bytes)
        session.new_image(image, Path(path).name)
        canvas, text, note = self._canvas(session, source, min_score)
        return (session, canvas, text, *empty_answer, (
            f"Loaded {session.name} ({image.width}×{image.height}): {note}. Click two opposite corners "
            "on the image to draw a box."))

    @guarded(5, 4)
    def click(self, session: ChatSession, min_score: float, evt: gr.SelectData) -> tuple:
        """Canvas clicked → (session, canvas, box text, box source, status). Two clicks make a box."""
        if session is None or session.image is None:
            raise ValueError("upload an image first")
        scale = render.canvas_scale(session.image.size)
        point = render.click_to_image(evt.index, scale, session.image.size)
        if session.pending is None:
            session.pending = point
            note = f"first corner at ({point[0]:.0f}, {point[1]:.0f}); click the opposite corner"
        else:
            box = render.corners_to_box(session.pending, point)
            session.pending = None
            if box[2] - box[0] < 2 or box[3] - box[1] < 2:
                note = "box too small (under 2 px); click two opposite corners"
            else:
                session.boxes.append(box)
                note = f"`<obj{len(session.boxes) - 1}>` = {box}"
        canvas, text, _ = self._canvas(session, "drawn", min_score)
        return session, canvas, text, "drawn", note

    @guarded(4, 3)
    def undo(self, session: ChatSession, source: str, min_score: float) -> tuple:
        """Undo clicked → (session, canvas, box text, status): drop the half box, else the last box."""
        if session is not None and session.pending is not None:
            session.pending = None
        elif session is not None and session.boxes:
            session.boxes.pop()
        canvas, text, note = self._canvas(session or ChatSession(), source, min_score)
        return session, canvas, text, note

    @guarded(4, 3)
    def clear_boxes(self, session: ChatSession, source: str, min_score: float) -> tuple:
        """Clear boxes clicked → (session, canvas, box text, status)."""
        if session is not None:
            session.boxes, session.pending = [], None
        canvas, text, note = self._canvas(session or ChatSession(), source, min_score)
        return session, canvas, text, note

    @guarded(3, 2)
    def show_boxes(self, session: ChatSession, source: str, min_score: float) -> tuple:
        """Box source / threshold changed → (canvas, box text, status)."""
        canvas, text, note = self._canvas(session or ChatSession(), source, min_score)
        return canvas, text, note

    # ------------------------------------------------------------------ Chat tab: questions
    @guarded(8, 6)
    def send(self, session: ChatSession, source: str, min_score: float, template: str, field: str,
             all_regions: bool, free_text: str) -> Iterator[tuple]:
        """Send clicked → streams (session, chatbot, answer, overlay, raw, phrases, status, question box)."""
        if session is None or session.image is None:
            raise ValueError("upload an image or click an example first")
        boxes, _, note = self._chat_boxes(session, source, min_score)
        question, free = render.build_question(template, field, all_regions, len(boxes), free_text)
        history = list(session.history)
        if free:
            call = partial(self.rex.chat, session.image, question, history, boxes=boxes)
        else:
            call = partial(self.rex.ask, session.image, question, boxes=boxes, history=history)
        messages = [*session.messages, {"role": "user", "content": escape(question)},
                    {"role": "assistant", "content": "…"}]
        skip = gr.skip()
        yield session, messages, skip, skip, skip, skip, f"Asking with {note}…", skip
        result = None
        try:
            for text, result in stream_call(self.rex, call, self.lock):
                if result is None:
                    messages[-1] = {"role": "assistant", "content": escape(parse_answer(text).text) or "…"}
                    yield session, messages, skip, skip, text, skip, f"Generating with {note}…", skip
        except Exception:
            yield session, session.messages, skip, skip, skip, skip, skip, skip  # drop the unanswered turn
            raise
        session.history = [*history, (result.question, result.raw)]
        messages[-1] = {"role": "assistant", "content": escape(result.text or result.raw) or "(empty answer)"}
        session.messages = messages
        status = self._answer_status(result, note, len(session.history))
        yield (session, messages, *self._answer_outputs(session, result), status, "")

    def _answer_outputs(self, session: ChatSession, result: Any) -> tuple:
        """(highlighted answer, overlay, raw text, phrase rows) of one result."""
        segments, colors = render.highlighted(result.answer)
        scale = render.canvas_scale(session.image.size)
        overlay = render.draw_grounded(session.image, result.boxes.boxes, result.answer, scale)
        return (gr.HighlightedText(value=segments, color_map=colors), overlay, result.raw,
                render.phrase_rows(result.answer, result.boxes.boxes))

    @staticmethod
    def _answer_status(result: Any, note: str, turn: int) -> str:
        timing = result.timing
        cache = "image features reused from the cache" if timing.cache_hit else "image encoded"
        text = f"Turn {turn} answered in {timing.total_s:.2f} s with {note}; {cache}."
        if result.problems:
            text += "  \n**Problems:** " + escape("; ".join(result.problems))
        return text

    @guarded(7, 6)
    def clear_chat(self, session: ChatSession) -> tuple:
        """New chat clicked → (session, chatbot, answer, overlay, raw, phrases, status)."""
        if session is not None:
            session.reset_chat()
        return session, [], [], None, "", [], "Conversation cleared (the image and boxes stay)."


__all__ = ["DemoHandlers", "error_text", "guarded"]
