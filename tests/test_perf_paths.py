"""The fast code paths equal the straightforward formulas they replace.

Window attention runs group by group on 4-D tensors with fused padding/roll/partition and a
cached mask; the decoder's attention is 4-D; the head's norms work in place; the allocator
can be told to keep freed memory. Each is checked against the plain formulation here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ben2q.model import build_model, deterministic_state_dict
from ben2q.model.swin import (
    SwinBlock,
    shifted_window_region_mask,
    window_groups,
    window_merge,
    window_partition,
)


def _plain_block(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """The textbook Swin block: pad, roll, partition, softmax(qkᵀ·s + bias + mask)·v, undo."""
    _, h, w, c = x.shape
    win, shift, heads = block.window, block.shift, block.attn.num_heads
    y = block.norm1(x)
    pad_b, pad_r = (-h) % win, (-w) % win
    y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = h + pad_b, w + pad_r
    if shift:
        y = torch.roll(y, (-shift, -shift), (1, 2))
    win_x = window_partition(y, win)  # (B, nW, N, C)
    b, nw, n, _ = win_x.shape
    qkv = block.attn.qkv(win_x).view(b, nw, n, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv.unbind(0)  # (B, nW, heads, N, hd)
    logits = q @ k.transpose(-1, -2) * (c // heads) ** -0.5 + block.attn.relative_bias()
    if shift:
        mask = shifted_window_region_mask(hp, wp, window=win, shift=shift, device=x.device)
        logits = logits + mask[:, None]
    out = (logits.softmax(-1) @ v).transpose(2, 3).reshape(b, nw, n, c)
    y = window_merge(block.attn.proj(out), win, hp, wp)
    if shift:
        y = torch.roll(y, (shift, shift), (1, 2))
    x = x + y[:, :h, :w]
    return x + block.mlp(block.norm2(x))


def _block(shift: int, seed: int = 0) -> SwinBlock:
    torch.manual_seed(seed)
    block = SwinBlock(dim=16, num_heads=2, window=4, shift=shift, mlp_ratio=2.0).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 0.5)
    return block


@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("size", [(8, 8), (7, 10), (4, 4), (3, 5), (13, 6)])
def test_window_attention_block_equals_the_plain_formula(shift, size):
    block = _block(shift)
    x = torch.randn(3, *size, 16)
    groups = window_groups(
        -(-size[0] // 4) * 4, -(-size[1] // 4) * 4, window=4, shift=shift, device=x.device
    )
    with torch.inference_mode():
        fast = block(x, groups)
        plain = _plain_block(block, x)
    assert (fast - plain).abs().max() < 1e-5


def test_window_attention_block_with_autograd_matches_and_backpropagates():
    block = _block(2)
    x = torch.randn(2, 7, 9, 16, requires_grad=True)
    groups = window_groups(8, 12, window=4, shift=2, device=x.device)
    fast = block(x, groups)
    assert (fast - _plain_block(block, x)).abs().max() < 1e-5
    fast.sum().backward()
    assert x.grad is not None and block.attn.relative_position_bias_table.grad is not None
    assert block.attn._mask_cache is None  # never cached under autograd


def test_window_groups_share_one_region_mask_each():
    groups = window_groups(24, 36, window=12, shift=6, device=torch.device("cpu"))
    assert [g.count(12) for g in groups] == [2, 1, 2, 1]  # interior, right, bottom, corner
    assert groups[0].region_mask is None
    assert all(g.region_mask is not None for g in groups[1:])
    assert len(window_groups(12, 12, window=12, shift=6, device=torch.device("cpu"))) == 1


def test_mask_cache_follows_the_weights():
    """A cached mask must not outlive the bias table it came from."""
    model = build_model("tiny")
    state = deterministic_state_dict(model)
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        before = model(x)  # masks cached from the untrained (zero) bias tables
    model.load_state_dict(state)
    fresh = build_model("tiny")
    fresh.load_state_dict(state)
    with torch.inference_mode():
        loaded, expected = model(x), fresh(x)
    assert torch.equal(loaded, expected)
    assert not torch.equal(before, loaded)
    # an in-place update without load_state_dict invalidates it too
    attn = model.backbone.layers[0].blocks[1].attn
    with torch.no_grad():
        attn.relative_position_bias_table.add_(0.5)
        fresh.backbone.layers[0].blocks[1].attn.relative_position_bias_table.add_(0.5)
    other = build_model("tiny")  # built outside inference mode: its cache is used
    other.load_state_dict(fresh.state_dict())
    with torch.inference_mode():
        assert torch.equal(model(x), other(x))


def test_cross_attention_equals_the_plain_formula():
    from ben2q.model.decoder import CrossAttention

    torch.manual_seed(0)
    for heads in (1, 4):
        att = CrossAttention(dim=32, num_heads=heads)
        q, kv = torch.randn(2, 3, 50, 32), torch.randn(2, 3, 20, 32)
        wq, wk, wv = att.in_proj_weight.chunk(3)
        bq, bk, bv = att.in_proj_bias.chunk(3)
        qq, kk, vv = (
            t.unflatten(-1, (heads, -1)).transpose(-2, -3)
            for t in (q @ wq.T + bq, kv @ wk.T + bk, kv @ wv.T + bv)
        )
        p = (qq @ kk.transpose(-1, -2) * (32 // heads) ** -0.5).softmax(-1)
        plain = att.out_proj((p @ vv).transpose(-2, -3).flatten(-2))
        with torch.inference_mode():
            assert (att(q, kv, kv) - plain).abs().max() < 1e-5


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return out.stdout


def test_instance_norm_gelu_in_place_equals_the_modules():
    from ben2q.model.network import ConvNormAct, instance_norm_gelu_

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(3, 8, 17, 9) * 2 + 1).to(dtype)
        expected = F.gelu(F.instance_norm(x, eps=1e-5))
        y = x.clone()
        assert instance_norm_gelu_(y, eps=1e-5) is y
        assert torch.equal(y, expected)
    block = ConvNormAct(4, 6)
    x = torch.randn(2, 4, 10, 12)
    with torch.inference_mode():
        fast = block(x)
    plain = block[2](block[1](block[0](x)))  # with autograd: the modules themselves
    assert plain.requires_grad and torch.allclose(fast, plain, atol=1e-6)


_ALLOC_PROBE = """
import ctypes, json, resource
import torch
from ben2q.model.alloc import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def cycle():
    # allocate, touch and free 64 MB; report page faults and whether it was mmapped
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20)
    t.fill_(1.0)
    mapped = libc.mallinfo2().hblkhd >= 64 * 2**20
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0, mapped

before = [cycle() for _ in range(3)]
applied = keep_freed_memory()
after = [cycle() for _ in range(10)]
print(json.dumps({"before": before, "applied": applied, "after": after}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_stops_mapping_and_faulting_large_blocks():
    import json

    res = json.loads(_run(_ALLOC_PROBE).strip().splitlines()[-1])
    assert res["applied"] is True
    # default glibc: every 64 MB block is its own mapping, faulted in anew each time
    assert all(mapped and faults > 10_000 for faults, mapped in res["before"])
    # after: from the heap (not mapped), and once the heap has grown (small allocations
    # between the cycles fragment it: it settles at a few free 64 MB blocks), reused
    # without faults
    assert not any(mapped for _, mapped in res["after"])
    assert sum(faults for faults, _ in res["after"][-4:]) < 1_000


def test_engine_keyword_applies_the_allocator_setting():
    code = (
        "from unittest import mock\n"
        "import ben2q.engine as e\n"
        "from ben2q.model import build_model\n"
        "with mock.patch.object(e, 'keep_freed_memory_', return_value=True) as k:\n"
        "    e.Engine(build_model('tiny'), device='cpu')\n"
        "    assert k.call_count == 0\n"
        "    e.Engine(build_model('tiny'), device='cpu', keep_freed_memory=True)\n"
        "    assert k.call_count == 1\n"
        "print('ok')\n"
    )
    assert _run(code).strip().endswith("ok")


def test_reduced_precision_convolutions_run_channels_last_and_match():
    from ben2q.model.network import ConvNormAct, instance_norm_gelu_

    torch.manual_seed(0)
    x = (torch.randn(3, 8, 17, 9) * 2 + 1).contiguous(memory_format=torch.channels_last)
    y = instance_norm_gelu_(x.clone(), eps=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y, F.gelu(F.instance_norm(x, eps=1e-5)), atol=1e-5)
    block = ConvNormAct(4, 6)
    x = torch.randn(2, 4, 10, 12)
    with torch.inference_mode():
        ref = block(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = block(x)
    assert fast.dtype == torch.bfloat16
    assert fast.is_contiguous(memory_format=torch.channels_last)
    assert (fast.float() - ref).abs().max() < 0.05


def test_tiny_network_in_bf16_autocast_is_close_to_float32():
    model = build_model("tiny")
    model.load_state_dict(deterministic_state_dict(model))
    x = torch.randn(2, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = model(x).float()
    assert fast.shape == ref.shape == (2, 1, 512, 512)
    assert (fast - ref).abs().max() < 0.05


# --- oneDNN linear, sub-pixel upsampling convolution, reduced-precision attention ---------


def _packed_linear(seed: int = 0):
    from ben2q.model.kernels import Linear

    torch.manual_seed(seed)
    lin = Linear(24, 40)
    lin.pack_weights()
    return lin


@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24), (2, 3, 4, 24)])
def test_packed_linear_equals_f_linear(shape):
    lin = _packed_linear()
    x = torch.randn(*shape)
    plain = F.linear(x, lin.weight, lin.bias)
    with torch.inference_mode():
        fast, fast_gelu = lin(x), lin(x, gelu=True)
    assert lin._pack._packed is not None  # the oneDNN path was taken
    assert fast.shape == plain.shape
    assert (fast - plain).abs().max() < 1e-5
    assert (fast_gelu - F.gelu(plain)).abs().max() < 1e-5


def test_packed_weight_follows_the_weights():
    """A reordered copy must never outlive the weight it was made from."""
    lin = _packed_linear()
    x = torch.randn(5, 24)
    with torch.inference_mode():
        lin(x)
    with torch.no_grad():
        lin.weight.mul_(2.0)  # in place: seen by the version counter
    with torch.inference_mode():
        assert (lin(x) - F.linear(x, lin.weight, lin.bias)).abs().max() < 1e-5
    other = _packed_linear(seed=1)
    lin.load_state_dict(other.state_dict())  # new values copied in place
    with torch.inference_mode():
        assert (lin(x) - F.linear(x, other.weight, other.bias)).abs().max() < 1e-5
    lin.to(torch.float64)  # a new storage, and another dtype: the plain path
    assert lin._pack._packed is None
    with torch.inference_mode():
        y = lin(x.double())
    assert y.dtype == torch.float64 and lin._pack._packed is None


def test_packed_linear_keeps_autograd_and_autocast_on_the_plain_path():
    lin = _packed_linear()
    x = torch.randn(4, 24, requires_grad=True)
    y = lin(x, gelu=True)
    y.sum().backward()
    assert x.grad is not None and lin.weight.grad is not None
    assert lin._pack._packed is None  # autograd never used the packed copy
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x.detach()).dtype == torch.bfloat16


def test_engine_packs_only_for_float32_on_the_cpu(reduced_precision_on_cpu):
    from ben2q.engine import Engine
    from ben2q.model.kernels import Linear

    def packed(engine):
        return {m._pack is not None for m in engine.model.modules() if isinstance(m, Linear)}

    model = build_model("tiny")
    assert packed(Engine(model, device="cpu", precision="float32")) == {True}
    assert packed(Engine(build_model("tiny"), device="cpu", precision="bfloat16")) == {False}


@pytest.mark.parametrize("size", [(4, 4), (3, 5), (1, 1), (6, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample2_conv_equals_conv_of_the_upsampled_map(size, channels_last):
    from ben2q.model.network import upsample2_conv3x3

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 7, 3, padding=1)
    x = torch.randn(2, 5, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    got = upsample2_conv3x3(conv, x)
    assert got.shape == expected.shape == (2, 7, 2 * size[0], 2 * size[1])
    assert (got - expected).abs().max() < 1e-5
    nhwc = got.is_contiguous(memory_format=torch.channels_last)
    assert nhwc == (channels_last and size != (1, 1))
    got.sum().backward()  # differentiable: the weights get the gradient of the plain form
    plain_grad = torch.autograd.grad(expected.sum(), conv.weight)[0]
    assert torch.allclose(conv.weight.grad, plain_grad, atol=1e-4)


def test_up_conv_norm_act_equals_upsample_then_conv_norm_act():
    from ben2q.model.network import ConvNormAct, UpConvNormAct

    torch.manual_seed(0)
    up, plain = UpConvNormAct(6, 8).eval(), ConvNormAct(6, 8).eval()
    plain.load_state_dict(up.state_dict())
    x = torch.randn(2, 6, 9, 7)
    with torch.inference_mode():
        got = up(x)
        expected = plain[2](plain[1](plain[0](F.interpolate(x, scale_factor=2.0))))
    assert (got - expected).abs().max() < 1e-5


def test_reduced_precision_attention_matches_sdpa():
    from ben2q.model.kernels import attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 1, 1300, 32), torch.randn(2, 1, 700, 32), torch.randn(2, 1, 700, 32)
    expected = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(attention(q, k, v), expected)  # float32: SDPA itself
    got = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), chunk=512)  # 3 blocks, last short
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    assert (got.float() - expected).abs().max() < 0.02
