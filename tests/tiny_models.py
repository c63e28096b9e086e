"""Tiny random ChatRex model folder + tiny UPN checkpoint for end-to-end tests (no fixtures, no network).

Use the session-scoped pytest fixtures from any test module:

    from tiny_models import tiny_chatrex_dir, tiny_upn_ckpt  # noqa: F401  (re-exported fixtures)

    def test_x(tiny_chatrex_dir, tiny_upn_ckpt): ...

or call `build_tiny_chatrex(folder)` / `build_tiny_upn(path)` directly. The MLLM folder holds what an
official ChatRex folder holds: config.json (`model_type="chatrex"`, tiny preset), model.safetensors,
tokenizer files (a byte-level BPE trained here in a few ms, with BOS <s>=1 / EOS </s>=2 and the 104
ChatRex special tokens) and processor_config.json. Weights are random but seeded, so every build gives
identical files. Both load with `ChatRex.from_pretrained(mllm=folder, upn=ckpt, upn_config="tiny")`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# Text the BPE merges are learned from: the task prompts, so prompts tokenize into few ids.
_CORPUS = [
    "USER: ASSISTANT: Please detect person; pigeon in this image. Answer the question with object indexes.",
    "What is the category name of? Answer the question with its category name in free format.",
    "Can you provide me with a short phrase to describe? Answer the question with a short phrase.",
    "Can you provide me with a brief description of? Answer the question with brief description.",
    "Please breifly describe this image in one sentence and detect all the mentioned objects.",
    "Answer the question in grounded format. What is the man doing? a brown dog is lying on a bed.",
]
BASE_VOCAB = 400  # + 104 ChatRex tokens <= 504 rows of the tiny preset's embedding


def build_tiny_tokenizer():
    """A fast tokenizer with <unk>=0, <s>=1 (BOS), </s>=2 (EOS) and the ChatRex special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from chatrex.constants import SPECIAL_TOKENS

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(_CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    return tok


def build_tiny_chatrex(folder: str | Path, seed: int = 0, script: str | None = None) -> Path:
    """Save a random tiny ChatRex (config, safetensors weights, tokenizer, processor config) to `folder`.

    `script`: make the model answer exactly this text (then EOS) to every prompt — see `script_answer`.
    """
    from chatrex.model import ChatRexConfig, ChatRexForConditionalGeneration
    from chatrex.model.processing import ChatRexProcessor

    folder = Path(folder)
    tokenizer = build_tiny_tokenizer()
    config = ChatRexConfig.from_name("tiny")
    assert len(tokenizer) <= config.text_config.vocab_size
    torch.manual_seed(seed)
    model = ChatRexForConditionalGeneration(config).eval()
    if script is not None:
        script_answer(model, tokenizer, script)
    model.save_pretrained(str(folder), safe_serialization=True)
    ChatRexProcessor(tokenizer, config).save_pretrained(folder)
    return folder


@torch.no_grad()
def script_answer(model, tokenizer, answer: str) -> list[int]:
    """Rewire a tiny Llama-style ChatRex so greedy decoding of ANY vicuna prompt yields `answer` + EOS.

    Every decoder layer's output projections are zeroed, so the last hidden state is the RMS-normed
    embedding of the current token alone: the LLM becomes a first-order chain. The prompt's last
    token (the ":" of " ASSISTANT:") and every answer token get orthogonal basis embeddings e_i, and
    `lm_head` row of token i+1 is 10 * e_i, so token i is followed by token i+1 with a logit of ~80
    against ~0.2 for everything else. Answer tokens must all differ (a chain cannot branch).
    Returns the chain ids. The vision towers and object encoder still run (and are unused).
    """
    last_prompt_id = tokenizer.encode(" ASSISTANT:", add_special_tokens=False)[-1]
    chain = [last_prompt_id, *tokenizer.encode(answer, add_special_tokens=False), tokenizer.eos_token_id]
    if len(set(chain)) != len(chain):
        raise ValueError(f"scripted answer {answer!r} repeats a token ({chain}); use distinct tokens")
    hidden = model.config.hidden_size
    if len(chain) > hidden:
        raise ValueError(f"scripted answer too long: {len(chain)} tokens > hidden size {hidden}")
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    embed = model.get_input_embeddings().weight
    basis = torch.eye(hidden, dtype=embed.dtype)
    for i, token in enumerate(chain):
        embed[token] = basis[i]
        if i + 1 < len(chain):
            model.lm_head.weight[chain[i + 1]] = 10.0 * basis[i]
    return chain


def build_tiny_upn(path: str | Path, seed: int = 0, calibrate: bool = True) -> Path:
    """Save a random tiny UPN in the reference `.pth` layout ({"model": state_dict}).

    Random prompts give fine-grained logits of +-20, so ~190 of 200 queries pass min_score 0.3 and
    every prompt would hit the 100-box limit. `calibrate=True` shrinks the fine prompt 10x and shifts
    the decoder norm bias so fine logits centre at -3 (coarse unchanged): ~10-25 fine and ~25 coarse
    proposals per image, like a real UPN. `calibrate=False` keeps the flood (to test the cap).
    """
    from chatrex.upn import UPN, UPNConfig
    from chatrex.upn.checkpoint import save_upn

    torch.manual_seed(seed)
    model = UPN(UPNConfig.from_name("tiny")).eval()
    if calibrate:
        with torch.no_grad():
            tr = model.transformer
            tr.fine_grained_prompt.weight.mul_(0.1)
            prompts = torch.cat([tr.fine_grained_prompt.weight, tr.coarse_grained_prompt.weight])  # (2, C)
            # bias b in span(prompts) with b . fine = -3 and b . coarse = 0 (logit = hs . prompt)
            coef = torch.linalg.solve(prompts @ prompts.T, torch.tensor([-3.0, 0.0]))
            tr.decoder.norm.bias.copy_(coef @ prompts)
    path = Path(path)
    save_upn(model, path)
    return path


@pytest.fixture(scope="session")
def tiny_chatrex_dir(tmp_path_factory) -> Path:
    return build_tiny_chatrex(tmp_path_factory.mktemp("tiny_chatrex") / "chatrex-tiny")


# What the scripted model answers to every question: one grounded span over boxes 0, 2 and 7.
SCRIPTED_ANSWER = "<ground>person</ground><objects><obj0><obj2><obj7></objects>"


@pytest.fixture(scope="session")
def scripted_chatrex_dir(tmp_path_factory) -> Path:
    """A tiny ChatRex folder whose model always answers `SCRIPTED_ANSWER` (deterministic end to end)."""
    return build_tiny_chatrex(tmp_path_factory.mktemp("scripted_chatrex") / "chatrex-scripted",
                              script=SCRIPTED_ANSWER)


@pytest.fixture(scope="session")
def tiny_upn_ckpt(tmp_path_factory) -> Path:
    return build_tiny_upn(tmp_path_factory.mktemp("tiny_upn") / "upn_tiny.pth")
