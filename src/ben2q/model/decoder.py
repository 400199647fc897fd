"""BEN2's decoder blocks, batched: the cross-view attention modules MCLM and MCRM.

BEN2 looks at each image as five views: four quarter patches (``loc``, row-major 2×2 order)
and one half-size global view (``glb``). Decoder feature maps therefore travel as
``(5, B, C, h, w)``: view-major, so the four patches are ``x[:4]`` and the global view
``x[4]`` for the whole batch at once. The reference implementation loops over images in
Python here; these modules run the batch as one tensor.

Attention modules keep ``nn.MultiheadAttention``'s parameter names (``in_proj_weight``,
``in_proj_bias``, ``out_proj``) so that the published checkpoint loads unchanged, but run
through ``scaled_dot_product_attention`` (fused kernels, no attention-weight matrix).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import Linear, PackedWeight, attention, linear


def views_to_image(loc: Tensor) -> Tensor:
    """(4, B, C, h, w) quarter patches -> (B, C, 2h, 2w) image."""
    _, b, c, h, w = loc.shape
    return loc.view(2, 2, b, c, h, w).permute(2, 3, 0, 4, 1, 5).reshape(b, c, 2 * h, 2 * w)


def image_to_views(x: Tensor) -> Tensor:
    """(B, C, H, W) image -> (4, B, C, H/2, W/2) quarter patches, row-major."""
    b, c, h, w = x.shape
    x = x.view(b, c, 2, h // 2, 2, w // 2)
    return x.permute(2, 4, 0, 1, 3, 5).reshape(4, b, c, h // 2, w // 2)


def to_tokens(x: Tensor) -> Tensor:
    """(..., C, h, w) -> (..., h*w, C)."""
    return x.flatten(-2).transpose(-1, -2)


def sine_position_embedding(h: int, w: int, dim: int, *, temperature: float = 10000.0) -> Tensor:
    """(h*w, dim) normalised 2-D sine embedding (DETR style): dim/2 channels for y, then x."""
    feats = dim // 2
    scale = 2 * math.pi
    eps = 1e-6
    y = (torch.arange(1, h + 1, dtype=torch.float32) - 0.5) / (h + eps) * scale
    x = (torch.arange(1, w + 1, dtype=torch.float32) - 0.5) / (w + eps) * scale
    dim_t = temperature ** (2 * (torch.arange(feats, dtype=torch.float32) // 2) / feats)

    def encode(p: Tensor) -> Tensor:  # (n,) -> (n, feats): sin, cos interleaved
        a = p[:, None] / dim_t
        return torch.stack((a[:, 0::2].sin(), a[:, 1::2].cos()), dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(h, w, feats)
    pos_x = encode(x)[None, :, :].expand(h, w, feats)
    return torch.cat((pos_y, pos_x), dim=2).reshape(h * w, 2 * feats)


class CrossAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters, batch first."""

    def __init__(self, *, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        self._packs: tuple[PackedWeight, ...] | None = None

    def pack_weights(self, enabled: bool = True) -> None:
        """Packed copies of the q, k and v projections (see ``kernels``)."""
        self._packs = tuple(PackedWeight() for _ in range(3)) if enabled else None

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        for pack in self._packs or ():
            pack.clear()
        return super()._apply(fn, recurse)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: (..., Lq, C), k and v: (..., Lk, C) -> (..., Lq, C)."""
        weights = self.in_proj_weight.chunk(3)
        biases = self.in_proj_bias.chunk(3)
        packs = self._packs or (None, None, None)
        q, k, v = (
            linear(t, w, b, pack)
            for t, w, b, pack in zip((q, k, v), weights, biases, packs, strict=True)
        )
        # Always (..., heads, L, head_dim), also for one head: SDPA's fused CPU kernel wants
        # 4-D inputs; 3-D ones go to the unfused math kernel (an (Lq, Lk) matrix in memory).
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(-2, -3) for t in (q, k, v))
        out = attention(q, k, v)
        return self.out_proj(out.transpose(-2, -3).flatten(-2))


def _ffn(x: Tensor, up: Linear, down: Linear) -> Tensor:
    """Linear -> GELU -> Linear; the modules stay attributes of their block (checkpoint names).

    GELU is fused into ``up`` (or applied in place): no second hidden-size buffer."""
    return down(up(x, gelu=True))


class MCLM(nn.Module):
    """Multi-view cross-attention at the coarsest scale (the ``multifieldcrossatt`` block).

    First the global view attends to multi-scale pools of the four patches stitched
    together; then each patch attends to its own quarter of the refreshed global view.
    """

    def __init__(self, *, dim: int, num_heads: int, pool_ratios: tuple[int, ...]) -> None:
        super().__init__()
        self.pool_ratios = pool_ratios
        self.attention = nn.ModuleList(
            CrossAttention(dim=dim, num_heads=num_heads) for _ in range(5)
        )
        self.linear1 = Linear(dim, dim * 2)
        self.linear2 = Linear(dim * 2, dim)
        self.linear3 = Linear(dim, dim * 2)
        self.linear4 = Linear(dim * 2, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self._pos_cache: dict[tuple[int, int, torch.device], tuple[Tensor, Tensor]] = {}

    def pool_sizes(self, h: int, w: int) -> list[tuple[int, int]]:
        return [(round(h / r), round(w / r)) for r in self.pool_ratios]

    def position_embeddings(self, h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Cached (pooled tokens' embedding (N, C), global tokens' embedding (h*w, C))."""
        key = (h, w, device)
        if key not in self._pos_cache:
            dim = self.linear1.in_features
            pooled = torch.cat(
                [sine_position_embedding(ph, pw, dim) for ph, pw in self.pool_sizes(h, w)]
            )
            glb = sine_position_embedding(h, w, dim)
            self._pos_cache[key] = (pooled.to(device), glb.to(device))
        return self._pos_cache[key]

    def forward(self, loc: Tensor, glb: Tensor) -> Tensor:
        """loc: (4, B, C, h, w), glb: (B, C, h, w) -> (5, B, C, h, w)."""
        _, b, c, h, w = loc.shape
        stitched = views_to_image(loc)  # (B, C, 2h, 2w)
        pools = torch.cat(
            [to_tokens(F.adaptive_avg_pool2d(stitched, s)) for s in self.pool_sizes(h, w)], dim=1
        )  # (B, N, C)
        pool_pos, glb_pos = self.position_embeddings(h, w, loc.device)
        pool_pos, glb_pos = pool_pos.to(loc.dtype), glb_pos.to(loc.dtype)

        g = to_tokens(glb)  # (B, h*w, C)
        g = self.norm1(g + self.attention[0](g + glb_pos, pools + pool_pos, pools))
        g = self.norm2(g + _ffn(g, self.linear1, self.linear2))

        # Each patch attends to the quarter of the refreshed global view that it covers.
        g_quarters = to_tokens(image_to_views(g.transpose(1, 2).reshape(b, c, h, w)))
        l_tokens = to_tokens(loc)  # (4, B, h*w, C)
        attended = torch.stack(
            [self.attention[i + 1](l_tokens[i], g_quarters[i], g_quarters[i]) for i in range(4)]
        )
        l_tokens = self.norm1(l_tokens + attended)
        l_tokens = self.norm2(l_tokens + _ffn(l_tokens, self.linear3, self.linear4))

        out = torch.cat([l_tokens, g.unsqueeze(0)], dim=0)  # (5, B, h*w, C)
        return out.transpose(2, 3).reshape(5, b, c, h, w)


class MCRM(nn.Module):
    """Multi-view refinement (the ``dec_blk*`` blocks).

    A saliency map of the global view gates the patches; each patch then attends to
    multi-scale pools of its own quarter of the global view, and the refreshed patches are
    written back into the global view.
    """

    def __init__(self, *, dim: int, num_heads: int, pool_ratios: tuple[int, ...]) -> None:
        super().__init__()
        self.pool_ratios = pool_ratios
        self.attention = nn.ModuleList(
            CrossAttention(dim=dim, num_heads=num_heads) for _ in range(4)
        )
        self.linear3 = Linear(dim, dim * 2)
        self.linear4 = Linear(dim * 2, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.sal_conv = nn.Conv2d(dim, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (5, B, C, h, w) -> (5, B, C, h, w)."""
        _, b, c, h, w = x.shape
        loc, glb = x[:4], x[4]
        saliency = torch.sigmoid(self.sal_conv(glb))  # (B, 1, h, w)
        saliency = F.interpolate(saliency, size=(2 * h, 2 * w), mode="nearest")
        loc = loc * image_to_views(saliency)  # (4, B, C, h, w)

        glb_quarters = image_to_views(glb).flatten(0, 1)  # (4B, C, h/2, w/2)
        pools = torch.cat(
            [
                to_tokens(F.adaptive_avg_pool2d(glb_quarters, (round(h / r), round(w / r))))
                for r in self.pool_ratios
            ],
            dim=1,
        ).unflatten(0, (4, b))  # (4, B, N, C)

        tokens = to_tokens(loc)  # (4, B, h*w, C)
        attended = torch.stack([self.attention[i](tokens[i], pools[i], pools[i]) for i in range(4)])
        tokens = self.norm1(tokens + attended)
        tokens = self.norm2(tokens + _ffn(tokens, self.linear3, self.linear4))
        loc = tokens.transpose(2, 3).reshape(4, b, c, h, w)

        glb = glb + F.interpolate(views_to_image(loc), size=(h, w), mode="nearest")
        return torch.cat([loc, glb.unsqueeze(0)], dim=0)
