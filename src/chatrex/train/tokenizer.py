"""Build the tiny model's tokenizer: a small sentencepiece-style BPE trained on the synthetic world's text.

Same style as the mllm_tiny fixture's tokenizer (mllm_tiny/README.md §5): `tokenizers` BPE, Metaspace
pre-tokenizer and decoder (replacement "▁", prepend_scheme "first"), no normalizer, specials <unk>=0,
<s>=1, </s>=2. One change to the fixture's style: after Metaspace, the "▁" is split off as its own token. With plain
Metaspace a word right after a special token (e.g. "red" in "<ground>red circle</ground>") has no "▁"
and becomes different ids than the same word in the question ("▁red"); a from-scratch model then has to
learn that translation for every word before it can copy a category. Isolating "▁" makes both the same
id, and decoding stays exact ("<ground>red circle</ground>"). The initial alphabet holds every printable ASCII character and the newline, so any
English text encodes without <unk>. `ensure_special_tokens` then appends <obj0>..<obj99>, <ground>,
</ground>, <objects>, </objects> (one id each). The result is a `PreTrainedTokenizerFast` that
`AutoTokenizer.from_pretrained(folder)` reloads offline. Training is deterministic: the same texts in the
same order give byte-identical tokenizer.json files.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from chatrex.errors import ConfigError

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
BASE_SPECIALS = (UNK, BOS, EOS)
# Printable ASCII minus the whitespace that Metaspace rewrites, plus the newline used in prompts.
ALPHABET = sorted(set(string.ascii_letters + string.digits + string.punctuation + "\n"))
DEFAULT_VOCAB_SIZE = 1000
_SPECIAL_TEXT = re.compile(r"</?(?:ground|objects)>|<obj\d+>|<image>|<objfeat>|<s>|</s>|<unk>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Any:
    """Train a BPE tokenizer on `texts` and return it as a `PreTrainedTokenizerFast` with the ChatRex tokens.

    Args:
        texts: training sentences (any iterable of str; order matters for byte-identical output).
        vocab_size: size of the BPE vocabulary before the 104 ChatRex tokens are appended
            (>= 3 specials + the alphabet).
    Returns:
        PreTrainedTokenizerFast: bos <s>, eos </s>, unk <unk>, no pad token (the processor pads with EOS),
        `len(tok) == vocab_size' + 104` where vocab_size' <= vocab_size (BPE may stop early on a small corpus).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from chatrex.model.processing import ensure_special_tokens

    minimum = len(BASE_SPECIALS) + len(ALPHABET)
    if vocab_size < minimum:
        raise ConfigError(f"vocab_size {vocab_size} is too small: the specials and the alphabet need {minimum}")
    # ChatRex tokens and sentinels must not become ordinary BPE tokens: they are added as specials below.
    texts = [_SPECIAL_TEXT.sub(" ", str(t)) for t in texts]
    if not texts:
        raise ConfigError("no training text given for the tokenizer")
    tok = Tokenizer(models.BPE(unk_token=UNK, fuse_unk=True))
    # Metaspace as in the fixture, then "▁" isolated: a word is the same token with or without the space
    # before it, so "red" in "detect red circle" and in "<ground>red circle</ground>" (no space after a
    # special token) share one id and answers copy question words exactly (see module docstring).
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Split("▁", behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size), special_tokens=list(BASE_SPECIALS), initial_alphabet=ALPHABET + ["▁"],
        min_frequency=2, show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, clean_up_tokenization_spaces=False,
    )
    ensure_special_tokens(fast)
    return fast


SPECIAL_TOKENS_MAP = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK}


def save_tokenizer(tokenizer: Any, folder: str | os.PathLike) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    # transformers 5 no longer writes this file; older loaders and the fixture's layout expect it.
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    specials = {k: dict(content=getattr(tokenizer, k), **entry) for k in SPECIAL_TOKENS_MAP if getattr(tokenizer, k)}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return folder


def prompt_corpus() -> list[str]:
    """Every prompt template of `chatrex.prompts`, with its placeholder filled by a few typical values."""
    from chatrex import prompts

    fills = ["<obj0>", "red circle", "blue square; green star", "the largest circle"]
    texts: list[str] = []
    for family in prompts.PROMPT_FAMILIES.values():
        for template in family:
            if prompts.PLACEHOLDER in template:
                texts.extend(prompts.render(template, value) for value in fills)
            else:
                texts.append(template)
    texts.append(prompts.GROUNDED_CONVERSATION_PREFIX)
    # The chat wrappers appear in every prompt: repeat them so BPE merges them into few tokens.
    texts.extend(["USER: " + t + " ASSISTANT:" for t in list(texts)])
    return texts


def world_corpus(num_scenes: int = 400, seed: int = 0) -> list[str]:
    """Questions and answers of `num_scenes` synthetic scenes (all task families), deterministic in `seed`."""
    import numpy as np

    from chatrex.data import instructions, synthetic

    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for i in range(num_scenes):
        scene = synthetic.sample_scene(synthetic.split_seed(seed, i, "train"))
        for sample in instructions.make_samples(scene, rng):
            texts.append(sample.question)
            texts.append(sample.answer)
    return texts


def build_world_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, num_scenes: int = 400, seed: int = 0,
                          extra_texts: Sequence[str] = ()) -> Any:
    """The shipped tiny model's tokenizer: BPE over the prompts + `num_scenes` scenes' questions/answers."""
    texts = prompt_corpus() + world_corpus(num_scenes, seed) + list(extra_texts)
    return train_tokenizer(texts, vocab_size)


__all__ = [
    "ALPHABET", "DEFAULT_VOCAB_SIZE", "build_world_tokenizer", "prompt_corpus", "save_tokenizer",
    "train_tokenizer", "world_corpus",
]
