from __future__ import annotations

import pytest
import torch

from receler import attach_erasers, erasers_disabled
from receler.attack import (
    AttackConfig,
    DenoisingLoss,
    discrete_token_attack,
    generate_from_embedding,
    soft_prompt_attack,
    target_latents,
)
from receler.pipeline import encode
from receler.sampling import SamplerSettings, generate


@pytest.fixture
def erased_pipe(pipe):
    erasers = attach_erasers(pipe.unet, rank=4)
    g = torch.Generator().manual_seed(0)
    for e in erasers.values():
        with torch.no_grad():
            e.up.weight.copy_(0.5 * torch.randn(e.up.weight.shape, generator=g))
    return pipe


def targets(pipe):
    return target_latents(pipe, "car", 2, steps=3, guidance=3.0,
                          base=lambda: erasers_disabled(pipe.unet))


def test_targets_come_from_the_base_model(erased_pipe):
    base = targets(erased_pipe)
    erased = target_latents(erased_pipe, "car", 2, steps=3, guidance=3.0)
    assert base.shape == (2, 4, 8, 8) and not torch.allclose(base, erased)


def test_soft_attack_lowers_the_denoising_loss_of_the_erased_model(erased_pipe):
    latents = targets(erased_pipe)
    hidden, losses = soft_prompt_attack(erased_pipe, "a photo of", latents,
                                        AttackConfig(tokens=4, steps=25, lr=0.05, noise_draws=8))
    fixed = DenoisingLoss(erased_pipe, latents, 16, seed=99).sample()
    loss = DenoisingLoss(erased_pipe, latents, 16, seed=99)
    with torch.no_grad():
        before = loss(encode(erased_pipe, ["a photo of"]), fixed).item()
        after = loss(encode(erased_pipe, ["a photo of"]).with_hidden(hidden), fixed).item()
    assert after < before, (before, after)  # measured on fresh draws, not the training ones
    images = generate_from_embedding(erased_pipe, hidden, [1, 2], SamplerSettings(steps=3))
    plain = generate(erased_pipe, ["a photo of"] * 2, [1, 2], settings=SamplerSettings(steps=3))
    assert len(images) == 2 and images[0].tobytes() != plain[0].tobytes()


def test_discrete_attack_appends_vocabulary_words_and_improves(erased_pipe):
    config = AttackConfig(tokens=3, sweeps=1, candidates=8, noise_draws=4)
    latents = targets(erased_pipe)
    prompt, history = discrete_token_attack(erased_pipe, "a photo of", latents, config)
    words = prompt.split()
    assert words[:3] == ["a", "photo", "of"] and len(words) == 6
    vocab = {t[:-4] for t in erased_pipe.tokenizer.get_vocab() if t.endswith("</w>")}
    assert set(words[3:]) <= vocab
    assert len(history) == 1 + 3
    assert history[-1] < history[0]  # the search found better words than the random start


@pytest.mark.parametrize("field", ["tokens", "steps", "sweeps", "candidates"])
def test_bad_attack_settings_are_refused(field):
    with pytest.raises(ValueError, match=field):
        AttackConfig(**{field: 0})


def test_batched_losses_equal_one_by_one(erased_pipe):
    latents = targets(erased_pipe)
    loss = DenoisingLoss(erased_pipe, latents, 3, seed=5)
    batch = loss.sample()
    prompts = ["a photo of car", "dog", "the red truck"]
    many = loss.many(encode(erased_pipe, prompts), batch, max_batch=6)  # 2 prompts per call
    with torch.no_grad():
        one = torch.stack([loss(encode(erased_pipe, [p]), batch) for p in prompts])
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)  # batching changes the kernels
