from __future__ import annotations

import pytest
import torch
from conftest import tiny_unet
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

from receler import attach_erasers, erasers_disabled, get_erasers, remove_erasers
from receler.erasers import (
    count_parameters,
    eraser_parameters,
    find_cross_attention,
    shadow_eraser_outputs,
)


def sd2_like_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=12, attention_head_dim=(2, 4), use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def sdxl_like_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=20, attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 12,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


def run(unet: UNet2DConditionModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    c = unet.config
    z = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    ctx = torch.randn(2, 5, c.cross_attention_dim, generator=g)
    kw = {}
    if c.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 12, generator=g),
                                   "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(z, 10, encoder_hidden_states=ctx, **kw).sample


def randomise(erasers) -> None:
    g = torch.Generator().manual_seed(2)
    for e in erasers.values():
        with torch.no_grad():
            e.up.weight.copy_(torch.randn(e.up.weight.shape, generator=g))


UNETS = {"sd1": tiny_unet, "sd2": sd2_like_unet, "sdxl": sdxl_like_unet}


@pytest.mark.parametrize("kind", UNETS)
def test_one_eraser_per_cross_attention_and_identity_at_start(kind):
    unet = UNETS[kind]()
    before = run(unet)
    n_attn2 = sum(1 for name, m in unet.named_modules() if name.endswith("attn2") and m is not None)
    erasers = attach_erasers(unet, rank=4)
    assert len(erasers) == n_attn2 == len(find_cross_attention(unet)) > 0
    assert all(e.dim == find_cross_attention(unet)[n].to_out[0].out_features
               for n, e in erasers.items())
    assert torch.equal(run(unet), before)  # zero-initialised `up`: exact identity


@pytest.mark.parametrize("kind", UNETS)
def test_disable_enable_and_remove(kind):
    unet = UNETS[kind]()
    base = run(unet)
    keys = set(unet.state_dict())
    erasers = attach_erasers(unet, rank=4)
    randomise(erasers)
    erased = run(unet)
    assert not torch.allclose(erased, base)
    with erasers_disabled(unet):
        assert torch.equal(run(unet), base)
    assert torch.equal(run(unet), erased)  # back on after the block
    with pytest.raises(RuntimeError), erasers_disabled(unet):
        raise RuntimeError("boom")
    assert all(e.enabled for e in erasers.values())  # restored on error too
    removed = remove_erasers(unet)
    assert set(removed) == set(erasers) and not get_erasers(unet)
    assert set(unet.state_dict()) == keys
    assert torch.equal(run(unet), base)


def test_works_with_any_attention_processor():
    unet = tiny_unet()
    erasers = attach_erasers(unet, rank=4)
    randomise(erasers)
    sdpa = run(unet)
    unet.set_attn_processor(AttnProcessor())  # plain, non-SDPA processor
    torch.testing.assert_close(run(unet), sdpa, rtol=1e-4, atol=1e-5)  # same math, other kernel
    with erasers_disabled(unet):
        assert not torch.allclose(run(unet), sdpa)


def test_attach_twice_is_refused_and_changes_nothing():
    unet = tiny_unet()
    attach_erasers(unet, rank=4)
    with pytest.raises(ValueError, match="already attached"):
        attach_erasers(unet, rank=8)
    assert {e.rank for e in get_erasers(unet).values()} == {4}


def test_only_erasers_are_trainable_and_base_is_untouched():
    unet = tiny_unet().requires_grad_(False)
    attach_erasers(unet, rank=4)
    params = eraser_parameters(unet)
    assert {id(p) for p in params} == {id(p) for p in unet.parameters() if p.requires_grad}


def test_sd14_budget_is_about_0_37_percent():
    """The paper's size claim, on SD 1.4's real UNet config (built on the meta device)."""
    sd14 = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                cross_attention_dim=768, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd14)
        erasers = attach_erasers(unet, rank=128)
    base = sum(p.numel() for n, p in unet.named_parameters() if ".eraser." not in n)
    assert len(erasers) == 16
    ratio = count_parameters(erasers) / base
    assert 0.0036 < ratio < 0.0038, ratio


def test_shadow_outputs_leave_the_base_output_and_train_only_the_erasers():
    unet = tiny_unet().requires_grad_(False)
    base = run(unet)
    erasers = attach_erasers(unet, rank=4)
    randomise(erasers)
    assert not torch.allclose(run(unet), base)  # the erasers do change the output...
    with erasers_disabled(unet), shadow_eraser_outputs(unet) as outs:
        shadowed = run(unet)  # under no_grad, as the frozen passes of training run
    assert torch.equal(shadowed, base)  # ...but not while shadowed
    assert set(outs) == set(erasers)
    loss = sum(o.pow(2).sum() for o in outs.values())
    loss.backward()
    assert all(e.up.weight.grad is not None and e.up.weight.grad.abs().sum() > 0
               for e in erasers.values())
    assert all(p.grad is None for n, p in unet.named_parameters() if ".eraser." not in n)
    assert not any(e.shadow or e.recorder for e in erasers.values())  # restored after


def test_eraser_is_the_residual_mlp_in_its_own_dtype():
    """The functional forward is up(GELU(down(a))) with the layers' weights, computed in the
    eraser's dtype and returned in the input's."""
    from receler.erasers import Eraser

    e = Eraser(6, 4, generator=torch.Generator().manual_seed(0))
    torch.nn.init.normal_(e.up.weight)
    torch.nn.init.normal_(e.up.bias)
    a = torch.randn(2, 5, 6)
    expected = e.up(torch.nn.functional.gelu(e.down(a)))
    assert torch.equal(e(a), expected)
    half = e(a.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), e(a.to(torch.bfloat16).float()).to(torch.bfloat16).float())
