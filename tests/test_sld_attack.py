"""Attacks on SLD go through its guidance: the attacked prompt's prediction is SLD's guided
``ε_c − γ`` with gradients, on a tiny pipeline."""

from __future__ import annotations

import json

import numpy as np
import torch

from receler.attack import AttackConfig, soft_attack_trajectory, target_latents
from receler.attack_suite import soft_attack_suite, suite_key
from receler.eval.detectors import get_detector
from receler.methods import edit_disabled, remove_edit
from receler.methods.sld import (
    SldOptions,
    attach_sld,
    attacked_through_guidance,
    get_sld,
    through_guidance,
    warmup_timestep,
)
from receler.pipeline import encode, unet_eps
from receler.sampling import SamplerSettings, generate, scheduler_class

SETTINGS = SamplerSettings(steps=4, guidance=3.0)
OPTS = dict(warmup=1, guidance=10.0, threshold=0.01, momentum=0.3, beta=0.4)


def by_hand(pipe, z, t, cond, safety):
    """SLD's guided conditional prediction without momentum, from separate UNet calls."""
    e_c = unet_eps(pipe.unet, z, t, cond)
    e_u = unet_eps(pipe.unet, z, t, encode(pipe, [""]))
    e_s = unet_eps(pipe.unet, z, t, safety)
    diff = e_c - e_s
    scale = torch.where(diff >= 0.01, 0.0, torch.clamp(diff.abs() * 10.0, max=1.0))
    return e_c, e_c - (e_s - e_u) * scale


def test_warmup_timestep_is_the_samplers_step_after_warmup(pipe):
    sched = scheduler_class("ddim").from_config(pipe.scheduler.config)
    sched.set_timesteps(4)
    assert warmup_timestep(pipe, SldOptions(warmup=1), SETTINGS) == float(sched.timesteps[1])
    assert warmup_timestep(pipe, SldOptions(warmup=0), SETTINGS) == float(sched.timesteps[0])
    assert warmup_timestep(pipe, SldOptions(warmup=4), SETTINGS) == float("-inf")


def test_attacked_call_is_the_guided_prediction_below_the_warmup_timestep(pipe):
    torch.manual_seed(0)
    z = torch.randn(1, 4, 8, 8)
    cond, safety = encode(pipe, ["a photo of car"]), encode(pipe, ["car"])
    t_warm = warmup_timestep(pipe, SldOptions(**OPTS), SETTINGS)
    high, low = int(t_warm) + 100, int(t_warm) - 100
    bare_high, _ = by_hand(pipe, z, high, cond, safety)
    bare_low, guided_low = by_hand(pipe, z, low, cond, safety)
    assert not torch.allclose(guided_low, bare_low)  # γ is not zero here
    attach_sld(pipe, ["car"], SldOptions(**OPTS))
    try:
        assert unet_eps(pipe.unet, z, low, cond).shape == z.shape
        torch.testing.assert_close(unet_eps(pipe.unet, z, low, cond), bare_low)  # outside: bare
        with through_guidance(pipe, SETTINGS) as active:
            assert active
            # one batch of two timesteps: guided only where the sampler guides
            got = unet_eps(pipe.unet, torch.cat([z, z]), torch.tensor([high, low]),
                           cond.with_hidden(cond.hidden.expand(2, -1, -1)))
        torch.testing.assert_close(got[:1], bare_high, rtol=0, atol=1e-5)
        torch.testing.assert_close(got[1:], guided_low, rtol=0, atol=1e-5)
        with edit_disabled(pipe):
            assert not attacked_through_guidance(pipe)
            with through_guidance(pipe, SETTINGS) as active:
                assert not active
                torch.testing.assert_close(unet_eps(pipe.unet, z, low, cond), bare_low)
    finally:
        remove_edit(pipe)


def test_gradients_reach_the_prompt_through_the_safety_term(pipe):
    torch.manual_seed(0)
    z = torch.randn(1, 4, 8, 8)
    cond = encode(pipe, ["a photo of car"])
    low = int(warmup_timestep(pipe, SldOptions(**OPTS), SETTINGS)) - 100

    def grad(active: bool):
        hidden = cond.hidden.clone().requires_grad_(True)
        if active:
            with through_guidance(pipe, SETTINGS):
                out = unet_eps(pipe.unet, z, low, cond.with_hidden(hidden))
        else:
            out = unet_eps(pipe.unet, z, low, cond.with_hidden(hidden))
        out.pow(2).mean().backward()
        return hidden.grad

    bare = grad(False)
    attach_sld(pipe, ["car"], SldOptions(**OPTS))
    try:
        through = grad(True)
    finally:
        remove_edit(pipe)
    assert through is not None and torch.isfinite(through).all() and through.abs().sum() > 0
    assert not torch.allclose(through, bare)  # the safety term's dependence on ε_c counts


def test_generation_after_an_attack_is_unchanged(pipe):
    prompts, seeds = ["a photo of car", "a photo of dog"], [0, 1]
    attach_sld(pipe, ["car"], SldOptions(**OPTS))
    try:
        before = [np.asarray(im) for im in generate(pipe, prompts, seeds, settings=SETTINGS)]
        z = target_latents(pipe, "a photo of car", 2, steps=2, guidance=3.0,
                           base=lambda: edit_disabled(pipe))
        cfg = AttackConfig(tokens=2, steps=2, target_images=2, noise_draws=2)
        with through_guidance(pipe, SETTINGS):
            _, losses = soft_attack_trajectory(pipe, "a photo of car", z, cfg, [2])
        assert all(np.isfinite(losses))
        after = [np.asarray(im) for im in generate(pipe, prompts, seeds, settings=SETTINGS)]
    finally:
        remove_edit(pipe)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_suite_attacks_sld_through_its_guidance_under_a_key_of_its_own(
        pipe, colour_detector, tmp_path, monkeypatch):
    from receler import attack_suite

    seen = []
    real = attack_suite.soft_attack_trajectory

    def spy(pipe_, *args, **kwargs):
        seen.append(attacked_through_guidance(pipe_) and get_sld(pipe_.unet).attack_t is not None)
        return real(pipe_, *args, **kwargs)

    monkeypatch.setattr(attack_suite, "soft_attack_trajectory", spy)
    z = target_latents(pipe, "a photo of car", 2, steps=2, guidance=3.0)
    cfg = AttackConfig(tokens=2, steps=2, target_images=2, noise_draws=2)
    det = get_detector(colour_detector)
    key = suite_key("erased", colour_detector, "a photo of car", SETTINGS)
    plan = [("a photo of car", 0)]
    kwargs = dict(checkpoints=[1], n_images=1, key=key, cache_dir=tmp_path)
    attach_sld(pipe, ["car"], SldOptions(**OPTS))
    try:
        soft_attack_suite(pipe, "car", plan, z, det, SETTINGS, cfg, **kwargs)
        with edit_disabled(pipe):
            soft_attack_suite(pipe, "car", plan, z, det, SETTINGS, cfg, **kwargs)
    finally:
        remove_edit(pipe)
    assert seen == [True, False]
    keys = [json.loads(p.read_text())["key"] for p in tmp_path.glob("attack_*.json")]
    assert sorted(k.get("through_guidance", False) for k in keys) == [False, True]

