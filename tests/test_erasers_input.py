"""Erasers at the ``"input"`` site: on the text tokens each cross-attention attends to."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_unet
from test_erasers import UNETS, randomise, run

from receler import (
    EraserConfig,
    TrainConfig,
    attach_erasers,
    erasers_disabled,
    get_erasers,
    load_erasers,
    remove_erasers,
    save_erasers,
)
from receler.erasers import find_cross_attention, shadow_eraser_outputs
from receler.objective import insert_soft_tokens
from receler.serialization import CONFIG_FILE


@pytest.mark.parametrize("kind", UNETS)
def test_input_erasers_are_sized_by_the_text_width_and_start_as_identity(kind):
    unet = UNETS[kind]()
    before = run(unet)
    erasers = attach_erasers(unet, rank=4, site="input")
    assert len(erasers) == len(find_cross_attention(unet)) > 0
    assert {e.dim for e in erasers.values()} == {unet.config.cross_attention_dim}
    assert {e.site for e in erasers.values()} == {"input"}
    assert torch.equal(run(unet), before)  # zero-initialised `up`: exact identity
    randomise(erasers)
    assert not torch.allclose(run(unet), before)
    with erasers_disabled(unet):
        assert torch.equal(run(unet), before)
    remove_erasers(unet)
    assert torch.equal(run(unet), before)


def test_an_input_eraser_is_the_same_as_editing_the_text_tokens():
    """The hook erases each token on its own: the UNet with input erasers gives what the
    plain UNet gives on tokens the eraser has changed, when every layer shares one eraser."""
    unet = tiny_unet()
    erasers = attach_erasers(unet, rank=4, site="input")
    randomise(erasers)
    first = next(iter(erasers.values()))
    for e in erasers.values():
        e.load_state_dict(first.state_dict())
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        erased = unet(z, 10, encoder_hidden_states=ctx).sample
        with erasers_disabled(unet):
            edited = unet(z, 10, encoder_hidden_states=ctx + first(ctx)).sample
    torch.testing.assert_close(erased, edited, rtol=0, atol=1e-6)  # same ops, other order


def test_soft_tokens_pass_through_input_erasers_with_gradients():
    """An attack's soft tokens reach the erasers (and the erasers' change reaches them)."""
    unet = tiny_unet().requires_grad_(False)
    erasers = attach_erasers(unet, rank=4, site="input")
    randomise(erasers)
    ctx = torch.randn(1, 6, unet.config.cross_attention_dim)
    soft = torch.zeros(2, unet.config.cross_attention_dim, requires_grad=True)
    z = torch.randn(1, 4, 8, 8)
    with shadow_eraser_outputs(unet) as outs, torch.no_grad():
        unet(z, 10, encoder_hidden_states=ctx)
    assert all(o.shape == ctx.shape for o in outs.values())  # one output per text token
    out = unet(z, 10, encoder_hidden_states=insert_soft_tokens(ctx, soft, 2)).sample
    (grad,) = torch.autograd.grad(out.square().mean(), [soft])
    assert grad.abs().sum() > 0


@pytest.mark.parametrize(("site", "act"), [("input", "gelu"), ("output", "linear"),
                                         ("input", "linear")])
def test_erasers_round_trip_with_their_site_and_activation(site, act, tmp_path):
    unet = tiny_unet()
    before = run(unet)
    erasers = attach_erasers(unet, rank=4, site=site, act=act)
    assert torch.equal(run(unet), before)  # identity at start
    randomise(erasers)
    expected = run(unet)
    save_erasers(unet, tmp_path, EraserConfig(concepts=["car"]))
    saved = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert (saved["site"], saved["act"]) == (site, act)
    fresh = tiny_unet()
    cfg = load_erasers(fresh, tmp_path)
    assert (cfg.site, cfg.act) == (site, act)
    assert {(e.site, e.act) for e in get_erasers(fresh).values()} == {(site, act)}
    assert torch.equal(run(fresh), expected)


def test_a_config_that_names_the_wrong_site_is_refused(tmp_path):
    unet = tiny_unet()
    attach_erasers(unet, rank=4, site="input")
    save_erasers(unet, tmp_path, EraserConfig(concepts=["car"]))
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    cfg["site"] = "output"  # tiny_unet's output channels differ from its text width
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trained for another UNet"):
        load_erasers(tiny_unet(), tmp_path)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"eraser_site": "keys"}, "eraser_site must be one of output, input"),
    ({"eraser_site": "input", "reg_weight": 0.1}, "pass --reg-weight 0"),
])
def test_bad_site_settings_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(concepts="car", **kwargs)
    with pytest.raises(ValueError, match="eraser site must be one of"):
        attach_erasers(tiny_unet(), rank=4, site="keys")


def test_trainer_trains_input_erasers(pipe, tmp_path):
    from receler import erase

    cfg = TrainConfig(concepts="car", iterations=2, rank=4, ddim_steps=3, eraser_site="input",
                      reg_weight=0.0, anchor_weight=1.0, anchors="|dog", adv_steps=1,
                      adv_tokens=2, checkpoint_every=1, mask_image_every=0)
    saved = erase(pipe, cfg, tmp_path / "run", show_progress=False)
    assert saved.site == "input"
    erasers = get_erasers(pipe.unet)
    assert {e.site for e in erasers.values()} == {"input"}
    assert any(e.up.weight.abs().sum() > 0 for e in erasers.values())  # they were trained


def test_a_linear_eraser_is_a_low_rank_affine_map():
    from receler.erasers import Eraser

    e = Eraser(6, 3, act="linear", generator=torch.Generator().manual_seed(0))
    torch.nn.init.normal_(e.up.weight)
    a, b = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    assert torch.allclose(e(a) + e(b) - e(torch.zeros(6)), e(a + b), atol=1e-5)  # affine
    assert torch.equal(e(a), e.up(e.down(a)))


def test_bad_activation_is_a_one_line_error():
    with pytest.raises(ValueError, match="eraser_act must be one of gelu, linear"):
        TrainConfig(concepts="car", eraser_act="relu")
    with pytest.raises(ValueError, match="eraser activation must be one of"):
        attach_erasers(tiny_unet(), rank=4, act="relu")
