"""Per-image caches of the `ChatRex` pipeline: keys and a small bounded LRU.

What is cached (see `ChatRex`): proposals per (image, proposal settings), vision features per image,
and the encoded prompt prefix (merged embeddings + the LLM's KV cache) per (image, box set). Keys use
the image's pixel content, never object identity, so the same picture loaded twice hits the cache.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from PIL import Image

V = TypeVar("V")


def image_key(image: Image.Image) -> str:
    """SHA-256 of an RGB image's size and pixels (content hash: equal pictures share cache entries)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def boxes_key(boxes: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
    """Hashable key of a box set (xyxy px rounded to 1e-3 px; order matters: box k is <objk>)."""
    return tuple(tuple(round(float(v), 3) for v in box) for box in boxes)


class LRUCache(Generic[V]):
    """A dict bounded to `maxsize` entries that evicts the least recently used one; counts hits/misses.

    `maxsize=0` disables caching (every `get` misses, `put` stores nothing).
    """

    def __init__(self, maxsize: int) -> None:
        if maxsize < 0:
            raise ValueError(f"cache size must be >= 0, got {maxsize}")
        self.maxsize = int(maxsize)
        self._data: OrderedDict[Any, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Any) -> V | None:
        if key in self._data:
            self._data.move_to_end(key)
            self.hits += 1
            return self._data[key]
        self.misses += 1
        return None

    def put(self, key: Any, value: V) -> None:
        if self.maxsize == 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Any) -> bool:
        return key in self._data
