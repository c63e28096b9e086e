"""Task prompts: the seed's canonical strings and our own paraphrase lists.

Every list's first entry is the canonical prompt (the one the seed README and demo send); the rest are
paraphrases of the same family written for this project, usable for training-data augmentation.
`[OBJ]` is the placeholder for a category, an expression, or `<objK>` region tokens; fill it with
`render`. Canonical strings are copied character for character from the seed, including its typo
"breifly" in the brief grounded caption prompt: the released model was trained on that spelling.
"""

from __future__ import annotations

from collections.abc import Sequence

PLACEHOLDER = "[OBJ]"

# --- canonical prompts (exact seed strings) -------------------------------------------------------
DETECT = "Please detect [OBJ] in this image. Answer the question with object indexes."
REGION_CATEGORY = (
    "What is the category name of [OBJ]? Answer the question with its category name in free format."
)
REGION_SHORT_PHRASE = (
    "Can you provide me with a short phrase to describe [OBJ]? Answer the question with a short phrase."
)
REGION_BRIEF = (
    "Can you provide me with a brief description of [OBJ]? Answer the question with brief description."
)
REGION_ONE_SENTENCE = (
    "Can you provide me with a one sentence of [OBJ]? Answer the question with one sentence description."
)
BRIEF_GROUNDED_CAPTION = (
    "Please breifly describe this image in one sentence and detect all the mentioned objects. "
    "Answer the question with grounded answer."
)
DETAILED_GROUNDED_CAPTION = (
    "Please provide a detailed description of the image and detect all the mentioned objects. "
    "Answer the question with grounded object indexes."
)
GROUNDED_CONVERSATION_PREFIX = "Answer the question in grounded format. "
# The seed publishes no counting prompt; this canonical one is ours, phrased like the others.
COUNTING = (
    "How many [OBJ] are there in this image? "
    "Answer the question with the number of objects and their object indexes."
)

# --- paraphrase families (first entry canonical, the rest written for this project) ----------------
REGION_CATEGORY_PROMPTS: tuple[str, ...] = (
    REGION_CATEGORY,
    "Which category does [OBJ] belong to? Answer the question with its category name in free format.",
    "Name the kind of object shown in [OBJ]. Answer the question with its category name in free format.",
    "What sort of thing is [OBJ]? Reply with just its category name.",
    "Tell me the object class of [OBJ]. Answer with the category name only.",
    "What would you call the object in [OBJ]? Give its category name in free format.",
    "Identify the category of [OBJ]. Answer the question with its category name.",
    "Give the class label for [OBJ], in free format.",
    "Which type of object is marked as [OBJ]? Answer with a category name.",
    "What is [OBJ]? Respond with only the name of its category.",
)
REGION_SHORT_PHRASE_PROMPTS: tuple[str, ...] = (
    REGION_SHORT_PHRASE,
    "Describe [OBJ] in a few words. Answer the question with a short phrase.",
    "Give a short phrase that characterizes [OBJ].",
    "Sum up [OBJ] with a brief phrase. Answer the question with a short phrase.",
    "What short phrase best fits [OBJ]? Answer with a short phrase.",
    "Label [OBJ] with a concise descriptive phrase.",
    "In a handful of words, what does [OBJ] show? Answer the question with a short phrase.",
    "Write a compact phrase describing [OBJ].",
    "Offer a short noun phrase for [OBJ]. Answer the question with a short phrase.",
    "How would you describe [OBJ] in a short phrase?",
)
REGION_BRIEF_PROMPTS: tuple[str, ...] = (
    REGION_BRIEF,
    "Briefly describe [OBJ]. Answer the question with brief description.",
    "Give a brief description of [OBJ] that tells it apart from the other objects.",
    "Write a short referring description of [OBJ]. Answer the question with brief description.",
    "How would you refer to [OBJ] so that someone could find it? Keep it brief.",
    "Provide a concise description of [OBJ]. Answer the question with brief description.",
    "Describe [OBJ] briefly, mentioning what makes it distinctive.",
    "What is a brief way to describe [OBJ]? Answer the question with brief description.",
    "Give a short, distinguishing description of [OBJ].",
    "Describe [OBJ] in brief. Answer the question with brief description.",
)
REGION_ONE_SENTENCE_PROMPTS: tuple[str, ...] = (
    REGION_ONE_SENTENCE,
    "Can you provide a one sentence description of [OBJ] in the image? "
    "Answer the question with a one sentence description.",
    "Describe [OBJ] in a single sentence.",
    "Write one sentence about [OBJ]. Answer the question with one sentence description.",
    "Use exactly one sentence to describe [OBJ].",
    "What is happening with [OBJ]? Answer in one sentence.",
    "Give a one-sentence account of [OBJ]. Answer the question with one sentence description.",
    "Summarize [OBJ] in one complete sentence.",
    "Tell me about [OBJ] in a single sentence.",
    "Compose one descriptive sentence about [OBJ]. Answer the question with one sentence description.",
)
COUNTING_PROMPTS: tuple[str, ...] = (
    COUNTING,
    "Count the [OBJ] in this image. Answer the question with the number of objects and their object indexes.",
    "How many [OBJ] can you see? Give the count and the object indexes.",
    "What is the number of [OBJ] in the picture? Answer with the count and the object indexes.",
    "Tell me how many [OBJ] appear in this image and which object indexes they are.",
    "Count every [OBJ] here and list their object indexes.",
    "How many instances of [OBJ] are present? Answer with a number and the object indexes.",
    "Please count the [OBJ] in this image and answer with the object indexes.",
)
GROUNDING_PROMPTS: tuple[str, ...] = (
    DETECT,
    "Find [OBJ] in this image. Answer the question with object indexes.",
    "Which objects are [OBJ]? Answer the question with object indexes.",
    "Locate [OBJ] in the image and answer with their object indexes.",
    "Point out [OBJ] in this image. Answer the question with object indexes.",
    "Detect all [OBJ] in the picture. Answer the question with object indexes.",
    "Where is [OBJ] in this image? Answer the question with object indexes.",
    "Please find every [OBJ] and answer with the object indexes.",
    "Identify [OBJ] in this image. Respond with object indexes.",
    "Show me [OBJ] in the image. Answer the question with object indexes.",
    "Which regions contain [OBJ]? Answer the question with object indexes.",
)
BRIEF_GROUNDED_CAPTION_PROMPTS: tuple[str, ...] = (
    BRIEF_GROUNDED_CAPTION,
    "Describe this image in one sentence and detect every object you mention. "
    "Answer the question with grounded answer.",
    "Give a one-sentence caption of this image and ground each mentioned object. "
    "Answer the question with grounded answer.",
    "Summarize the image in a single sentence and locate all the objects it names. "
    "Answer the question with grounded answer.",
    "Write a short caption for this picture and detect the objects mentioned in it. "
    "Answer the question with grounded answer.",
    "In one sentence, what does this image show? Detect all the mentioned objects. "
    "Answer the question with grounded answer.",
    "Provide a brief caption and ground every object it refers to. Answer the question with grounded answer.",
    "Caption this image briefly and detect all objects named in the caption. "
    "Answer the question with grounded answer.",
)
DETAILED_GROUNDED_CAPTION_PROMPTS: tuple[str, ...] = (
    DETAILED_GROUNDED_CAPTION,
    "Describe this image in detail and detect all the objects you mention. "
    "Answer the question with grounded object indexes.",
    "Give a thorough description of the picture and ground every mentioned object. "
    "Answer the question with grounded object indexes.",
    "Write a detailed caption for this image and locate all the objects it names. "
    "Answer the question with grounded object indexes.",
    "Explain in detail what this image shows, detecting each object you refer to. "
    "Answer the question with grounded object indexes.",
    "Provide a comprehensive description of the scene and detect all mentioned objects. "
    "Answer the question with grounded object indexes.",
    "Describe everything you see in this image in detail and ground the objects you mention. "
    "Answer the question with grounded object indexes.",
    "Give a long, detailed caption of the image and detect all the mentioned objects. "
    "Answer the question with grounded object indexes.",
)

PROMPT_FAMILIES: dict[str, tuple[str, ...]] = {
    "region_category": REGION_CATEGORY_PROMPTS,
    "region_short_phrase": REGION_SHORT_PHRASE_PROMPTS,
    "region_brief": REGION_BRIEF_PROMPTS,
    "region_one_sentence": REGION_ONE_SENTENCE_PROMPTS,
    "counting": COUNTING_PROMPTS,
    "grounding": GROUNDING_PROMPTS,
    "brief_grounded_caption": BRIEF_GROUNDED_CAPTION_PROMPTS,
    "detailed_grounded_caption": DETAILED_GROUNDED_CAPTION_PROMPTS,
}

# caption_region(style=...) → canonical prompt of that family.
REGION_STYLES: dict[str, str] = {
    "category": REGION_CATEGORY,
    "short": REGION_SHORT_PHRASE,
    "brief": REGION_BRIEF,
    "sentence": REGION_ONE_SENTENCE,
}


def object_token(index: int) -> str:
    """`<objK>`: the text token that names input box K in prompts and answers."""
    if index < 0:
        raise ValueError(f"object index must be >= 0, got {index}")
    return f"<obj{index}>"


def join_targets(targets: str | Sequence[str]) -> str:
    """Join categories / expressions / region tokens the way the seed does ("a; b").

    A single string is split on ';' first, so "person;pigeon" and ["person", "pigeon"] both give
    "person; pigeon". Empty items are dropped; an empty result raises ValueError.
    """
    items = targets.split(";") if isinstance(targets, str) else list(targets)
    cleaned = [str(t).strip() for t in items if str(t).strip()]
    if not cleaned:
        raise ValueError(f"no target given (got {targets!r}); pass at least one category or expression")
    return "; ".join(cleaned)


def render(template: str, obj: str | Sequence[str] | None = None) -> str:
    """Fill the `[OBJ]` placeholder of `template` with `obj` (a string, or a list joined with "; ").

    Templates without a placeholder (image captions) are returned unchanged when `obj` is None.
    Raises ValueError when a placeholder has no value or a value has no placeholder.
    """
    has_slot = PLACEHOLDER in template
    if obj is None:
        if has_slot:
            raise ValueError(f"template needs a value for {PLACEHOLDER}: {template!r}")
        return template
    if not has_slot:
        raise ValueError(f"template has no {PLACEHOLDER} placeholder to fill: {template!r}")
    value = obj if isinstance(obj, str) else "; ".join(str(o) for o in obj)
    return template.replace(PLACEHOLDER, value)


def detection_prompt(targets: str | Sequence[str]) -> str:
    """The seed's detection / referring prompt; several targets are joined with '; '."""
    return render(DETECT, join_targets(targets))


def referring_prompt(expression: str) -> str:
    """Detection prompt for one referring expression (kept whole: ';' inside it is not split)."""
    expression = expression.strip()
    if not expression:
        raise ValueError("empty referring expression; describe the object to find")
    return render(DETECT, expression)


def region_prompt(index: int, style: str = "category") -> str:
    """Canonical region-caption prompt of `style` ("category"|"short"|"brief"|"sentence") for box `index`."""
    if style not in REGION_STYLES:
        raise ValueError(f"unknown region caption style {style!r}; choose one of {sorted(REGION_STYLES)}")
    return render(REGION_STYLES[style], object_token(index))


def caption_prompt(detailed: bool = False) -> str:
    """Canonical grounded image caption prompt (brief, with the seed's spelling, or detailed)."""
    return DETAILED_GROUNDED_CAPTION if detailed else BRIEF_GROUNDED_CAPTION


def conversation_prompt(question: str) -> str:
    """Grounded conversation: the seed's prefix + the question (not added twice)."""
    if question.startswith(GROUNDED_CONVERSATION_PREFIX):
        return question
    return GROUNDED_CONVERSATION_PREFIX + question
