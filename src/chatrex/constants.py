"""Token ids, sentinels and special-token strings shared by the MLLM model, processor and parser.

Defined once here; everything else imports them. The values match the reference code base
(RexSeek / ChatRex) so prompts built by either side produce identical ids.
"""

from __future__ import annotations

# Sentinels written into `input_ids` by the processor. They are not vocabulary ids: the model
# replaces them with vision embeddings before the LLM sees the sequence.
IMAGE_TOKEN_INDEX = -200  # one per prompt; expands to all `num_image_tokens` image embeddings
OBJECT_TOKEN_INDEX = -300  # one per box, in box order; each becomes one object embedding
IGNORE_INDEX = -100  # label value skipped by the loss (also used for image/object positions)

# Literal strings in prompt text that the processor turns into the sentinels above.
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_OBJECT_FEATURE_TOKEN = "<objfeat>"

# The vocabulary holds <obj0> .. <obj{MAX_OBJECTS-1}>, so at most this many boxes per prompt.
MAX_OBJECTS = 100

GROUND_START = "<ground>"
GROUND_END = "</ground>"
OBJECTS_START = "<objects>"
OBJECTS_END = "</objects>"


def object_token(k: int) -> str:
    """The vocabulary token that names box `k` (0-based), e.g. `object_token(3) == "<obj3>"`."""
    if not 0 <= int(k) < MAX_OBJECTS:
        raise ValueError(f"object index {k} is outside 0..{MAX_OBJECTS - 1}; the vocabulary has {MAX_OBJECTS} object tokens")
    return f"<obj{int(k)}>"


# Added to the base tokenizer in this order by the reference (`add_tokens(..., special_tokens=True)`),
# so <obj0> gets the first new id and </objects> the last.
SPECIAL_TOKENS: list[str] = [f"<obj{k}>" for k in range(MAX_OBJECTS)] + [
    GROUND_START,
    GROUND_END,
    OBJECTS_START,
    OBJECTS_END,
]

__all__ = [
    "IMAGE_TOKEN_INDEX",
    "OBJECT_TOKEN_INDEX",
    "IGNORE_INDEX",
    "DEFAULT_IMAGE_TOKEN",
    "DEFAULT_OBJECT_FEATURE_TOKEN",
    "MAX_OBJECTS",
    "GROUND_START",
    "GROUND_END",
    "OBJECTS_START",
    "OBJECTS_END",
    "object_token",
    "SPECIAL_TOKENS",
]
