"""The attacks work: on the unerased toy model, soft tokens appended to a neutral prompt
bring a class back far more often than the neutral prompt alone, as the toy detector sees."""

from __future__ import annotations

import pytest

from receler.attack import AttackConfig, target_latents
from receler.protocol import measure_attacks
from receler.sampling import SamplerSettings


@pytest.fixture(scope="module")
def toy():
    toyworld = pytest.importorskip("receler.toyworld")
    try:
        path = toyworld.default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from receler.eval import get_detector
    from receler.pipeline import load_pipeline

    return load_pipeline(str(path), device="cpu"), SamplerSettings.for_model(path), \
        get_detector("toy")


def test_attack_beats_the_plain_prompt_on_the_base_model(toy):
    pipe, settings, detector = toy
    config = AttackConfig(tokens=8, steps=60, lr=0.05, target_images=4, noise_draws=8,
                          candidates=16, sweeps=1)
    latents = target_latents(pipe, "a photo of a star", config.target_images,
                             steps=settings.steps, guidance=settings.guidance)
    res = measure_attacks(pipe, "star", "a photo of a", latents, detector, settings, config,
                          n_images=16)
    assert res["soft_loss"][1] < res["soft_loss"][0]
    # the greedy search keeps its best words, so its loss cannot rise: it must have found
    # better words than its random start
    assert res["discrete_loss"][1] < res["discrete_loss"][0]
    assert res["success_soft"] >= res["success_plain"] + 0.25, res
