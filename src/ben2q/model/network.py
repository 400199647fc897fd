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

from . import kernels
from .decoder import MCLM, MCRM, image_to_views, views_to_image
from .specs import ModelSpec, get_spec
from .swin import SwinBackbone


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


def channels_last_on_cpu(x: Tensor) -> Tensor:
    """``x`` in channels-last (NHWC) memory layout on the CPU; unchanged elsewhere.

    oneDNN runs CPU convolutions natively on NHWC data; on NCHW input it reorders to and from
    its blocked layout around every call. Measured on the full-size head (2 cores): float32
    128→128 channels at 1024² 2.09 s NCHW vs 1.67 s NHWC, the whole head from the mask head
    on 5.6 s vs 4.5 s; bf16 convolutions were 5-12x slower on NCHW. Convolution outputs keep
    the layout of their input, and so do the norms, activations and resizes after them, so
    the head converts once, where it starts.
    """
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def _conv_input(x: Tensor) -> Tensor:
    """A convolution's input: in reduced precision on the CPU, cast and channels-last (see
    ``channels_last_on_cpu``); otherwise as it is."""
    dtype = _cpu_reduced_precision(x)
    if dtype is None:
        return x
    return x.to(dtype=dtype, memory_format=torch.channels_last)


def conv2d(conv: nn.Module, x: Tensor) -> Tensor:
    """``conv(x)`` with the input laid out for the CPU's reduced-precision kernels."""
    return conv(_conv_input(x))


def _norm_act(norm: nn.Module, y: Tensor) -> Tensor:
    """GELU(InstanceNorm(y)): in place in inference, the modules' own formula otherwise."""
    layout_ok = y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last)
    if kernels.inference(y) and layout_ok:
        return instance_norm_gelu_(y, eps=norm.eps)
    return F.gelu(norm(y))


def _conv_norm_act(conv: nn.Module, norm: nn.Module, x: Tensor) -> Tensor:
    return _norm_act(norm, conv2d(conv, x))


def _phase_taps(w: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The 3 taps of ``w`` along ``dim`` folded onto the 2 low-resolution rows (columns) that
    output pixels of even and of odd rows (columns) of a 2× nearest upsampling see."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack((t0, t1 + t2), dim), torch.stack((t0 + t1, t2), dim)


def upsample2_conv3x3(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(nearest_upsample_2x(x))`` (3×3 kernel, padding 1) without the upsampled map:
    (B, C, H, W) -> (B, C_out, 2H, 2W).

    Each output pixel of phase (a, b) (row parity a, column parity b) sees a 2×2
    neighbourhood of ``x``, so the convolution is four 2×2 convolutions at the input's
    resolution whose weights are sums of the 3×3 taps: one call with 4·C_out output
    channels, 16/36 of the multiply-adds, then one interleaving copy into the output. The
    same function as upsampling then convolving, up to float rounding of the summed weights.
    """
    b, _, h, w = x.shape
    cout = conv.out_channels
    # (4·C_out, C_in, 2, 2): the 2×2 kernels of phases (0, 0), (0, 1), (1, 0), (1, 1)
    weight = torch.cat([t for rows in _phase_taps(conv.weight, 2) for t in _phase_taps(rows, 3)])
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    y = F.conv2d(x, weight, bias, padding=1)  # (B, 4·C_out, H+1, W+1)
    out = torch.empty(
        (b, cout, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=_layout(y)
    )
    out6 = out.permute(0, 2, 3, 1).view(b, h, 2, w, 2, cout)
    y6 = y.permute(0, 2, 3, 1).unflatten(-1, (2, 2, cout))  # (B, H+1, W+1, 2, 2, C)
    for pa in (0, 1):
        for pb in (0, 1):
            out6[:, :, pa, :, pb].copy_(y6[:, pa : pa + h, pb : pb + w, pa, pb])
    return out


def _layout(x: Tensor) -> torch.memory_format:
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class UpConvNormAct(ConvNormAct):
    """``ConvNormAct`` of the 2× nearest-upsampled input (see ``upsample2_conv3x3``):
    (B, C, H, W) -> (B, C_out, 2H, 2W); the same parameters as ``ConvNormAct``."""

    def forward(self, x: Tensor) -> Tensor:
        return _norm_act(self[1], upsample2_conv3x3(self[0], _conv_input(x)))


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
        self.upsample1 = UpConvNormAct(d, d)  # of the 2× upsampled map
        self.upsample2 = UpConvNormAct(d, d)
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
        # only now and dropped once resized, and the norms and activations work in place; on the CPU
        # the head runs in channels-last layout.
        shallow = self.shallow(channels_last_on_cpu(x))
        out = channels_last_on_cpu(views_to_image(e1[:4]))  # (B, d, S/4, S/4)
        out = self.insmask_head(out + _resize(e1[4], out))
        del e1
        out = out + _resize(shallow, out)
        out = self.upsample1(out)  # (B, d, S/2, S/2)
        out = out + _resize(shallow, out)
        del shallow
        out = self.upsample2(out)  # (B, d, S, S)
        return torch.sigmoid(self.output(out))

    def pack_weights(self, enabled: bool = True) -> None:
        """Run float32 CPU inference with oneDNN-reordered copies of the linear weights
        (see ``kernels``): faster, at the cost of those weights' size again in memory."""
        kernels.pack_weights(self, enabled)

    @staticmethod
    def _refine(block: MCRM, conv: nn.Module, lateral: Tensor, coarser: Tensor, b: int) -> Tensor:
        """One decoder step on (5B, d, h, w) maps: add the upsampled coarser map, MCRM, conv."""
        x = (lateral + _resize(coarser, lateral)).unflatten(0, (5, b))
        return conv(block(x).flatten(0, 1))


def build_model(spec: str | ModelSpec = "base") -> BEN2:
    """A BEN2 network of the given spec in eval mode, with untrained weights."""
    return BEN2(get_spec(spec)).eval()
