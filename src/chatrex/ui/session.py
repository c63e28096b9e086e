"""Per-browser-session state of the Chat tab and the token-streaming wrapper around `ChatRex` calls.

No gradio here. `ChatSession` is what one browser tab remembers between events: the image, the boxes
drawn on it (xyxy px of the original image, in drawing order: box K is `<objK>`), a half-drawn box,
and the conversation (`history` in the pipeline's (sent question, raw answer) form plus the messages
shown in the page).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from chatrex.errors import InvalidImageError
from chatrex.images import load_image

# Pixel cap for uploads (decompression bombs); 40 MP covers any phone photo.
MAX_PIXELS = 40_000_000


@dataclass
class ChatSession:
    """State of one browser tab (gradio keeps one per session)."""

    image: Image.Image | None = None
    name: str = ""
    boxes: list[list[float]] = field(default_factory=list)
    pending: tuple[float, float] | None = None  # first corner of a half-drawn box (original px)
    history: list[tuple[str, str]] = field(default_factory=list)  # (sent question, raw answer)
    messages: list[dict[str, str]] = field(default_factory=list)  # chatbot messages shown
    proposals: dict[tuple, tuple[list, list]] = field(default_factory=dict)  # settings -> (boxes, scores)

    def reset_chat(self) -> None:
        self.history, self.messages = [], []

    def new_image(self, image: Image.Image, name: str) -> None:
        """Start over on `image`: no boxes, no proposals, no conversation."""
        self.image, self.name, self.boxes, self.pending, self.proposals = image, name, [], None, {}
        self.reset_chat()


def read_upload(path: str | Path | None, max_bytes: int) -> Image.Image:
    """Open an uploaded file as RGB, refusing files over `max_bytes` and images over `MAX_PIXELS`.

    Raises InvalidImageError with a message for the page (what is wrong, what to do).
    """
    if path is None:
        raise InvalidImageError("no image: upload a PNG/JPEG or click an example")
    path = Path(path)
    size = path.stat().st_size if path.is_file() else 0
    if size > max_bytes:
        raise InvalidImageError(f"{path.name} is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.0f} MB "
                                "(resize or compress it first)")
    try:
        return load_image(path, max_pixels=MAX_PIXELS)
    except InvalidImageError as exc:  # name the uploaded file, not its temp path
        raise InvalidImageError(str(exc).replace(str(path), path.name)) from None


class TokenStreamer:
    """A transformers streamer (put / end) that hands out the decoded answer after EVERY new token.

    transformers' TextIteratorStreamer waits for a space before it emits, so answers made of
    `<objK>` tags (no spaces) would only appear at the end. The whole answer is re-decoded on each
    token (answers are short) and held back while it ends in an incomplete UTF-8 character.
    Iterating yields the text so far; it stops after `end()`.
    """

    def __init__(self, tokenizer: Any, timeout_s: float | None = None) -> None:
        self.tokenizer, self.timeout_s = tokenizer, timeout_s
        self.ids: list[int] = []
        self.prompt_seen = False  # generate first puts the prompt ids (empty with inputs_embeds)
        self.queue: queue.Queue = queue.Queue()

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(int(v) for v in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if not text.endswith("\ufffd"):
            self.queue.put(text)

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self) -> Iterator[str]:
        while (item := self.queue.get(timeout=self.timeout_s)) is not None:
            yield item


@contextmanager
def _streaming_generate(model: Any, streamer: Any) -> Iterator[None]:
    """Make `model.generate` pass `streamer` (instance attribute, removed afterwards)."""
    had_own = "generate" in vars(model)
    previous = vars(model).get("generate")
    model.generate = partial(model.generate, streamer=streamer)
    try:
        yield
    finally:
        if had_own:
            model.generate = previous
        else:
            del model.generate


def stream_call(rex: Any, call: Callable[[], Any], lock: threading.Lock,
                timeout_s: float = 600.0) -> Iterator[tuple[str, Any]]:
    """Run `call()` (one `ChatRex` task on `rex`) and stream its answer.

    Yields (decoded text so far, None) after each new token, then (last text, the call's result)
    once. Re-raises the call's exception. `lock` serialises model use: the pipeline's caches and the
    patched `generate` are not shared between concurrent calls.
    """
    streamer = TokenStreamer(rex.processor.tokenizer, timeout_s)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc
        finally:
            streamer.end()  # unblocks the reader even when generate never ran

    text = ""
    with lock, _streaming_generate(rex.model, streamer):
        worker = threading.Thread(target=work, name="chatrex-ui-generate", daemon=True)
        worker.start()
        try:
            for text in streamer:
                yield text, None
        finally:  # also when the page goes away mid-answer: keep the lock until the model is free
            worker.join()
    if "error" in outcome:
        raise outcome["error"]
    yield text, outcome["result"]


__all__ = ["ChatSession", "MAX_PIXELS", "TokenStreamer", "read_upload", "stream_call"]
