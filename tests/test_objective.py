from __future__ import annotations

import pytest
import torch

from receler import attach_erasers, erasers_disabled
from receler.erasers import eraser_parameters, record_eraser_outputs
from receler.objective import (
    anchor_loss,
    attack_step,
    erase_loss,
    erase_target,
    insert_soft_tokens,
    mask_loss,
)
from receler.pipeline import concept_token_indices, encode, unet_eps


@pytest.fixture
def setup(pipe):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    t = pipe.scheduler.config.num_train_timesteps // 2
    cond, uncond = encode(pipe, ["car"]), encode(pipe, [""])
    start = concept_token_indices(pipe.tokenizer, "car")[-1] + 1
    return pipe.unet, z, t, cond, uncond, start


def test_erase_target_is_negative_guidance():
    e0, ec = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    assert torch.equal(erase_target(e0, ec, 1.0), torch.tensor([-1.0, 3.0]))
    assert torch.equal(erase_target(e0, ec, 0.0), e0)


def test_soft_tokens_reach_the_unet(setup):
    unet, z, t, cond, _, start = setup
    soft = torch.zeros(4, cond.hidden.shape[-1], requires_grad=True)

    def eps(s):
        return unet_eps(unet, z, t, cond.with_hidden(insert_soft_tokens(cond.hidden, s, start)))

    out = eps(soft)
    out.square().mean().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0  # gradient reaches the tokens
    with torch.no_grad():
        assert not torch.allclose(eps(soft + 1.0), out)  # and they change the UNet's output
        hidden = insert_soft_tokens(cond.hidden, soft + 1.0, start)
        assert torch.equal(hidden[:, :start], cond.hidden[:, :start])  # concept untouched
        assert torch.equal(hidden[:, start:start + 4], (soft + 1.0).unsqueeze(0))


def test_reference_style_assignment_would_not_reach_the_unet(setup):
    """The public reference writes ``emb[:, idx, :].data = adv``: indexing with a tensor returns
    a copy, so ``emb`` never changes. This is the defect ``insert_soft_tokens`` avoids."""
    _, _, _, cond, _, start = setup
    emb = cond.hidden.clone()
    idx = torch.arange(start, start + 4)
    emb[:, idx, :].data = torch.ones(1, 4, emb.shape[-1])
    assert torch.equal(emb, cond.hidden)


def test_soft_tokens_that_do_not_fit_are_refused(setup):
    _, _, _, cond, _, start = setup
    with pytest.raises(ValueError, match="do not fit"):
        insert_soft_tokens(cond.hidden, torch.zeros(cond.hidden.shape[1], 16), start)


def test_attack_loss_falls_over_inner_steps(setup):
    unet, z, t, cond, uncond, start = setup
    erasers = attach_erasers(unet, rank=4)
    g = torch.Generator().manual_seed(1)
    for e in erasers.values():  # an erased model that differs from the frozen one
        with torch.no_grad():
            e.up.weight.copy_(0.5 * torch.randn(e.up.weight.shape, generator=g))
    with torch.no_grad(), erasers_disabled(unet):
        e_cond = unet_eps(unet, z, t, cond)
    soft = cond.hidden[0, start:start + 4].clone().requires_grad_(True)
    opt = torch.optim.Adam([soft], lr=0.05)

    def predict(s):
        return unet_eps(unet, z, t, cond.with_hidden(insert_soft_tokens(cond.hidden, s, start)))

    before = [p.clone() for p in eraser_parameters(unet)]
    losses = [attack_step(soft, opt, predict, e_cond) for _ in range(15)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(a, b) for a, b in zip(before, eraser_parameters(unet), strict=True))


def test_erase_loss_falls_over_a_few_steps(setup):
    unet, z, t, cond, uncond, _ = setup
    attach_erasers(unet, rank=8)
    with torch.no_grad(), erasers_disabled(unet):
        target = erase_target(unet_eps(unet, z, t, uncond), unet_eps(unet, z, t, cond), 1.0)
    opt = torch.optim.Adam(eraser_parameters(unet), lr=1e-2)
    losses = []
    for _ in range(10):
        loss = erase_loss(unet_eps(unet, z, t, cond), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_mask_loss_by_hand():
    # one eraser on a 2×2 layer; the mask keeps the top-left position. Channel 2 is
    # channel 1 mirrored, so the channel mean equals channel 1 squared.
    out = torch.tensor([[[1.0, -1.0], [2.0, -2.0], [3.0, -3.0], [4.0, -4.0]]])  # (B, HW, C=2)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])  # (B, h, w)
    # (2² + 3² + 4²) / 3 positions outside the mask
    assert mask_loss({"l": out}, mask, (2, 2)).item() == pytest.approx(29 / 3)
    assert mask_loss({"l": out}, torch.ones(1, 2, 2), (2, 2)).item() == 0.0
    two = {"a": out, "b": 2 * out}  # averaged over erasers: (29/3 + 4·29/3) / 2
    assert mask_loss(two, mask, (2, 2)).item() == pytest.approx(5 * 29 / 6)


def test_anchor_loss_by_hand_is_the_mask_loss_with_nothing_masked():
    out = torch.tensor([[[1.0, -1.0], [2.0, -2.0], [3.0, -3.0], [4.0, -4.0]]])
    assert anchor_loss({"l": out}).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    two = {"a": out, "b": 2 * out}
    assert anchor_loss(two).item() == pytest.approx(
        mask_loss(two, torch.zeros(1, 2, 2), (2, 2)).item())
    with pytest.raises(ValueError, match="shadow_eraser_outputs"):
        anchor_loss({})


def test_mask_loss_is_zero_for_fresh_erasers_and_has_a_gradient(setup):
    unet, z, t, cond, _, _ = setup
    erasers = attach_erasers(unet, rank=4)
    mask = torch.zeros(1, 2, 2)
    with record_eraser_outputs(unet) as outputs:
        unet_eps(unet, z, t, cond)
    assert set(outputs) == set(erasers)
    loss = mask_loss(outputs, mask, (8, 8))
    assert loss.item() == 0.0  # `up` starts at zero
    loss.backward()
    assert any(e.up.weight.grad is not None for e in erasers.values())
