"""UPN's deformable transformer: encoder, two-stage query selection, decoder with box refinement.

Follows upn_reference.md §1.5-1.9. State-dict names match the reference `transformer.*` layout.
Shapes use B = batch, S = encoder tokens over all levels, L = levels, K = selected queries,
C = d_model. Every tensor is batch-first here (the reference decoder is sequence-first; same numbers).
Nothing is pinned to float32: grids, ratios and embeddings follow the dtype of the features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from chatrex.ops.boxes import box_cxcywh_to_xyxy, nms
from chatrex.ops.msda import MultiScaleDeformableAttention
from chatrex.ops.position import box_sine_embedding
from chatrex.upn.config import UPNConfig

# Rows per FFN chunk on long token sequences: bounds the (rows, d_ffn) hidden activation
# (the large encoder has ~75k tokens; 16k rows × 2048 × 4 B = 128 MiB instead of 600 MiB).
_FFN_CHUNK = 16384


class MLP(nn.Module):
    """Linear layers with ReLU between them (none after the last); keys `layers.{i}`."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms clamped to >= eps (reference: 1e-3)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _chunked_ffn(x: Tensor, linear1: nn.Linear, linear2: nn.Linear) -> Tensor:
    """linear2(relu(linear1(x))) over (B, T, C), in row chunks when T is large (peak memory)."""
    if x.shape[1] <= _FFN_CHUNK:
        return linear2(F.relu(linear1(x)))
    return torch.cat([linear2(F.relu(linear1(c))) for c in x.split(_FFN_CHUNK, dim=1)], dim=1)


class EncoderLayer(nn.Module):
    """Post-norm: src = LN1(src + MSDA(src + pos, ref, src)); src = LN2(src + FFN(src))."""

    def __init__(self, cfg: UPNConfig) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(cfg.d_model, cfg.n_levels, cfg.n_heads, cfg.n_points)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.linear1 = nn.Linear(cfg.d_model, cfg.d_ffn)
        self.linear2 = nn.Linear(cfg.d_ffn, cfg.d_model)
        self.norm2 = nn.LayerNorm(cfg.d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor) -> Tensor:
        """src, pos (B, S, C); reference_points (B, S, L, 2); padding_mask (B, S) True = pad."""
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + attn)
        return self.norm2(src + _chunked_ffn(src, self.linear1, self.linear2))


def encoder_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor) -> Tensor:
    """Pixel centres of every level, normalized to the valid region, then scaled by every level's ratio.

    spatial_shapes (L, 2) [H, W]; valid_ratios (B, L, 2) [w, h] -> (B, S, L, 2) normalized (x, y).
    """
    dtype, device = valid_ratios.dtype, valid_ratios.device
    points = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype, device=device) + 0.5,
                                torch.arange(w, dtype=dtype, device=device) + 0.5, indexing="ij")
        ref_y = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)  # (B, H·W)
        ref_x = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    ref = torch.cat(points, 1)  # (B, S, 2)
    return ref[:, :, None] * valid_ratios[:, None]


class Encoder(nn.Module):
    """A stack of `EncoderLayer`s over the flattened multi-level tokens (keys `layers.{i}`)."""

    def __init__(self, cfg: UPNConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))

    def forward(self, src: Tensor, pos: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                valid_ratios: Tensor, padding_mask: Tensor) -> Tensor:
        """src, pos (B, S, C) -> memory (B, S, C)."""
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DecoderLayer(nn.Module):
    """Post-norm: self-attention (LN2) → deformable cross-attention (LN1) → FFN (LN3)."""

    def __init__(self, cfg: UPNConfig) -> None:
        super().__init__()
        self.cross_attn = MultiScaleDeformableAttention(cfg.d_model, cfg.n_levels, cfg.n_heads, cfg.n_points)
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.self_attn = nn.MultiheadAttention(cfg.d_model, cfg.n_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.linear1 = nn.Linear(cfg.d_model, cfg.d_ffn)
        self.linear2 = nn.Linear(cfg.d_ffn, cfg.d_model)
        self.norm3 = nn.LayerNorm(cfg.d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                memory_mask: Tensor, spatial_shapes: Tensor, level_start_index: Tensor) -> Tensor:
        """tgt, query_pos (B, K, C); reference_points (B, K, L, 4) cxcywh; memory (B, S, C)."""
        q = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes,
                               level_start_index, memory_mask)
        tgt = self.norm1(tgt + attn)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Decoder(nn.Module):
    """Decoder with iterative box refinement; the box MLP is ONE module shared by every layer.

    `bbox_embed` is a ModuleList holding the same MLP `dec_layers` times, so the state dict lists it
    under `bbox_embed.{i}` for every i (the reference layout); UPN aliases it at the top level too.
    `ref_point_head_point` only exists for the checkpoint layout (its reference contribution is ×0).
    """

    def __init__(self, cfg: UPNConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(d)
        self.ref_point_head = MLP(2 * d, d, d, 2)  # sine of (x, y, w, h): 4 × d/2 features
        self.ref_point_head_point = MLP(d, d, d, 2)
        box_head = MLP(d, d, 4, 3)
        self.bbox_embed = nn.ModuleList([box_head] * cfg.dec_layers)
        self.num_pos_feats = d // 2

    def forward(self, tgt: Tensor, memory: Tensor, memory_mask: Tensor, refpoints_unsig: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor,
                valid_ratios: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """tgt (B, K, C) content queries; refpoints_unsig (B, K, 4) cxcywh in logit space.

        Returns hs (dec_layers × (B, K, C), after the final LN) and references
        (dec_layers + 1 × (B, K, 4) sigmoid space; entry t is the input box of layer t).
        """
        ref = refpoints_unsig.sigmoid()
        references, hs = [ref], []
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        for i, layer in enumerate(self.layers):
            ref_in = ref[:, :, None] * ratios  # (B, K, L, 4)
            sine = box_sine_embedding(ref_in[:, :, 0], num_pos_feats=self.num_pos_feats)  # (B, K, 2C)
            query_pos = self.ref_point_head(sine)
            tgt = layer(tgt, query_pos, ref_in, memory, memory_mask, spatial_shapes, level_start_index)
            # Refinement uses the un-normalized layer output (the heads outside use the normalized one).
            new_ref = (self.bbox_embed[i](tgt) + inverse_sigmoid(ref)).sigmoid()
            ref = new_ref.detach()
            references.append(new_ref)
            hs.append(self.norm(tgt))
        return hs, references


def encoder_output_proposals(memory: Tensor, mask_flatten: Tensor,
                             spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
    """Anchor per token and the memory with padded/invalid tokens zeroed.

    Token (l, i, j) gets cx = (j+0.5)/valid_W_l, cy = (i+0.5)/valid_H_l, w = h = 0.05·2^l; it is valid
    iff all four lie in (0.01, 0.99). Returns (output_memory (B, S, C), proposals (B, S, 4) in logit
    space with +inf on padded or invalid tokens). Such tokens are NOT excluded from top-k later.
    """
    B = memory.shape[0]
    dtype, device = memory.dtype, memory.device
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        mask = mask_flatten[:, start:start + h * w].view(B, h, w)
        valid_h = (~mask[:, :, 0]).sum(1)
        valid_w = (~mask[:, 0, :]).sum(1)
        gy, gx = torch.meshgrid(torch.arange(h, dtype=dtype, device=device),
                                torch.arange(w, dtype=dtype, device=device), indexing="ij")
        grid = torch.stack([gx, gy], -1)  # (H, W, 2) [x, y]
        scale = torch.stack([valid_w, valid_h], 1).view(B, 1, 1, 2)
        grid = (grid[None].expand(B, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
        proposals.append(torch.cat((grid, wh), -1).view(B, -1, 4))
        start += h * w
    props = torch.cat(proposals, 1)
    valid = ((props > 0.01) & (props < 0.99)).all(-1, keepdim=True)
    props = torch.log(props / (1 - props))
    invalid = mask_flatten.unsqueeze(-1) | ~valid  # (B, S, 1)
    props = props.masked_fill(invalid, float("inf"))
    output_memory = memory.masked_fill(invalid, 0.0)
    return output_memory, props


PROMPT_TYPES = ("fine_grained_prompt", "coarse_grained_prompt")


class DeformableTransformer(nn.Module):
    """Parameters of the transformer half of UPN (`transformer.*` keys) and its three steps:
    `encoder`, `prepare_selection` + `select` (two-stage top-k), `decoder`.
    """

    def __init__(self, cfg: UPNConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.num_queries = cfg.num_queries
        self.query_nms = float(cfg.query_nms)
        self.level_embed = nn.Parameter(torch.empty(cfg.n_levels, d))
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.tgt_embed = nn.Embedding(cfg.num_queries, d)  # content queries, the same for every image
        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.enc_out_bbox_embed = MLP(d, d, 4, 3)  # a separate copy, not shared with the decoder
        self.fine_grained_prompt = nn.Embedding(1, d)
        self.coarse_grained_prompt = nn.Embedding(1, d)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Training-time init like the reference: xavier for matrices, MSDA grids, N(0,1) level embed,
        zero last box-MLP layers (so the first boxes equal the anchors)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        nn.init.normal_(self.fine_grained_prompt.weight)
        nn.init.normal_(self.coarse_grained_prompt.weight)
        for head in (self.decoder.bbox_embed[0], self.enc_out_bbox_embed):
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)

    def prompt(self, prompt_type: str) -> Tensor:
        """The (C,) prompt vector; ValueError for anything but the two known prompt types."""
        if prompt_type == "fine_grained_prompt":
            return self.fine_grained_prompt.weight[0]
        if prompt_type == "coarse_grained_prompt":
            return self.coarse_grained_prompt.weight[0]
        raise ValueError(f"unknown prompt_type {prompt_type!r}; use one of {PROMPT_TYPES}")

    def prepare_selection(self, memory: Tensor, mask_flatten: Tensor,
                          spatial_shapes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Prompt-independent part of the two-stage selection.

        Returns (output_memory (B, S, C) = LN(Linear(memory with pads zeroed)),
        enc_coords (B, S, 4) anchor + box delta in logit space (+inf on padded/invalid tokens),
        proposals (B, S, 4) the anchors alone in logit space).
        """
        output_memory, proposals = encoder_output_proposals(memory, mask_flatten, spatial_shapes)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        enc_coords = self.enc_out_bbox_embed(output_memory) + proposals
        return output_memory, enc_coords, proposals

    def select(self, output_memory: Tensor, enc_coords: Tensor, prompt: Tensor,
               topk_indices: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Score every token by `prompt` and keep the top min(num_queries, S) (torch.topk, sorted); with
        ``query_nms`` > 0 the distinct tokens first (:func:`distinct_topk`).

        topk_indices (B, K) int64, K <= num_queries, replaces the computed selection when given
        (parity/debugging: near-ties make the order fragile). Returns (enc_logits (B, S),
        topk_indices (B, K), refpoints_unsig (B, K, 4) detached, logit space).
        """
        enc_logits = (output_memory @ prompt[:, None]).squeeze(-1)  # (B, S); one prompt → max is a no-op
        if topk_indices is None:
            k = min(self.num_queries, enc_logits.shape[1])
            if self.query_nms > 0:
                topk_indices = distinct_topk(enc_logits, enc_coords, k, self.query_nms)
            else:
                topk_indices = torch.topk(enc_logits, k, dim=1)[1]
        elif topk_indices.dim() != 2 or topk_indices.shape[1] > self.num_queries:
            raise ValueError(f"topk_indices must be (B, K) with K <= {self.num_queries}, "
                             f"got {tuple(topk_indices.shape)}")
        gather_idx = topk_indices.unsqueeze(-1).expand(-1, -1, 4)
        refpoints_unsig = torch.gather(enc_coords, 1, gather_idx).detach()
        return enc_logits, topk_indices, refpoints_unsig

    def content_queries(self, batch_size: int, k: int) -> Tensor:
        """(B, K, C): the first K learned content embeddings, identical for every image."""
        return self.tgt_embed.weight[:k].unsqueeze(0).expand(batch_size, -1, -1)


@torch.no_grad()
def distinct_topk(logits: Tensor, coords: Tensor, k: int, iou_threshold: float, pool_factor: int = 4) -> Tensor:
    """Top-k token selection that skips near-copies (``UPNConfig.query_nms`` > 0).

    Of the ``pool_factor · k`` best tokens, a greedy NMS at ``iou_threshold`` over their proposal boxes
    (``sigmoid(coords)``) keeps the distinct ones, best first; the suppressed (and invalid, non-finite)
    tokens follow by score to fill the k slots. logits (B, S); coords (B, S, 4) logit-space cxcywh.
    Returns (B, k) int64. Distinct starting boxes let the decoder spend its queries on distinct objects
    instead of having to learn to silence duplicates.
    """
    B, S = logits.shape
    pool = min(S, pool_factor * k)
    cand = torch.topk(logits, pool, dim=1)[1]  # (B, pool), best first
    out = []
    for b in range(B):
        c = cand[b]
        box_logits = coords[b, c].float()
        finite = torch.isfinite(box_logits).all(-1)
        fin_idx = torch.nonzero(finite).squeeze(1)
        boxes = box_cxcywh_to_xyxy(box_logits[fin_idx].sigmoid())
        # Candidates are already sorted, so descending rank = descending score (ties stay stable).
        rank = -torch.arange(fin_idx.numel(), dtype=torch.float32, device=logits.device)
        kept = fin_idx[nms(boxes, rank, iou_threshold)]
        chosen = torch.zeros(pool, dtype=torch.bool, device=logits.device)
        chosen[kept] = True
        order = torch.cat([kept, torch.nonzero(~chosen).squeeze(1)])[:k]
        out.append(c[order])
    return torch.stack(out)
