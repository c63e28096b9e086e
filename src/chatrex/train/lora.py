"""A minimal built-in LoRA for the LLM's linear layers (no peft dependency): wrap, train, merge for export."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from chatrex.errors import ConfigError


class LoRALinear(nn.Module):
    """`base(x) + (alpha / r) * B(A(x))` with the base Linear frozen; B starts at zero (identity at init)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.base.weight._lora_frozen = True  # set_trainable keeps it frozen in stage 2
        if self.base.bias is not None:
            self.base.bias._lora_frozen = True
        self.lora_a = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = float(alpha) / float(r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear with the adapter folded into its weight (for export)."""
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        del self.base.weight._lora_frozen
        return self.base


def apply_lora(model: nn.Module, r: int, alpha: float, target_modules: Sequence[str]) -> int:
    """Wrap the LLM's (`model.model`) Linear layers whose name ends with one of `target_modules`.

    A minimal built-in LoRA (no extra dependency); `merge_lora` folds it back before export.
    Returns how many layers were wrapped (ConfigError when none matched).
    """
    llm = model.get_decoder()
    targets = [(name, mod) for name, mod in llm.named_modules()
               if isinstance(mod, nn.Linear) and name.split(".")[-1] in set(target_modules)]
    if not targets:
        raise ConfigError(f"lora.target_modules {list(target_modules)} matched no Linear layer of the LLM "
                          "(Llama/Qwen2 names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    for name, mod in targets:
        parent = llm.get_submodule(name.rsplit(".", 1)[0]) if "." in name else llm
        setattr(parent, name.split(".")[-1], LoRALinear(mod, int(r), float(alpha)))
    return len(targets)


def merge_lora(model: nn.Module) -> int:
    """Replace every `LoRALinear` by its merged Linear (in place); returns how many were merged."""
    wrapped = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, LoRALinear)]
    for name, mod in wrapped:
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.split(".")[-1], mod.merged())
    return len(wrapped)


__all__ = ["LoRALinear", "apply_lora", "merge_lora"]
