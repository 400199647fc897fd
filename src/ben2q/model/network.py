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


def _in_place(x: Tensor) -> bool:
    """Whether ``x`` may be overwritten: no autograd graph to keep intact."""
    return not (torch.is_grad_enabled() and x.requires_grad)


def instance_norm_gelu_(x: Tensor, *, eps: float) -> Tensor:
    """GELU(InstanceNorm(x)) (no affine) computed in ``x``'s own memory: (N, C, H, W),
    contiguous or channels-last.

    The largest maps of the network (128 channels at the full 1024² input size: 512 MB per
    image in float32) then need no second and third buffer. Contiguous input: one
    ``native_batch_norm`` over the (1, N·C, H, W) view, exactly as ``F.instance_norm``
    computes it, with the output written over the input (an elementwise pass after the
    statistics). Channels-last input (the reduced-precision path, see ``conv2d``): batch
    statistics of one image are its instance statistics, so one call per image.
    """
    n, c, h, w = x.shape
    stats = x.new_empty((2, c * (n if x.is_contiguous() else 1)))  # saved mean, 1/std: unused
    parts = [x.view(1, n * c, h, w)] if x.is_contiguous() else [x[i : i + 1] for i in range(n)]
    for part in parts:
        torch.ops.aten.native_batch_norm.out(
            part, None, None, None, None, True, 0.0, eps,
            out=part, save_mean=stats[0], save_invstd=stats[1],
        )  # fmt: skip
    return torch.ops.aten.gelu_(x)


class ConvNormAct(nn.Sequential):
    """3×3 convolution -> InstanceNorm (no affine) -> GELU; Sequential for checkpoint names."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1),
            nn.InstanceNorm2d(out_ch),
            nn.GELU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return _conv_norm_act(self[0], self[1], x)


def _cpu_reduced_precision(x: Tensor) -> torch.dtype | None:
    """bf16/fp16 when a CPU convolution of ``x`` runs in it (autocast or the input's dtype)."""
    if x.device.type != "cpu":
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        return dtype if dtype in (torch.bfloat16, torch.float16) else None
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else None


def conv2d(conv: nn.Module, x: Tensor) -> Tensor:
    """``conv(x)``; in reduced precision on the CPU, in channels-last memory layout.

    oneDNN runs bf16 convolutions natively on channels-last (NHWC) data; on NCHW input it
    reorders to and from its blocked layout, which made the full-size bf16 convolutions
    5-12x slower (measured: 3→128 channels at 1024², 1.2 s vs 0.1 s). The output stays
    channels-last (converting it back cost as much as the convolution); everything after it
    accepts either layout. In float32 the plain layout stays: its gain was eaten by the
    layout conversions, and the conforming path is left as it was.
    """
    dtype = _cpu_reduced_precision(x)
    if dtype is None:
        return conv(x)
    return conv(x.to(dtype=dtype, memory_format=torch.channels_last))


def _conv_norm_act(conv: nn.Module, norm: nn.Module, x: Tensor) -> Tensor:
    y = conv2d(conv, x)
    if _in_place(y) and (y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last)):
        return instance_norm_gelu_(y, eps=norm.eps)
    return F.gelu(norm(y))


class Conv3x3(nn.Sequential):
    """A lone 3×3 convolution, wrapped in a Sequential as in the checkpoint (``name.0.*``)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return conv2d(self[0], x)


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

    def forward(self, x: Tensor) -> Tensor:
        x = _conv_norm_act(self[0], self[1], x)
        x = _conv_norm_act(self[3], self[4], x)
        return conv2d(self[6], x)


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
        glb = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        views = torch.cat([image_to_views(x), glb.unsqueeze(0)])  # (5, B, 3, S/2, S/2)
        f0, f1, f2, f3, f4 = self.backbone(views.flatten(0, 1))
        del views, glb

        e5 = self.output5(f4).unflatten(0, (5, b))
        e5 = self.multifieldcrossatt(e5[:4], e5[4]).flatten(0, 1)
        e4 = self._refine(self.dec_blk4, self.conv4, self.output4(f3), e5, b)
        e3 = self._refine(self.dec_blk3, self.conv3, self.output3(f2), e4, b)
        e2 = self._refine(self.dec_blk2, self.conv2, self.output2(f1), e3, b)
        e1 = self._refine(self.dec_blk1, self.conv1, self.output1(f0), e2, b).unflatten(0, (5, b))
        del f0, f1, f2, f3, f4, e2, e3, e4, e5

        # The full-size maps (B, d, S, S) dominate the memory: the shallow feature is computed
        # only now and dropped once resized, and the norms and activations work in place.
        shallow = self.shallow(x)
        out = views_to_image(e1[:4])  # (B, d, S/4, S/4)
        out = self.insmask_head(out + _resize(e1[4], out))
        del e1
        out = out + _resize(shallow, out)
        out = self.upsample1(_upsample2(out))
        out = out + _resize(shallow, out)
        del shallow
        out = self.upsample2(_upsample2(out))
        return torch.sigmoid(self.output(out))

    @staticmethod
    def _refine(block: MCRM, conv: nn.Module, lateral: Tensor, coarser: Tensor, b: int) -> Tensor:
        """One decoder step on (5B, d, h, w) maps: add the upsampled coarser map, MCRM, conv."""
        x = (lateral + _resize(coarser, lateral)).unflatten(0, (5, b))
        return conv(block(x).flatten(0, 1))


def build_model(spec: str | ModelSpec = "base") -> BEN2:
    """A BEN2 network of the given spec in eval mode, with untrained weights."""
    return BEN2(get_spec(spec)).eval()
