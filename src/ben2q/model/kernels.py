"""Linear layers with an optional oneDNN path for float32 CPU inference.

Why: in the CPU build of PyTorch, float32 ``F.linear`` calls MKL's sgemm, which on AMD
processors runs well below oneDNN on the backbone's shapes (measured on 2 Zen 4 cores:
117-174 GFLOP/s against 177-216 for oneDNN with a pre-reordered weight), and it adds the
bias in a separate pass over the output. ``Linear`` keeps ``nn.Linear``'s parameters (so the
checkpoint loads unchanged) and, once packing is enabled (``BEN2.pack_weights``), runs
float32 CPU inference through ``torch.ops.mkldnn._linear_pointwise`` with its weight
reordered once into oneDNN's blocked layout, bias and (when asked) GELU fused into the GEMM.

The reordered copy costs the weight's size again (about 350 MB for BEN2 Base). It is made
on first use and made again whenever the weight changes (new storage or an in-place update
seen by its version counter); autograd, autocast, other dtypes and devices take the plain
path. Results equal ``F.linear`` to float32 rounding (a different summation order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def inference(*tensors: Tensor) -> bool:
    """No autograd graph to keep: tensors may be overwritten and fused kernels used."""
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def gelu_(x: Tensor) -> Tensor:
    """GELU, in place when no autograd graph needs ``x``."""
    return torch.ops.aten.gelu_(x) if inference(x) else F.gelu(x)


class PackedWeight:
    """A oneDNN-reordered copy of one weight matrix, valid while that matrix is unchanged."""

    __slots__ = ("_key", "_packed")

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._packed: Tensor | None = None

    def get(self, weight: Tensor) -> Tensor | None:
        """The packed copy of ``weight``; None where it cannot be tracked (a tensor made in
        inference mode has no version counter to notice in-place updates by)."""
        if weight.is_inference():
            return None
        key = (weight.data_ptr(), weight._version, tuple(weight.shape))
        if key != self._key:
            self.clear()
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
            self._key = key
        return self._packed

    def clear(self) -> None:
        self._key = self._packed = None


def _onednn(x: Tensor, weight: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and inference(x, weight)
        and torch.backends.mkldnn.is_available()
    )


def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    pack: PackedWeight | None = None,
    *,
    gelu: bool = False,
) -> Tensor:
    """``F.linear(x, weight, bias)``, then GELU if ``gelu``; through oneDNN with ``pack``'s
    reordered weight where that applies (float32 CPU inference)."""
    if pack is not None and _onednn(x, weight):
        packed = pack.get(weight)
        if packed is not None:
            attr, algorithm = ("gelu", "none") if gelu else ("none", "")
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr, [], algorithm)
    y = F.linear(x, weight, bias)
    return gelu_(y) if gelu else y


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters) with optional packing and a fused GELU."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self._pack: PackedWeight | None = None

    def pack_weights(self, enabled: bool = True) -> None:
        """Use (or stop using) a oneDNN-reordered weight for float32 CPU inference."""
        self._pack = PackedWeight() if enabled else None

    def forward(self, x: Tensor, *, gelu: bool = False) -> Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        return linear(x, self.weight, self.bias, self._pack, gelu=gelu)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        if self._pack is not None:
            self._pack.clear()  # .to()/.cuda(): the copy would outlive its weight
        return super()._apply(fn, recurse)


def pack_weights(module: nn.Module, enabled: bool = True) -> None:
    """Enable (or disable) packed weights in every submodule that has them."""
    for m in module.modules():
        if m is not module and hasattr(m, "pack_weights"):
            m.pack_weights(enabled)


def attention(q: Tensor, k: Tensor, v: Tensor, *, chunk: int = 512) -> Tensor:
    """softmax(q·kᵀ/√d)·v: q (..., Lq, d), k and v (..., Lk, d) -> (..., Lq, d).

    ``scaled_dot_product_attention``, except for bf16/fp16 on the CPU: there its fused kernel
    works in float32 inside and is no faster than float32 (measured on the decoder's
    16,384 × 5,376 × 128 attention: 0.26 s in bf16 as in float32), while two bf16 GEMMs per
    block of ``chunk`` queries with the softmax between them take 0.145 s; a block's
    (chunk, Lk) scores stay in cache (5.5 MB at 512 × 5,376).
    """
    if not (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)):
        return F.scaled_dot_product_attention(q, k, v)
    q = q * q.shape[-1] ** -0.5
    kt = k.transpose(-1, -2)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for start in range(0, q.shape[-2], chunk):
        rows = slice(start, start + chunk)
        scores = torch.softmax(torch.matmul(q[..., rows, :], kt), dim=-1)
        out[..., rows, :] = torch.matmul(scores, v)
    return out
