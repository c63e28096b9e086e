"""Swin Transformer backbone (shifted-window attention), as UPN uses it for detection.

Numerically it follows the reference detection Swin (upn_reference.md §1.2), quirks included:
- the image padding mask is ignored: padded (mean-colour) pixels enter the windows;
- after LN1 every block zero-pads its map to window multiples and does NOT mask those zeros;
- odd blocks shift by window//2 even when the map is smaller than one window.
State-dict names match the reference (`patch_embed.*`, `layers.{s}.blocks.{i}.*`,
`layers.{s}.downsample.*`, `norm{i}.*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _relative_position_index(window_size: int) -> Tensor:
    """(N, N) int64 with N = ws²: (Δy + ws-1)·(2ws-1) + (Δx + ws-1), Δ = query - key coordinates."""
    ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + window_size - 1) * (2 * window_size - 1) + (rel[1] + window_size - 1)


def window_partition(x: Tensor, ws: int) -> Tensor:
    """(B, Hp, Wp, C) -> (B·nW, ws·ws, C); windows row-major, tokens row-major inside a window."""
    B, Hp, Wp, C = x.shape
    x = x.view(B, Hp // ws, ws, Wp // ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, C)


def window_reverse(windows: Tensor, ws: int, Hp: int, Wp: int) -> Tensor:
    """Inverse of `window_partition`: (B·nW, ws·ws, C) -> (B, Hp, Wp, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, Hp // ws, Wp // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, Hp, Wp, C)


def shifted_window_mask(Hp: int, Wp: int, ws: int, shift: int, dtype: torch.dtype,
                        device: torch.device) -> Tensor:
    """Additive mask (nW, N, N) for shifted windows: -100 between tokens of different regions.

    Regions are the 3×3 grid of slices [0, P-ws) / [P-ws, P-shift) / [P-shift, P) on the padded map,
    i.e. the pieces that the cyclic roll glued together.
    """
    labels = torch.zeros(1, Hp, Wp, 1, device=device)
    slices = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    count = 0
    for hs in slices:
        for wsl in slices:
            labels[:, hs, wsl, :] = count
            count += 1
    windows = window_partition(labels, ws).squeeze(-1)  # (nW, N)
    diff = windows[:, None, :] - windows[:, :, None]  # (nW, N, N)
    return torch.zeros(diff.shape, dtype=dtype, device=device).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias."""

    def __init__(self, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        # Persistent so reference state dicts load strictly; deterministic, so a missing entry is
        # filled in by `_load_from_state_dict` below.
        self.register_buffer("relative_position_index", _relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        # load_state_dict works on a copy of the caller's dict, so this does not mutate it.
        state_dict.setdefault(prefix + "relative_position_index", self.relative_position_index.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B·nW, N, C); mask (nW, N, N) additive or None -> (B·nW, N, C)."""
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]  # each (B·nW, heads, N, hd)
        attn = q @ k.transpose(-2, -1)  # (B·nW, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(Bw // nW, nW, self.num_heads, N, N) + mask[None, :, None]
            attn = attn.view(Bw, self.num_heads, N, N)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(Bw, N, C)
        return self.proj(x)


class Mlp(nn.Module):
    """Linear(C→hidden) → exact GELU → Linear(hidden→C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """Pre-norm block: x + WMSA(LN1(x)), then x + MLP(LN2(x)). Shifted when shift_size > 0."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, H: int, W: int, shift_mask: Tensor | None) -> Tensor:
        """x (B, H·W, C) -> (B, H·W, C). shift_mask (nW, N, N) is used only by shifted blocks."""
        B, L, C = x.shape
        ws, shift = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        # Zero-pad (after LN1) to window multiples; the zeros are attended to, like the reference.
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = self.attn(window_partition(x, ws), shift_mask if shift > 0 else None)
        x = window_reverse(windows, ws, Hp, Wp)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = shortcut + x[:, :H, :W, :].reshape(B, H * W, C)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2×2 neighbourhood merge: (B, H·W, C) -> (B, ceil(H/2)·ceil(W/2), 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        B, L, C = x.shape
        x = F.pad(x.view(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))
        # Order (even row, even col), (odd row, even col), (even row, odd col), (odd row, odd col).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class SwinStage(nn.Module):
    """`depth` blocks alternating regular / shifted windows, then an optional PatchMerging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 downsample: bool) -> None:
        super().__init__()
        self.window_size, self.shift_size = window_size, window_size // 2
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift_size, mlp_ratio)
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: Tensor, H: int, W: int) -> tuple[Tensor, Tensor | None]:
        """x (B, H·W, C) -> (stage output (B, H·W, C), merged (B, H'·W', 2C) or None)."""
        ws = self.window_size
        Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
        mask = None
        if self.shift_size > 0 and len(self.blocks) > 1:
            mask = shifted_window_mask(Hp, Wp, ws, self.shift_size, x.dtype, x.device)
        for block in self.blocks:
            x = block(x, H, W, mask)
        merged = self.downsample(x, H, W) if self.downsample is not None else None
        return x, merged


class PatchEmbed(nn.Module):
    """Zero-pad to a multiple of the patch size, Conv(k=s=patch), LN: (B,3,H,W) -> (B, H1·W1, C)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        p = self.patch_size
        H, W = x.shape[-2:]
        x = F.pad(x, (0, (p - W % p) % p, 0, (p - H % p) % p))
        x = self.proj(x)  # (B, C, H1, W1)
        H1, W1 = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H1, W1


class SwinTransformer(nn.Module):
    """Swin backbone returning the LN-normed maps of `out_indices` stages, each (B, C_i, H_i, W_i).

    Stage i has `embed_dim·2^i` channels at stride `patch_size·2^i`; H_i = ceil(H_{i-1}/2).
    """

    def __init__(self, embed_dim: int, depths: tuple[int, ...], num_heads: tuple[int, ...],
                 window_size: int, patch_size: int = 4, mlp_ratio: float = 4.0,
                 out_indices: tuple[int, ...] = (0, 1, 2, 3), in_chans: int = 3) -> None:
        super().__init__()
        self.out_indices = tuple(out_indices)
        self.num_features = [embed_dim * 2**i for i in range(len(depths))]
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.layers = nn.ModuleList(
            SwinStage(self.num_features[i], depths[i], num_heads[i], window_size, mlp_ratio,
                      downsample=i < len(depths) - 1)
            for i in range(len(depths))
        )
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(_init_linear)

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        """pixel_values (B, 3, H, W) -> [(B, C_i, H_i, W_i) for i in out_indices]. No mask is used."""
        x, H, W = self.patch_embed(pixel_values)
        outs = []
        for i, stage in enumerate(self.layers):
            x_out, merged = stage(x, H, W)
            if i in self.out_indices:
                y = getattr(self, f"norm{i}")(x_out)
                outs.append(y.view(-1, H, W, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
            if merged is not None:
                x, H, W = merged, (H + 1) // 2, (W + 1) // 2
        return outs


def _init_linear(module: nn.Module) -> None:
    # Training-time init only (trunc-normal 0.02 linears, like the reference); loading replaces it.
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
