"""Chat templates: wrap a user message (and earlier turns) into the prompt string the LLM was trained on.

Single-turn prompts equal the reference exactly (chatrex_reference.md §5.4): the reference wraps the user
text with only the INSTRUCTION field of an xtuner-style template, with no system text:

* ``"vicuna"``: ``USER: {input} ASSISTANT:``
* ``"chatml"``: ``<|im_start|>user\\n{input}<|im_end|>\\n<|im_start|>assistant\\n``
* any other string containing ``{input}`` is used as the INSTRUCTION itself.

Multi-turn prompts render earlier ``(question, answer)`` pairs with the same INSTRUCTION, each answer
followed by the template's end-of-turn text (the tokenizer's EOS for Vicuna-style templates,
``<|im_end|>\\n`` for ChatML), e.g. ``USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:``.
Pure string functions: no tokenizer, no torch. `build_prompt` adds ChatRex's image/object prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from chatrex.errors import ConfigError
from chatrex.model.constants import DEFAULT_IMAGE_TOKEN, DEFAULT_OBJECT_FEATURE_TOKEN

INPUT_FIELD = "{input}"
EOS_FIELD = "{eos}"


@dataclass(frozen=True)
class ChatTemplate:
    """One chat format.

    Attributes:
        name: preset name, or "custom" for a user format string.
        instruction: the user turn with an ``{input}`` slot; ends where the assistant's answer starts.
        answer_prefix: text put between `instruction` and a (historical) answer, e.g. " " for Vicuna.
        turn_end: text after a historical answer; ``{eos}`` is replaced by the tokenizer's EOS text.
    """

    name: str
    instruction: str
    answer_prefix: str = ""
    turn_end: str = EOS_FIELD

    def __post_init__(self) -> None:
        if INPUT_FIELD not in self.instruction:
            raise ConfigError(f"chat template {self.name!r} has no '{INPUT_FIELD}' slot: {self.instruction!r}")

    def user_turn(self, user_text: str) -> str:
        """The instruction with `user_text` in its slot (str.replace, so braces in the text are safe)."""
        return self.instruction.replace(INPUT_FIELD, user_text)

    def answer_turn(self, answer: str, eos_text: str) -> str:
        """A finished assistant answer as it appears in the history of a later prompt."""
        return self.answer_prefix + answer + self.turn_end.replace(EOS_FIELD, eos_text)


TEMPLATES: dict[str, ChatTemplate] = {
    "vicuna": ChatTemplate("vicuna", "USER: {input} ASSISTANT:", answer_prefix=" ", turn_end=EOS_FIELD),
    "chatml": ChatTemplate(
        "chatml",
        "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        answer_prefix="",
        turn_end="<|im_end|>\n",
    ),
}


def get_template(template: str | ChatTemplate) -> ChatTemplate:
    """Resolve a preset name ("vicuna", "chatml"), a format string with ``{input}``, or a `ChatTemplate`.

    A custom format string gets answer_prefix " " when it does not end in whitespace (so a history
    answer does not glue onto e.g. "Answer:"), and the tokenizer's EOS as end of turn.
    Raises ConfigError for anything else.
    """
    if isinstance(template, ChatTemplate):
        return template
    if not isinstance(template, str):
        raise ConfigError(f"chat template must be a name or a format string, got {type(template).__name__}")
    if template in TEMPLATES:
        return TEMPLATES[template]
    if INPUT_FIELD in template:
        prefix = "" if template[-1:].isspace() else " "
        return ChatTemplate("custom", template, answer_prefix=prefix, turn_end=EOS_FIELD)
    raise ConfigError(
        f"unknown chat template {template!r}: use one of {sorted(TEMPLATES)} or a format string containing '{INPUT_FIELD}'"
    )


def _check_history(history: Iterable[Sequence[str]] | None) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for i, turn in enumerate(history or ()):
        if isinstance(turn, str) or len(turn) != 2:
            raise ValueError(f"history[{i}] must be a (question, answer) pair, got {turn!r}")
        question, answer = turn
        if not isinstance(question, str) or not isinstance(answer, str):
            raise ValueError(f"history[{i}] must hold two strings, got {type(question).__name__}, {type(answer).__name__}")
        pairs.append((question, answer))
    return pairs


def apply_chat_template(
    user_text: str,
    template: str | ChatTemplate = "vicuna",
    history: Iterable[Sequence[str]] | None = None,
    eos_text: str = "</s>",
) -> str:
    """Wrap `user_text` (the current user message) in `template`, after the earlier turns in `history`.

    Args:
        user_text: the current user message, already containing any "<image>"/object prefix it needs.
        template: "vicuna", "chatml", a format string with ``{input}``, or a `ChatTemplate`.
        history: earlier ``(question, answer)`` pairs, oldest first, rendered verbatim (the caller puts
            the image/object prefix into the first question only).
        eos_text: the tokenizer's EOS string, used as the end of each earlier answer in Vicuna-style formats.

    Returns:
        The prompt string, ending where the assistant's next answer starts. With no history it is exactly
        the reference's single-turn prompt, e.g. ``"USER: " + user_text + " ASSISTANT:"`` for "vicuna".
    """
    chat = get_template(template)
    parts = [chat.user_turn(q) + chat.answer_turn(a, eos_text) for q, a in _check_history(history)]
    parts.append(chat.user_turn(user_text))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- ChatRex prompt
def clean_question(text: str) -> str:
    """Remove "<image>" (as the reference does) and "<objfeat>" (so user text never adds unbacked sentinels)."""
    return text.replace(DEFAULT_IMAGE_TOKEN, "").replace(DEFAULT_OBJECT_FEATURE_TOKEN, "")


def build_user_text(question: str, num_boxes: int) -> str:
    """The first user message: "<image>\\n" + "<obj0><objfeat>..." + "\\n" + question (N == 0 -> "<image>\\n\\n" + q)."""
    objects = "".join(f"<obj{k}>{DEFAULT_OBJECT_FEATURE_TOKEN}" for k in range(num_boxes))
    return f"{DEFAULT_IMAGE_TOKEN}\n{objects}\n{clean_question(question)}"


def build_prompt(
    question: str,
    num_boxes: int,
    template: str | ChatTemplate = "vicuna",
    history: Iterable[Sequence[str]] | None = None,
    eos_text: str = "</s>",
) -> str:
    """The ChatRex prompt: the image/object prefix + question in the first user turn, wrapped by `template`.

    With `history`, the prefix goes into the first historical question and the current `question` is plain.
    Single-turn output equals the reference prompt exactly (mllm_tiny cases' "prompt").
    """
    if not isinstance(question, str):
        raise ValueError(f"question must be a string, got {type(question).__name__}")
    turns = [(clean_question(q), clean_question(a)) for q, a in _check_history(history)]
    if turns:
        turns[0] = (build_user_text(turns[0][0], num_boxes), turns[0][1])
        user = clean_question(question)
    else:
        user = build_user_text(question, num_boxes)
    return apply_chat_template(user, template, history=turns, eos_text=eos_text)


__all__ = ["ChatTemplate", "TEMPLATES", "apply_chat_template", "build_prompt", "build_user_text", "clean_question", "get_template"]
