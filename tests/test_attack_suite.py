"""K independent soft attacks pooled, their Wilson interval and their cache, on a tiny pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from receler import attack_suite
from receler.attack import AttackConfig, soft_attack_trajectory, soft_prompt_attack, target_latents
from receler.attack_suite import attack_plan, soft_attack_suite, suite_key
from receler.eval.detectors import get_detector
from receler.eval.metrics import wilson
from receler.eval.prompts import PromptRow
from receler.pipeline import encode
from receler.sampling import SamplerSettings

CONFIG = AttackConfig(tokens=2, steps=3, target_images=2, noise_draws=2)
SETTINGS = SamplerSettings(steps=2, guidance=3.0)


def latents(pipe):
    return target_latents(pipe, "a photo of a car", 2, steps=2, guidance=3.0)


def test_trajectory_checkpoints_are_the_shorter_runs(pipe):
    z = latents(pipe)
    kept, losses = soft_attack_trajectory(pipe, "a photo of a car", z, CONFIG, [0, 2, 4])
    assert sorted(kept) == [0, 2, 4] and len(losses) == 4
    # step 0 is the prompt itself; Adam has no schedule, so step 2 of a 4-step run is a 2-step run
    assert torch.equal(kept[0], encode(pipe, ["a photo of a car"]).hidden)
    short, _ = soft_prompt_attack(pipe, "a photo of a car", z, AttackConfig(
        tokens=2, steps=2, target_images=2, noise_draws=2))
    assert torch.equal(kept[2], short)
    with pytest.raises(ValueError, match="do not fit"):
        soft_attack_trajectory(pipe, "a photo of a car", z, AttackConfig(tokens=30), [1])


def rows(concept_prompts: list[str], paraphrases: list[str]) -> dict[str, list[PromptRow]]:
    simple = [PromptRow(i, p, i, "car") for i, p in enumerate(concept_prompts)]
    simple.append(PromptRow(9, "a photo of a dog", 9, "dog"))
    return {"simple": simple, "paraphrase": [PromptRow(i, p, i, "car")
                                             for i, p in enumerate(paraphrases)]}


@pytest.mark.parametrize("simple, para, k, expected", [
    (["a photo of a car"] * 3, ["a red picture", "the blue"], 5,
     ["a photo of a car", "a red picture", "the blue", "a photo of a car", "a red picture"]),
    (["a photo of a car", "a car"], ["a red picture"], 3,
     ["a photo of a car", "a red picture", "a car"]),
    (["a photo of a car"], [], 2, ["a photo of a car", "a photo of a car"]),
])
def test_attack_plan_mixes_the_concepts_prompts_with_own_seeds(simple, para, k, expected):
    plan = attack_plan(rows(simple, para), "car", k, first="a photo of a car", seed=7)
    assert [p for p, _ in plan] == expected
    assert [s for _, s in plan] == list(range(7, 7 + k))  # a repeated prompt has its own seed


def test_suite_pools_k_attacks_with_a_wilson_interval_and_caches_each(pipe, colour_detector,
                                                                     tmp_path, monkeypatch):
    z, det = latents(pipe), get_detector(colour_detector)
    plan = attack_plan(rows(["a photo of a car"], ["a red picture"]), "car", 3,
                       first="a photo of a car")
    key = suite_key("erased", colour_detector, "a photo of a car", SETTINGS)
    kwargs = dict(checkpoints=[0, 2], n_images=2, key=key, cache_dir=tmp_path)
    out = soft_attack_suite(pipe, "car", plan, z, det, SETTINGS, CONFIG, **kwargs)
    assert len(out["attacks"]) == 3 and len(list(tmp_path.glob("attack_*.json"))) == 3
    seeds = [a["image_seeds"] for a in out["attacks"]]
    assert seeds == [[1000, 1001], [1002, 1003], [1004, 1005]]  # no two attacks share an image
    for s in ("0", "2"):
        hits = sum(a["steps"][s]["successes"] for a in out["attacks"])
        expected = wilson(hits, 6)
        assert out["pooled"][s]["total"] == 6
        assert (out["pooled"][s]["low"], out["pooled"][s]["high"]) == (expected.low, expected.high)

    # Killed and run again, or asked for a budget it already has: nothing is optimised again.
    def refuse(*args, **kwargs):
        raise AssertionError("the cached attack ran again")

    monkeypatch.setattr(attack_suite, "soft_attack_trajectory", refuse)
    again = soft_attack_suite(pipe, "car", plan, z, det, SETTINGS, CONFIG, **{
        **kwargs, "checkpoints": [2]})
    assert again["pooled"]["2"] == out["pooled"]["2"]

    # Anything that decides the counts is in the key: another token count is another attack.
    monkeypatch.undo()
    other = AttackConfig(tokens=1, steps=3, target_images=2, noise_draws=2)
    soft_attack_suite(pipe, "car", plan[:1], z, det, SETTINGS, other, **kwargs)
    assert len(list(tmp_path.glob("attack_*.json"))) == 4
    cached = json.loads(next(tmp_path.glob("attack_*.json")).read_text())
    assert cached["key"]["detector"] == colour_detector and cached["key"]["attack"]["steps"] is None


def test_suite_draws_every_attacks_images_also_from_its_cache(pipe, colour_detector, tmp_path,
                                                              monkeypatch):
    from PIL import Image

    z, det = latents(pipe), get_detector(colour_detector)
    plan = attack_plan(rows(["a photo of a car"], ["a red picture"]), "car", 2,
                       first="a photo of a car")
    key = suite_key("erased", colour_detector, "a photo of a car", SETTINGS)
    grid = tmp_path / "grid" / "soft.png"
    kwargs = dict(checkpoints=[0, 2], n_images=3, key=key, cache_dir=tmp_path / "cache",
                  grid_path=grid)
    out = soft_attack_suite(pipe, "car", plan, z, det, SETTINGS, CONFIG, **kwargs)
    strips = sorted((tmp_path / "cache").glob("attack_*_*.png"))
    assert len(strips) == 4  # two attacks, two budgets
    w, h = Image.open(strips[0]).size
    assert w > 3 * h - 10  # three images side by side
    first = Image.open(grid)
    assert first.height > 4 * h  # a row per attack and budget
    assert all(s["strip"] for a in out["attacks"] for s in a["steps"].values())

    # From the cache, nothing optimised or generated again, the same picture.
    monkeypatch.setattr(attack_suite, "soft_attack_trajectory", lambda *a, **k: 1 / 0)
    grid.unlink()
    soft_attack_suite(pipe, "car", plan, z, det, SETTINGS, CONFIG, **kwargs)
    import numpy as np

    assert np.array_equal(np.asarray(Image.open(grid)), np.asarray(first))
