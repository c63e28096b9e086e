"""`UPN`: Swin backbone + deformable two-stage DETR that returns K proposal boxes with one logit each.

Tensors in, tensors out (no files, devices or prints). `forward` = `encode` (prompt-independent:
backbone, projections, encoder, proposal scoring inputs) + `decode` (prompt-dependent: top-k
selection, decoder, heads), so a predictor can run both prompts on one encoding.

State-dict layout is the reference one (upn_reference.md §2): `backbone.model.backbone.*`,
`input_proj.*`, `transformer.*`, `bbox_embed.*` (the shared box MLP, aliased with
`transformer.decoder.bbox_embed`).

When an image gives fewer encoder tokens S than `num_queries`, the model keeps K = min(S, Q) queries
(the reference crashes); outputs are then (B, K, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatrex.ops.position import sine_position_embedding_2d
from chatrex.upn.config import UPNConfig
from chatrex.upn.swin import SwinTransformer
from chatrex.upn.transformer import PROMPT_TYPES, DeformableTransformer, inverse_sigmoid

__all__ = ["PROMPT_TYPES", "UPN", "UPNEncoding", "UPNOutput"]


class _DictLike:
    """Mixin: dataclass fields reachable as `out["name"]`; `keys()` lists the fields that are set."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.keys()}


@dataclass
class UPNEncoding(_DictLike):
    """Prompt-independent results of `UPN.encode` (S = tokens over all levels, C = d_model).

    memory (B, S, C) encoder output; mask_flatten (B, S) True = padding; spatial_shapes (L, 2) int64
    [H, W]; level_start_index (L,); valid_ratios (B, L, 2) [w, h]; output_memory (B, S, C) selection
    features; enc_coords (B, S, 4) logit-space boxes per token; proposals (B, S, 4) logit-space
    anchors (+inf on padded/invalid tokens). With `return_intermediates`: backbone_features (list of
    (B, C_i, H_i, W_i)), pos_embeds (list of (B, C, H_l, W_l)), src_flatten and lvl_pos_embed (B, S, C).
    """

    memory: Tensor
    mask_flatten: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    output_memory: Tensor
    enc_coords: Tensor
    proposals: Tensor
    backbone_features: list[Tensor] | None = None
    pos_embeds: list[Tensor] | None = None
    src_flatten: Tensor | None = None
    lvl_pos_embed: Tensor | None = None


@dataclass
class UPNOutput(_DictLike):
    """UPN result; `out.pred_logits` and `out["pred_logits"]` both work.

    pred_logits (B, K, 1) raw logits; pred_boxes (B, K, 4) cxcywh normalized to each image's valid
    (unpadded) region; topk_indices (B, K) the encoder tokens chosen for the K query slots.
    With `return_intermediates`: enc_topk_logits (B, S) selection score of every token;
    init_refpoint_unsig (B, K, 4); dec_references (dec_layers+1, B, K, 4) sigmoid space;
    per_layer_boxes (dec_layers, B, K, 4); per_layer_logits (dec_layers, B, K, 1);
    hs (dec_layers, B, K, C) normalized decoder outputs; encoding (`UPNEncoding`).
    """

    pred_logits: Tensor
    pred_boxes: Tensor
    topk_indices: Tensor | None = None
    enc_topk_logits: Tensor | None = None
    init_refpoint_unsig: Tensor | None = None
    dec_references: Tensor | None = None
    per_layer_boxes: Tensor | None = None
    per_layer_logits: Tensor | None = None
    hs: Tensor | None = None
    encoding: UPNEncoding | None = None


class _Scope(nn.Module):
    """An empty module level that only reproduces the reference key prefix (`backbone.model.*`)."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, H, W) bool -> (B, h, w) bool by PyTorch 'nearest' (floor(dst·in/out) with a float32 scale).

    Deliberately the reference rule (not 'nearest-exact'): it can over-count valid rows by one, and
    these masks define valid ratios, position embeddings and padding masks downstream.
    """
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


def valid_ratios_from_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, H, W) bool -> (B, 2) [valid_W / W, valid_H / H] counted on row 0 / column 0."""
    _, H, W = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).to(dtype)
    valid_w = (~mask[:, 0, :]).sum(1).to(dtype)
    return torch.stack([valid_w / W, valid_h / H], -1)


class UPN(nn.Module):
    """Universal Proposal Network. See `forward` for the contract."""

    def __init__(self, config: UPNConfig) -> None:
        super().__init__()
        self.config = config
        swin = SwinTransformer(config.embed_dim, config.depths, config.num_heads, config.window_size,
                               patch_size=config.patch_size, mlp_ratio=config.mlp_ratio,
                               out_indices=config.out_indices)
        self.backbone = _Scope(model=_Scope(backbone=swin))
        self.input_proj = self._build_input_proj(config, [swin.num_features[i] for i in config.out_indices])
        self.transformer = DeformableTransformer(config)
        self.bbox_embed = self.transformer.decoder.bbox_embed  # same modules: reference alias layout

    @staticmethod
    def _build_input_proj(cfg: UPNConfig, in_dims: list[int]) -> nn.ModuleList:
        """1×1 conv + GN per backbone level; 3×3/s2 conv + GN for every extra level (the first extra
        one reads the raw last backbone map, later ones the previous projected level)."""
        d = cfg.d_model
        projs = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(cfg.gn_groups, d)) for c in in_dims]
        for lvl in range(len(in_dims), cfg.n_levels):
            c = in_dims[-1] if lvl == len(in_dims) else d
            projs.append(nn.Sequential(nn.Conv2d(c, d, kernel_size=3, stride=2, padding=1),
                                       nn.GroupNorm(cfg.gn_groups, d)))
        for proj in projs:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        return nn.ModuleList(projs)

    @property
    def swin(self) -> SwinTransformer:
        return self.backbone.model.backbone

    # ------------------------------------------------------------------ encode
    def _levels(self, pixel_values: Tensor, pixel_mask: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Backbone maps, projected levels (B, C, H_l, W_l) and their masks (B, H_l, W_l)."""
        feats = self.swin(pixel_values)
        srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
        for lvl in range(len(feats), self.config.n_levels):
            # The 5th level reads the raw (LN-normed) last Swin map, not the projected one.
            srcs.append(self.input_proj[lvl](feats[-1] if lvl == len(feats) else srcs[-1]))
        masks = [resize_mask(pixel_mask, tuple(s.shape[-2:])) for s in srcs]
        return feats, srcs, masks

    def encode(self, pixel_values: Tensor, pixel_mask: Tensor, return_intermediates: bool = False) -> UPNEncoding:
        """Prompt-independent half: (B, 3, H, W) normalized pixels + (B, H, W) bool mask (True = pad)."""
        _check_inputs(pixel_values, pixel_mask)
        feats, srcs, masks = self._levels(pixel_values, pixel_mask)
        dtype = srcs[0].dtype
        pos = [sine_position_embedding_2d(m, num_pos_feats=self.config.d_model // 2, dtype=dtype) for m in masks]
        src_flatten = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # (B, S, C)
        mask_flatten = torch.cat([m.flatten(1) for m in masks], 1)  # (B, S)
        level_embed = self.transformer.level_embed
        lvl_pos = torch.cat([p.flatten(2).transpose(1, 2) + level_embed[lvl].view(1, 1, -1)
                             for lvl, p in enumerate(pos)], 1)
        spatial_shapes = torch.tensor([list(s.shape[-2:]) for s in srcs], dtype=torch.long, device=src_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([valid_ratios_from_mask(m, dtype) for m in masks], 1)  # (B, L, 2)
        memory = self.transformer.encoder(src_flatten, lvl_pos, spatial_shapes, level_start_index,
                                          valid_ratios, mask_flatten)
        output_memory, enc_coords, proposals = self.transformer.prepare_selection(memory, mask_flatten, spatial_shapes)
        enc = UPNEncoding(memory, mask_flatten, spatial_shapes, level_start_index, valid_ratios,
                          output_memory, enc_coords, proposals)
        if return_intermediates:
            enc.backbone_features, enc.pos_embeds = feats, pos
            enc.src_flatten, enc.lvl_pos_embed = src_flatten, lvl_pos
        return enc

    # ------------------------------------------------------------------ decode
    def decode(self, encoding: UPNEncoding, prompt_type: str, topk_indices: Tensor | None = None,
               return_intermediates: bool = False) -> UPNOutput:
        """Prompt-dependent half: top-k selection, decoder with refinement, heads on the last layer."""
        tr = self.transformer
        prompt = tr.prompt(prompt_type)
        enc_logits, topk_indices, refpoints = tr.select(encoding.output_memory, encoding.enc_coords,
                                                        prompt, topk_indices)
        B, K = topk_indices.shape
        hs, references = tr.decoder(tr.content_queries(B, K), encoding.memory, encoding.mask_flatten,
                                    refpoints, encoding.spatial_shapes, encoding.level_start_index,
                                    encoding.valid_ratios)
        last = len(hs) - 1
        if not return_intermediates:
            boxes = (self.bbox_embed[last](hs[last]) + inverse_sigmoid(references[last])).sigmoid()
            return UPNOutput(pred_logits=hs[last] @ prompt[:, None], pred_boxes=boxes, topk_indices=topk_indices)
        # Heads read the normalized hs; box of layer t refines that layer's input reference.
        boxes = torch.stack([(self.bbox_embed[t](h) + inverse_sigmoid(references[t])).sigmoid()
                             for t, h in enumerate(hs)])
        logits = torch.stack([h @ prompt[:, None] for h in hs])
        return UPNOutput(pred_logits=logits[-1], pred_boxes=boxes[-1], topk_indices=topk_indices,
                         enc_topk_logits=enc_logits, init_refpoint_unsig=refpoints,
                         dec_references=torch.stack(references), per_layer_boxes=boxes,
                         per_layer_logits=logits, hs=torch.stack(hs), encoding=encoding)

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor, prompt_type: str,
                topk_indices: Tensor | None = None, return_intermediates: bool = False) -> UPNOutput:
        """Propose boxes for a padded batch.

        pixel_values (B, 3, H, W) ImageNet-normalized, zero-padded bottom/right; pixel_mask (B, H, W)
        bool, True on padding; prompt_type "fine_grained_prompt" or "coarse_grained_prompt" (anything
        else → ValueError). topk_indices (B, K) optionally replaces the top-k selection.
        Returns `UPNOutput` with pred_logits (B, K, 1) raw logits and pred_boxes (B, K, 4) cxcywh in
        [0, 1] of each image's valid region, K = min(num_queries, S). Results for an image depend on the
        other images in the batch through the padding (the backbone ignores the mask, as the reference).
        """
        self.transformer.prompt(prompt_type)  # validate before any heavy work
        encoding = self.encode(pixel_values, pixel_mask, return_intermediates)
        return self.decode(encoding, prompt_type, topk_indices, return_intermediates)


def _check_inputs(pixel_values: Tensor, pixel_mask: Tensor) -> None:
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
    expected = (pixel_values.shape[0], *pixel_values.shape[2:])
    if pixel_mask.dtype != torch.bool or tuple(pixel_mask.shape) != expected:
        raise ValueError(f"pixel_mask must be a bool tensor of shape {expected} (True = padding), "
                         f"got {pixel_mask.dtype} {tuple(pixel_mask.shape)}")
