from __future__ import annotations

import pytest
import torch
from conftest import tiny_unet

from receler.attention import (
    binary_mask,
    capture_cross_attention,
    concept_attention,
    default_mask_resolution,
    guidance_map,
    layer_hw,
    resize_mask,
)
from receler.erasers import find_cross_attention
from receler.pipeline import encode


def test_capture_records_cross_attention_only_and_restores_processors():
    unet = tiny_unet()
    before = {n: type(p) for n, p in unet.attn_processors.items()}
    z, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 6, 16)
    with torch.no_grad(), capture_cross_attention(unet) as maps:
        unet(z, 5, encoder_hidden_states=ctx)
    assert set(maps) == set(find_cross_attention(unet))
    for probs in maps.values():
        assert probs.shape[0] == 1 and probs.shape[-1] == 6  # (B, heads, HW, tokens)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert {n: type(p) for n, p in unet.attn_processors.items()} == before
    with pytest.raises(RuntimeError), capture_cross_attention(unet):
        raise RuntimeError("boom")
    assert {n: type(p) for n, p in unet.attn_processors.items()} == before


def synthetic_maps():
    """Token 1 looks at the top-left quadrant, token 2 at the bottom-right, of an 8×8 map."""
    probs = torch.full((1, 2, 64, 4), 1e-3)  # (B, heads, HW, tokens)
    grid = probs.view(1, 2, 8, 8, 4)
    grid[:, :, :4, :4, 1] = 1.0
    grid[:, :, 4:, 4:, 2] = 1.0
    return {"down_blocks.0.attn2": probs, "mid_block.attn2": torch.full((1, 2, 16, 4), 0.25)}


def test_mask_comes_from_the_concepts_tokens():
    maps = synthetic_maps()
    m1 = binary_mask(concept_attention(maps, [1], (8, 8), resolution=8), 0.1)
    m2 = binary_mask(concept_attention(maps, [2], (8, 8), resolution=8), 0.1)
    expected1 = torch.zeros(1, 8, 8)
    expected1[:, :4, :4] = 1
    assert torch.equal(m1, expected1)
    assert torch.equal(m2, expected1.flip(-1).flip(-2))


def test_mask_differs_between_concepts_on_a_real_unet(pipe):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = encode(pipe, ["car dog"])
    with torch.no_grad(), capture_cross_attention(pipe.unet) as maps:
        pipe.unet(z, 500, encoder_hidden_states=cond.hidden)
    a_car = concept_attention(maps, [1], (8, 8))
    a_dog = concept_attention(maps, [2], (8, 8))
    assert a_car.shape == (1, 4, 4)  # latent/4 = 2 has no cross-attention: nearest is 4
    assert not torch.equal(a_car, a_dog)


@pytest.mark.parametrize(("tokens", "latent", "hw"), [
    (64 * 64, (64, 64), (64, 64)), (16 * 16, (64, 64), (16, 16)), (8 * 8, (64, 64), (8, 8)),
    (12 * 16, (96, 128), (12, 16)), (3 * 3, (9, 9), (3, 3)), (2 * 2, (9, 9), (2, 2)),
])
def test_layer_hw(tokens, latent, hw):
    assert layer_hw(tokens, latent) == hw


def test_layer_hw_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="does not fit"):
        layer_hw(50, (64, 64))


@pytest.mark.parametrize(("available", "latent", "expected"), [
    ([64, 32, 16, 8], 64, 16),  # SD 1.x: 64×64 latent → 16×16
    ([96, 48, 24, 12], 96, 24),  # SD 2.x 768 px
    ([64, 32], 128, 32),  # SDXL-style 1024 px: cross-attention at 64 and 32 only
    ([16, 8], 16, 8),  # toy: latent/4 = 4 is absent → nearest, 8
])
def test_default_mask_resolution(available, latent, expected):
    assert default_mask_resolution(available, latent) == expected


def test_resize_mask_keeps_the_concept_when_shrinking():
    mask = torch.zeros(1, 8, 8)
    mask[0, 3, 3] = 1  # a single concept pixel
    small = resize_mask(mask, (2, 2))
    assert small.sum() == 1 and small[0, 0, 0] == 1
    big = resize_mask(mask, (16, 16))
    assert big.sum() == 4 and torch.equal(resize_mask(big, (8, 8)), mask)


def test_missing_resolution_is_a_clear_error():
    with pytest.raises(ValueError, match=r"resolution 32.*\[4, 8\]"):
        concept_attention(synthetic_maps(), [1], (8, 8), resolution=32)


def test_guidance_mask_marks_where_the_concept_changes_the_prediction():
    e_uncond = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(0)) * 0.01
    e_cond = e_uncond.clone()
    e_cond[0, :, 8:, :6] += 1.0  # image 0: the concept acts on the lower left
    e_cond[1, :, :4, 6:] -= 1.0  # image 1: on the upper right (the sign must not matter)
    g = guidance_map(e_uncond, e_cond, resolution=4)
    assert g.shape == (2, 4, 3)  # the latent's aspect ratio is kept
    mask = binary_mask(g, 0.4)  # a pooled cell half covered by the concept scores ~0.5
    expected = torch.zeros(2, 4, 3)
    expected[0, 2:, :2] = 1  # rows 8-15 → pooled rows 2-3; columns 0-5 → pooled columns 0-1
    expected[1, 0, 1:] = 1  # rows 0-3 → pooled row 0; columns 6-11 → pooled columns 1-2
    assert torch.equal(mask, expected)
