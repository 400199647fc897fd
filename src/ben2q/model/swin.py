"""The Swin Transformer backbone of BEN2 (shifted-window attention, four stages).

Module and parameter names follow the published checkpoint so that it loads with
``strict=True``.

Attention runs through ``scaled_dot_product_attention`` on 4-D (windows, heads, N, head_dim)
tensors, which selects PyTorch's fused (flash) CPU kernel; 5-D inputs or a mask that does not
broadcast would fall back to the unfused math kernel (several times slower, and it
materialises every attention matrix). The additive mask is the relative position bias,
(heads, N, N), plus, in shifted blocks, the region mask of the rolled map. The region mask
differs between windows, but only between four groups of them (interior windows, the last
window column, the last window row, the corner window: see ``window_groups``), so the
windows are laid out group by group and each group gets one SDPA call with one broadcast
(1, heads, N, N) mask. Those masks depend only on the padded resolution and the bias table,
and are cached in inference (see ``WindowAttention.masks``; about 78 MB in float32 for the
base spec at 1024², most of it the nine shifted blocks of stage 3).

Padding to whole windows, the cyclic shift and the window partition are one copy into the
window buffer (``partition_windows``), and the way back (reverse shift, crop, residual add)
is one pass too (``merge_windows_add``): ``F.pad`` and ``torch.roll`` cost more than the
attention of the shifted blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import Linear, inference

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


@dataclass(frozen=True)
class WindowGroup:
    """A rectangle of whole windows of the padded (and, if shifted, rolled) map whose windows
    all share one region mask."""

    rows: slice
    cols: slice
    region_mask: Tensor | None
    """(N, N) additive region mask of every window of the group; None where it is all zero."""

    def count(self, window: int) -> int:
        """Windows per image in the group."""
        return (self.rows.stop - self.rows.start) * (self.cols.stop - self.cols.start) // window**2


def window_groups(
    hp: int, wp: int, *, window: int, shift: int, device: torch.device
) -> tuple[WindowGroup, ...]:
    """The window groups of an (hp, wp) padded map: the whole map without shift; with shift,
    interior windows, last column, last row and corner (empty groups left out), each with the
    region mask its windows share (checked, not assumed)."""
    if not shift:
        return (WindowGroup(slice(0, hp), slice(0, wp), None),)
    full = shifted_window_region_mask(hp, wp, window=window, shift=shift, device=device)
    full = full.view(hp // window, wp // window, window * window, window * window)
    rows = [r for r in (slice(0, hp - window), slice(hp - window, hp)) if r.stop > r.start]
    cols = [c for c in (slice(0, wp - window), slice(wp - window, wp)) if c.stop > c.start]
    groups = []
    for r in rows:
        for c in cols:
            masks = full[r.start // window : r.stop // window, c.start // window : c.stop // window]
            first = masks[0, 0]
            if not torch.equal(masks, first.expand_as(masks)):
                raise AssertionError("windows of one group differ in their region mask")
            groups.append(WindowGroup(r, c, first if bool(first.any()) else None))
    return tuple(groups)


def _pieces(
    lo: int, hi: int, *, window: int, shift: int, size: int, padded: int
) -> list[tuple[slice, slice, slice]]:
    """Rows ``lo … hi−1`` of a group of the rolled, padded map (``lo`` a multiple of
    ``window``) as rectangles ``(window slice, row-in-window slice, source row slice)``.

    Rolled row r shows row (r + shift) mod ``padded`` of the unrolled map; source rows are
    contiguous within a rectangle, and padding rows (source ≥ ``size``) are left out. The
    same holds for columns.
    """
    pieces = []
    r = lo
    while r < hi:
        src = (r + shift) % padded
        if src >= size:  # padding: zero in the windows, dropped on the way back
            r += padded - src
            continue
        end = min(hi, r + size - src)  # real rows up to the wrap (or the group's end)
        a, e = r - lo, end - lo
        while a < e:
            w0, i0 = divmod(a, window)
            if i0 or e - a < window:  # part of one window
                n = min(window - i0, e - a)
                pieces.append((slice(w0, w0 + 1), slice(i0, i0 + n), slice(src, src + n)))
            else:  # whole windows
                n = (e - a) // window * window
                pieces.append((slice(w0, w0 + n // window), slice(0, window), slice(src, src + n)))
            src += n
            a += n
        r = end
    return pieces


def _rects(
    g: WindowGroup, *, window: int, shift: int, h: int, w: int, hp: int, wp: int
) -> list[tuple[tuple[slice, slice, slice, slice], tuple[slice, slice], tuple[int, ...]]]:
    """A group's rectangles: (index into the (B, gh, gw, window, window, C) windows, index into
    the (B, H, W, C) map, the map block's split into (rows: windows, rows in window, columns:
    windows, columns in window))."""
    rows = _pieces(g.rows.start, g.rows.stop, window=window, shift=shift, size=h, padded=hp)
    cols = _pieces(g.cols.start, g.cols.stop, window=window, shift=shift, size=w, padded=wp)
    out = []
    for rw, ri, rs in rows:
        for cw, ci, cs in cols:
            split = (rw.stop - rw.start, ri.stop - ri.start, cw.stop - cw.start, ci.stop - ci.start)
            out.append(((rw, cw, ri, ci), (rs, cs), split))
    return out


def _map_block(t: Tensor, where: tuple[slice, slice], split: tuple[int, ...]) -> Tensor:
    """(B, H, W, C)[rows, cols] as a (B, wr, ir, wc, ic, C) view."""
    block = t[:, where[0], where[1]]
    return block.unflatten(2, split[2:]).unflatten(1, split[:2])


def partition_windows(
    y: Tensor, groups: Sequence[WindowGroup], *, window: int, shift: int
) -> Tensor:
    """(B, H, W, C) map -> (ΣB·nW_g, window², C) windows of the map zero-padded to whole
    windows and rolled by −``shift``, group after group, each image-major and row-major.

    One pass: padding, roll and window partition are a single copy (no ``F.pad`` and
    ``torch.roll`` intermediates).
    """
    b, h, w, c = y.shape
    hp, wp = groups[-1].rows.stop, groups[-1].cols.stop
    total = b * sum(g.count(window) for g in groups)
    shape = (total, window * window, c)
    out = y.new_zeros(shape) if (hp, wp) != (h, w) else y.new_empty(shape)
    start = 0
    for g in groups:
        gh = (g.rows.stop - g.rows.start) // window
        gw = (g.cols.stop - g.cols.start) // window
        dst = out[start : start + b * gh * gw].view(b, gh, gw, window, window, c)
        for idx, where, split in _rects(g, window=window, shift=shift, h=h, w=w, hp=hp, wp=wp):
            dst[(slice(None), *idx)].copy_(_map_block(y, where, split).transpose(2, 3))
        start += b * gh * gw
    return out


def merge_windows_add(
    x: Tensor, parts: Sequence[Tensor], groups: Sequence[WindowGroup], *, window: int, shift: int
) -> Tensor:
    """``x`` (B, H, W, C) plus the window outputs ``parts`` (one (B·nW_g, window², C) per
    group, as from ``partition_windows``) put back in place: rolled back, padding dropped.

    In inference a single pass writes ``x + windows``; with autograd, a copy and an add.
    """
    b, h, w, c = x.shape
    hp, wp = groups[-1].rows.stop, groups[-1].cols.stop
    fused = inference(x, parts[0])
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    for g, part in zip(groups, parts, strict=True):
        gh = (g.rows.stop - g.rows.start) // window
        gw = (g.cols.stop - g.cols.start) // window
        src = part.view(b, gh, gw, window, window, c)
        for idx, where, split in _rects(g, window=window, shift=shift, h=h, w=w, hp=hp, wp=wp):
            block = src[(slice(None), *idx)].transpose(2, 3)
            target = _map_block(out, where, split)
            if fused:
                torch.add(_map_block(x, where, split), block, out=target)
            else:
                target.copy_(block)
    return out if fused else x + out


class Mlp(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        # GELU fused into fc1 (packed CPU path) or in place: no second (tokens, 4C) buffer.
        return self.fc2(self.fc1(x, gelu=True))


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
        self.qkv = Linear(dim, dim * 3)
        self.proj = Linear(dim, dim)
        # The latest masks (one per window group), see ``masks``; not state.
        self._mask_cache: tuple[tuple, list[Tensor]] | None = None

    def relative_bias(self) -> Tensor:
        """(heads, N, N) bias added to the attention logits."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def masks(self, groups: Sequence[WindowGroup], dtype: torch.dtype) -> list[Tensor]:
        """One (1, heads, N, N) additive mask per window group: bias plus region mask.

        Cached while no gradient can flow to the bias table. The key holds the table's
        storage and version counter, so ``load_state_dict``, ``.to()`` and any in-place
        update of the table recompute it (``_load_from_state_dict`` also drops it).
        """
        table = self.relative_position_bias_table
        if not inference(table) or table.is_inference() or torch.compiler.is_exporting():
            # Autograd must see the bias; a table created in inference mode has no version
            # counter to notice in-place updates by; an exporter must see it computed.
            return self._build_masks(groups, dtype)
        key = (
            table.device,
            table.data_ptr(),
            table._version,
            dtype,
            tuple((g.rows, g.cols) for g in groups),
        )
        if self._mask_cache is None or self._mask_cache[0] != key:
            self._mask_cache = None
            self._mask_cache = (key, self._build_masks(groups, dtype))
        return self._mask_cache[1]

    def _build_masks(self, groups: Sequence[WindowGroup], dtype: torch.dtype) -> list[Tensor]:
        bias = self.relative_bias()
        out = []
        for g in groups:
            m = bias if g.region_mask is None else bias + g.region_mask
            out.append(m.to(dtype).contiguous().unsqueeze(0))
        return out

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._mask_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, windows: Tensor, groups: Sequence[WindowGroup]) -> list[Tensor]:
        """windows: (ΣB·nW_g, N, C) from ``partition_windows`` -> one (B·nW_g, N, C) per group."""
        bw, n, c = windows.shape
        heads = self.num_heads
        qkv = self.qkv(windows).view(bw, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        masks = self.masks(groups, qkv.dtype)
        b = bw // sum(g.count(self.window) for g in groups)
        out = []
        start = 0
        for g, mask in zip(groups, masks, strict=True):
            end = start + b * g.count(self.window)
            q, k, v = qkv[:, start:end].unbind(0)  # each (B·nW_g, heads, N, hd), 4-D
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            # The fused kernel's output is laid out (., N, heads, hd): this reshape is a view.
            out.append(self.proj(o.transpose(1, 2).reshape(end - start, n, c)))
            start = end
        return out


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

    def forward(self, x: Tensor, groups: Sequence[WindowGroup]) -> Tensor:
        """x: (B, H, W, C) -> (B, H, W, C); ``groups``: this block's window groups of the
        padded map (see ``SwinStage.window_groups``)."""
        windows = partition_windows(self.norm1(x), groups, window=self.window, shift=self.shift)
        # Padding to whole windows comes after the norm, as in the published model: the zero
        # tokens take part in attention (no padding mask), which the weights were trained with.
        x = merge_windows_add(
            x, self.attn(windows, groups), groups, window=self.window, shift=self.shift
        )
        return self.mlp(self.norm2(x)).add_(x)


class PatchMerging(nn.Module):
    """2×2 neighbourhood -> one token: (B, H, W, C) -> (B, ⌈H/2⌉, ⌈W/2⌉, 2C)."""

    def __init__(self, *, dim: int) -> None:
        super().__init__()
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)
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
        self._group_cache: dict[tuple, tuple[WindowGroup, ...]] = {}

    def window_groups(
        self, h: int, w: int, shift: int, device: torch.device
    ) -> tuple[WindowGroup, ...]:
        """Cached window groups (see ``window_groups``) of an (h, w) map padded to windows."""
        hp = -(-h // self.window) * self.window
        wp = -(-w // self.window) * self.window
        key = (hp, wp, shift, device)
        groups = self._group_cache.get(key)
        if groups is None:
            groups = window_groups(hp, wp, window=self.window, shift=shift, device=device)
            self._group_cache[key] = groups
        return groups

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, H, W, C) -> (stage output (B, H, W, C), input of the next stage)."""
        h, w = x.shape[1], x.shape[2]
        for block in self.blocks:
            x = block(x, self.window_groups(h, w, block.shift, x.device))
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
