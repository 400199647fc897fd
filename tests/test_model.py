"""The network's structure: checkpoint compatibility, building blocks, batching."""

from __future__ import annotations

import json

import pytest
import torch

from ben2q.model import SPECS, build_model, deterministic_state_dict, get_spec
from ben2q.model.decoder import image_to_views, sine_position_embedding, views_to_image
from ben2q.model.swin import (
    relative_position_index,
    shifted_window_region_mask,
    window_merge,
    window_partition,
)


def test_base_state_dict_matches_the_published_checkpoint_exactly(fixtures):
    manifest = json.loads((fixtures / "ben2_base_state_dict.json").read_text())
    state = build_model("base").state_dict()
    ours = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]
    theirs = [(e["key"], e["shape"], e["dtype"]) for e in manifest["keys"]]
    assert len(ours) == manifest["tensors"] == 535
    assert ours == theirs  # same keys, shapes, dtypes and order
    n_params = sum(v.numel() for k, v in state.items() if not k.endswith("position_index"))
    assert n_params == manifest["parameters"] == 94_134_658


def test_tiny_spec_is_small_and_the_same_architecture():
    tiny = build_model("tiny")
    base_keys = {k for k in build_model("base").state_dict()}
    tiny_keys = set(tiny.state_dict())
    # Same module tree; only the repeated Swin blocks of stage 3 are fewer.
    assert tiny_keys <= base_keys
    assert {k for k in base_keys - tiny_keys if ".blocks." not in k} == set()
    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000
    assert get_spec("tiny").input_size == 512
    with pytest.raises(ValueError, match="unknown model spec"):
        get_spec("huge")
    assert set(SPECS) == {"base", "tiny"}


def test_relative_position_index_is_the_swin_table_index():
    idx = relative_position_index(3)
    assert idx.shape == (9, 9)
    assert idx.min() == 0 and idx.max() == (2 * 3 - 1) ** 2 - 1
    # token (0,0) vs token (2,2): offset (-2,-2) -> row 0, col 0 of the (5x5) table
    assert idx[0, 8] == 0
    assert idx[8, 0] == 24
    assert torch.equal(idx.diagonal(), torch.full((9,), 12))


def test_region_mask_separates_the_rolled_regions():
    mask = shifted_window_region_mask(8, 8, window=4, shift=2, device=torch.device("cpu"))
    assert mask.shape == (4, 16, 16)
    assert torch.all(mask[0] == 0)  # the top-left window lies in one region
    assert set(mask[3].unique().tolist()) == {-100.0, 0.0}
    assert torch.equal(mask, mask.transpose(1, 2))


def test_window_and_view_reshapes_are_inverse():
    x = torch.randn(2, 24, 36, 5)
    assert torch.equal(window_merge(window_partition(x, 12), 12, 24, 36), x)
    img = torch.randn(3, 4, 10, 6)
    views = image_to_views(img)
    assert views.shape == (4, 3, 4, 5, 3)
    assert torch.equal(views[1], img[:, :, :5, 3:])  # row 0, column 1
    assert torch.equal(views[2], img[:, :, 5:, :3])
    assert torch.equal(views_to_image(views), img)


def test_sine_position_embedding_layout():
    pos = sine_position_embedding(3, 4, 8)
    assert pos.shape == (12, 8)
    # y half first: constant along a row; x half: constant along a column
    assert torch.allclose(pos[0, :4], pos[3, :4]) and not torch.allclose(pos[0, :4], pos[4, :4])
    assert torch.allclose(pos[0, 4:], pos[4, 4:]) and not torch.allclose(pos[0, 4:], pos[1, 4:])
    assert torch.all(pos.abs() <= 1)


def test_batched_forward_equals_one_image_at_a_time():
    model = build_model("tiny")
    model.load_state_dict(deterministic_state_dict(model))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 512, 512, generator=g)
    with torch.inference_mode():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    assert batched.shape == (3, 1, 512, 512)
    assert torch.all((batched >= 0) & (batched <= 1))
    assert (batched - single).abs().max() < 1e-4
    # and the images really differ, so the comparison means something
    assert (batched[0] - batched[1]).abs().max() > 1e-3


def test_deterministic_weights_follow_the_recipe():
    model = build_model("tiny")
    state = deterministic_state_dict(model)
    assert torch.equal(state["output.0.bias"], deterministic_state_dict(model)["output.0.bias"])
    ln = state["backbone.norm0.weight"]
    assert abs(ln.mean().item() - 1.0) < 0.1  # 1 + 0.1 z
    idx_key = "backbone.layers.0.blocks.0.attn.relative_position_index"
    assert torch.equal(state[idx_key], model.state_dict()[idx_key])
