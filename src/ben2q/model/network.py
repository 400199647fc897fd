"""The BEN2 network: Swin backbone over five views, cross-view decoder, full-size mask head.

Shapes for the base spec (S = 1024): the image (B, 3, S, S) is cut into four quarter patches
and one half-size global view, each (3, 512, 512); the backbone sees the 5B views as one
batch; the decoder runs on (5, B, C, h, w) tensors (see ``decoder``); the head stitches the
patches back into (B, C, 256, 256) and upsamples with a shallow full-size feature to the
(B, 1, S, S) mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decoder import MCLM, MCRM, image_to_views, views_to_image
from .specs import ModelSpec, get_spec
from .swin import SwinBackbone


class ConvNormAct(nn.Sequential):
    """3×3 convolution -> InstanceNorm (no affine) -> GELU; Sequential for checkpoint names."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
            nn.InstanceNorm2d(out_ch),
            nn.GELU(),
        )


class Conv3x3(nn.Sequential):
    """A lone 3×3 convolution, wrapped in a Sequential as in the checkpoint (``name.0.*``)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))


class MaskHead(nn.Sequential):
    """The instance-mask head: conv-norm-GELU twice at ``hidden`` channels, then a conv."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(
            nn.Conv2d(dim, hidden, kernel_size=3, padding=1),
            nn.InstanceNorm2d(hidden),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1),
            nn.InstanceNorm2d(hidden),
            nn.GELU(),
            nn.Conv2d(hidden, dim, kernel_size=3, padding=1),
        )


def _resize(x: Tensor, like: Tensor) -> Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def _upsample2(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class BEN2(nn.Module):
    """Background Erase Network 2. ``forward`` maps a normalised (B, 3, S, S) batch to the
    (B, 1, S, S) foreground probability."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.decoder_dim
        e = spec.embed_dim
        self.backbone = SwinBackbone(
            embed_dim=e,
            depths=spec.depths,
            num_heads=spec.num_heads,
            window=spec.window_size,
            mlp_ratio=spec.mlp_ratio,
        )
        # Deep-supervision outputs of training; unused at inference, kept for strict loading.
        for i in range(5, 0, -1):
            self.add_module(f"sideout{i}", Conv3x3(d, 1))
        # Lateral projections of the five backbone maps (channels e, e, 2e, 4e, 8e) to d.
        self.output5 = ConvNormAct(8 * e, d)
        self.output4 = ConvNormAct(4 * e, d)
        self.output3 = ConvNormAct(2 * e, d)
        self.output2 = ConvNormAct(e, d)
        self.output1 = ConvNormAct(e, d)
        heads = spec.decoder_heads
        self.multifieldcrossatt = MCLM(dim=d, num_heads=heads, pool_ratios=spec.mclm_pool_ratios)
        self.conv1 = ConvNormAct(d, d)
        self.conv2 = ConvNormAct(d, d)
        self.conv3 = ConvNormAct(d, d)
        self.conv4 = ConvNormAct(d, d)
        self.dec_blk1 = MCRM(dim=d, num_heads=heads, pool_ratios=spec.mcrm_pool_ratios)
        self.dec_blk2 = MCRM(dim=d, num_heads=heads, pool_ratios=spec.mcrm_pool_ratios)
        self.dec_blk3 = MCRM(dim=d, num_heads=heads, pool_ratios=spec.mcrm_pool_ratios)
        self.dec_blk4 = MCRM(dim=d, num_heads=heads, pool_ratios=spec.mcrm_pool_ratios)
        self.insmask_head = MaskHead(d, spec.head_dim)
        self.shallow = Conv3x3(3, d)
        self.upsample1 = ConvNormAct(d, d)
        self.upsample2 = ConvNormAct(d, d)
        self.output = Conv3x3(d, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, 3, S, S) normalised image -> (B, 1, S, S) foreground probability."""
        b = x.shape[0]
        shallow = self.shallow(x)
        glb = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        views = torch.cat([image_to_views(x), glb.unsqueeze(0)])  # (5, B, 3, S/2, S/2)
        f0, f1, f2, f3, f4 = self.backbone(views.flatten(0, 1))

        e5 = self.output5(f4).unflatten(0, (5, b))
        e5 = self.multifieldcrossatt(e5[:4], e5[4]).flatten(0, 1)
        e4 = self._refine(self.dec_blk4, self.conv4, self.output4(f3), e5, b)
        e3 = self._refine(self.dec_blk3, self.conv3, self.output3(f2), e4, b)
        e2 = self._refine(self.dec_blk2, self.conv2, self.output2(f1), e3, b)
        e1 = self._refine(self.dec_blk1, self.conv1, self.output1(f0), e2, b).unflatten(0, (5, b))

        out = views_to_image(e1[:4])  # (B, d, S/4, S/4)
        out = self.insmask_head(out + _resize(e1[4], out))
        out = out + _resize(shallow, out)
        out = self.upsample1(_upsample2(out))
        out = _upsample2(out + _resize(shallow, out))
        return torch.sigmoid(self.output(self.upsample2(out)))

    @staticmethod
    def _refine(block: MCRM, conv: nn.Module, lateral: Tensor, coarser: Tensor, b: int) -> Tensor:
        """One decoder step on (5B, d, h, w) maps: add the upsampled coarser map, MCRM, conv."""
        x = (lateral + _resize(coarser, lateral)).unflatten(0, (5, b))
        return conv(block(x).flatten(0, 1))


def build_model(spec: str | ModelSpec = "base") -> BEN2:
    """A BEN2 network of the given spec in eval mode, with untrained weights."""
    return BEN2(get_spec(spec)).eval()
