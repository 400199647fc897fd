"""The Swin Transformer backbone of BEN2 (shifted-window attention, four stages).

Module and parameter names follow the published checkpoint so that it loads with
``strict=True``. Attention runs through ``scaled_dot_product_attention`` with the relative
position bias (and, for shifted windows, the region mask) as an additive mask; the region
mask depends only on the padded resolution and is cached per resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Additive mask value between tokens of different regions of a shifted window; the published
# model was trained with -100 (not -inf), and exp(-100) is not exactly zero, so keep it.
_REGION_MASK_VALUE = -100.0


def window_partition(x: Tensor, window: int) -> Tensor:
    """(B, H, W, C) -> (B, nW, window*window, C); H and W are multiples of ``window``."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, -1, window * window, c)


def window_merge(windows: Tensor, window: int, h: int, w: int) -> Tensor:
    """(B, nW, window*window, C) -> (B, H, W, C): the inverse of ``window_partition``."""
    b, _, _, c = windows.shape
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def relative_position_index(window: int) -> Tensor:
    """(window², window²) int64: index into the (2·window−1)² relative-bias table."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    rel = rel + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_region_mask(
    hp: int, wp: int, *, window: int, shift: int, device: torch.device
) -> Tensor:
    """(nW, N, N) additive mask: 0 within a region of the rolled map, -100 across regions."""
    regions = torch.zeros((1, hp, wp, 1), device=device)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for ws in cuts:
            regions[:, hs, ws, :] = label
            label += 1
    labels = window_partition(regions, window).squeeze(-1).squeeze(0)  # (nW, N)
    diff = labels[:, None, :] - labels[:, :, None]
    return torch.where(diff != 0, _REGION_MASK_VALUE, 0.0)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, *, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        # Part of the published checkpoint, hence persistent; it is a pure function of the
        # window size and is checked against our own on load.
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def relative_bias(self) -> Tensor:
        """(heads, N, N) bias added to the attention logits."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: Tensor, region_mask: Tensor | None) -> Tensor:
        """x: (B, nW, N, C); region_mask: (nW, N, N) or None. Returns (B, nW, N, C)."""
        b, nw, n, c = x.shape
        qkv = self.qkv(x).view(b, nw, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each (B, nW, heads, N, hd)
        mask = self.relative_bias().to(q.dtype)
        if region_mask is not None:
            mask = mask.unsqueeze(0) + region_mask.unsqueeze(1).to(q.dtype)  # (nW, heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(2, 3).reshape(b, nw, n, c))


class SwinBlock(nn.Module):
    """One (shifted-)window transformer block: attention then MLP, both pre-norm residual."""

    def __init__(
        self, *, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, num_heads=num_heads, window=window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim=dim, hidden=int(dim * mlp_ratio))

    def forward(self, x: Tensor, region_mask: Tensor | None) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C). ``region_mask`` is used by shifted blocks only."""
        _, h, w, _ = x.shape
        y = self.norm1(x)
        # Pad to whole windows after the norm, as the published model does: the zero tokens
        # take part in attention (no padding mask), which the weights were trained with.
        pad_b, pad_r = (-h) % self.window, (-w) % self.window
        if pad_b or pad_r:
            y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.window), region_mask if self.shift else None)
        y = window_merge(y, self.window, hp, wp)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        if pad_b or pad_r:
            y = y[:, :h, :w, :]
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2×2 neighbourhood -> one token: (B, H, W, C) -> (B, ⌈H/2⌉, ⌈W/2⌉, 2C)."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        _, h, w, _ = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # Order (row, col) offsets (0,0), (1,0), (0,1), (1,1), as the checkpoint expects.
        x = torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1
        )
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """``depth`` blocks alternating plain and shifted windows, then optional patch merging."""

    def __init__(
        self,
        *,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        downsample: bool,
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = window // 2
        self.blocks = nn.ModuleList(
            SwinBlock(
                dim=dim,
                num_heads=num_heads,
                window=window,
                shift=0 if i % 2 == 0 else window // 2,
                mlp_ratio=mlp_ratio,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(dim=dim) if downsample else None
        self._mask_cache: dict[tuple[int, int, torch.device], Tensor] = {}

    def region_mask(self, h: int, w: int, device: torch.device) -> Tensor:
        """Cached (nW, N, N) shifted-window mask for an (h, w) map."""
        hp = -(-h // self.window) * self.window
        wp = -(-w // self.window) * self.window
        key = (hp, wp, device)
        mask = self._mask_cache.get(key)
        if mask is None:
            mask = shifted_window_region_mask(
                hp, wp, window=self.window, shift=self.shift, device=device
            )
            self._mask_cache[key] = mask
        return mask

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, H, W, C) -> (stage output (B, H, W, C), input of the next stage)."""
        mask = self.region_mask(x.shape[1], x.shape[2], x.device)
        for block in self.blocks:
            x = block(x, mask)
        return x, (self.downsample(x) if self.downsample is not None else x)


class PatchEmbed(nn.Module):
    """``patch``×``patch`` strided convolution, then LayerNorm: (B,3,H,W) -> (B,H/p,W/p,C)."""

    def __init__(self, *, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % self.patch or w % self.patch:
            x = F.pad(x, (0, (-w) % self.patch, 0, (-h) % self.patch))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class SwinBackbone(nn.Module):
    """Swin Transformer returning five feature maps, all (B, C_i, H_i, W_i):

    the patch embedding (C, H/4) and the normed output of each stage (C·2^i, H/4/2^i).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        window: int,
        mlp_ratio: float,
        patch: int = 4,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(patch=patch, dim=embed_dim)
        n = len(depths)
        self.layers = nn.ModuleList(
            SwinStage(
                dim=embed_dim * 2**i,
                depth=depths[i],
                num_heads=num_heads[i],
                window=window,
                mlp_ratio=mlp_ratio,
                downsample=i < n - 1,
            )
            for i in range(n)
        )
        for i in range(n):
            self.add_module(f"norm{i}", nn.LayerNorm(embed_dim * 2**i))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.patch_embed(x)
        outs = [x.permute(0, 3, 1, 2)]
        for i, stage in enumerate(self.layers):
            y, x = stage(x)
            outs.append(getattr(self, f"norm{i}")(y).permute(0, 3, 1, 2))
        return outs
