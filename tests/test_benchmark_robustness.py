"""benchmarks/robustness.py: attack success against steps and tokens, on a tiny protocol run."""

from __future__ import annotations

import json

from conftest import load_benchmark
from PIL import Image

from receler.attack import AttackConfig
from receler.config import TrainConfig
from receler.protocol import Protocol, ProtocolConfig


def tiny_run(out, model, detector, prompt_sets, *, attack_images, attack_prompts, iterations,
             target_images, export=None, base_dir=None, **train):
    """A finished protocol run on the tiny pipeline, erasers without the attack (merged into
    the UNet with ``export``, a MergeConfig)."""
    cfg = ProtocolConfig(
        concept="car", out=out, model=str(model), detector=detector, per_class=1,
        concept_rows=1, attack_images=attack_images, attack_prompts=attack_prompts,
        prompts=prompt_sets, export=export, skip=("latency", "two-object"), base_dir=base_dir,
        train=TrainConfig(concepts="car", iterations=iterations, ddim_steps=3, adv_steps=0,
                          rank=4, mask_image_every=0, **train),
        attack=AttackConfig(tokens=2, steps=1, sweeps=1, candidates=2,
                            target_images=target_images, noise_draws=1))
    return Protocol(cfg, show_progress=False).run()


def test_curves_reuse_the_protocols_attacks_and_pool_every_attack(tiny_model_dir, prompt_sets,
                                                                  colour_detector, tmp_path):
    robustness = load_benchmark("robustness")
    out = tmp_path / "run"
    res = tiny_run(out, tiny_model_dir, colour_detector, prompt_sets, attack_images=2,
                   attack_prompts=2, iterations=2, target_images=1)
    soft = sorted((out / "attack" / "soft").glob("*.json"))
    before = {p: p.read_text() for p in soft}

    rows = robustness.measure_run(out, steps=[0, 1, 3], tokens=[1, 2], token_steps=1,
                                  include_base=True)
    erased = {(r["tokens"], r["steps"]): r for r in rows if r["method"] != "base (no erasure)"}
    assert set(erased) == {(2, 0), (2, 1), (2, 3), (1, 1)}
    assert {r["method"] for r in rows} == {"base (no erasure)", "run"}
    for r in rows:
        assert r["n"] == 4 and r["attacks"] == 2  # 2 attacks × 2 images, pooled
        assert r["low"] <= r["rate"] <= r["high"] and r["rate"] == r["successes"] / r["n"]
    # the protocol's own budgets (1 and 3 steps) are read from its cache, not measured again
    assert erased[(2, 1)]["rate"] == res["attack_success_soft"]
    assert erased[(2, 3)]["rate"] == res["attack_success_soft_3x"]
    for p, text in before.items():
        kept = json.loads(text)["steps"]
        assert json.loads(p.read_text())["steps"].items() >= kept.items()

    paths = robustness.write(rows, tmp_path / "curves", default_tokens=2, token_steps=1)
    names = {p.name for p in paths}
    assert names == {"robustness.json", "robustness_pooled.json", "robustness.md",
                     "robustness_car.png"}
    assert json.loads((tmp_path / "curves" / "robustness.json").read_text()) == rows
    md = (tmp_path / "curves" / "robustness.md").read_text()
    assert "| run |" in md and "3 steps" in md and "1 tokens" in md
    assert Image.open(tmp_path / "curves" / "robustness_car.png").size == (720, 440)


def test_an_exported_run_is_attacked_on_its_merged_unet(tiny_model_dir, prompt_sets,
                                                        colour_detector, tmp_path, monkeypatch):
    """Every budget of an exported run is measured on the merged UNet the run measured, not
    on the erasers it was merged from (whose curve would be mixed with the export's cached
    budgets)."""
    import torch
    from safetensors.torch import load_file

    import receler.attack_suite as suite_module
    from receler import get_erasers
    from receler.merge import MergeConfig

    robustness = load_benchmark("robustness")
    out = tmp_path / "run"
    res = tiny_run(out, tiny_model_dir, colour_detector, prompt_sets, attack_images=1,
                   attack_prompts=1, iterations=2, target_images=1,
                   export=MergeConfig(iterations=2, adv_steps=1, eval_trajectories=0,
                                      checkpoint_every=1))
    assert res["candidate"]["kind"] == "erase+export"
    merged = load_file(str(next((out / "merged_unet").glob("*.safetensors"))))
    seen, real = [], suite_module.soft_attack_suite

    def suite(pipe, *args, **kwargs):
        params = dict(pipe.unet.named_parameters())
        seen.append((len(get_erasers(pipe.unet)),
                     all(torch.equal(params[k], v) for k, v in merged.items() if k in params)))
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(suite_module, "soft_attack_suite", suite)
    rows = robustness.measure_run(out, steps=[0, 1], tokens=[2], token_steps=1,
                                  include_base=False)
    assert seen == [(0, True)]  # no erasers attached: the merged UNet's weights
    erased = {r["steps"]: r for r in rows}
    assert erased[1]["rate"] == res["attack_success_soft"]  # the protocol's cached budget


def test_one_base_model_in_two_base_folders_is_one_line(tiny_model_dir, prompt_sets,
                                                       colour_detector, tmp_path):
    """Two runs whose base images lie in two folders measure one base model: one base line
    (two used to be drawn under one label, and the plot failed on them)."""
    robustness = load_benchmark("robustness")
    runs = [tmp_path / "a", tmp_path / "b"]
    for i, out in enumerate(runs):  # each keeps its base model in a folder of its own
        tiny_run(out, tiny_model_dir, colour_detector, prompt_sets, attack_images=1,
                 attack_prompts=1, iterations=1, target_images=1, seed=i,
                 base_dir=tmp_path / f"base{i}")
    assert robustness.main([*map(str, runs), "--out", str(tmp_path / "curves"), "--steps",
                            "0,1", "--tokens", "2"]) == 0
    rows = json.loads((tmp_path / "curves" / "robustness.json").read_text())
    base = [r for r in rows if r["method"] == "base (no erasure)"]
    assert sorted(r["steps"] for r in base) == [0, 1, 100]  # each budget once
    assert (tmp_path / "curves" / "robustness_car.png").is_file()


def test_runs_that_differ_only_in_the_seed_pool_and_others_do_not():
    robustness = load_benchmark("robustness")

    def row(method, run, seed, settings, successes, n=50):
        return {"method": method, "name": method.split(" s")[0], "concept": "star", "run": run,
                "seed": seed, "settings": settings, "tokens": 8, "steps": 100, "attacks": 5,
                "successes": successes, "n": n, "rate": successes / n, "low": 0.0, "high": 1.0}

    base = {"method": "base (no erasure)", "concept": "star", "run": "a", "tokens": 8,
            "steps": 100, "attacks": 5, "successes": 50, "n": 50, "rate": 1.0, "low": 0.9,
            "high": 1.0}
    rows = [base, row("receler s1", "a", 1, "R", 8), row("receler s2", "b", 2, "R", 9),
            row("esd-x s1", "c", 1, "E", 20), row("mace", "d", None, "d", 49)]
    pool = {r["method"]: r for r in robustness.pooled(rows)}
    assert set(pool) == {"base (no erasure)", "receler (seeds 1, 2)", "esd-x", "mace"}
    both = pool["receler (seeds 1, 2)"]
    assert (both["successes"], both["n"], both["runs"]) == (17, 100, ["a", "b"])
    assert both["low"] < 0.17 < both["high"] and both["rate"] == 0.17
    assert pool["esd-x"]["n"] == 50 and pool["base (no erasure)"] == base
    md = robustness.to_markdown(rows, default_tokens=8)
    assert "| receler (seeds 1, 2) | 100 | 0.17" in md
    assert "each run" in md and "| receler s2 | 50 | 0.18" in md


def test_a_folder_without_results_is_a_one_line_error(tmp_path, capsys):
    robustness = load_benchmark("robustness")
    assert robustness.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "results.json" in err


def test_anatomy_compares_the_erasers_under_plain_and_attacked_prompts(tiny_model_dir,
                                                                      prompt_sets,
                                                                      colour_detector, tmp_path):
    anatomy = load_benchmark("attack_anatomy")
    out = tmp_path / "run"
    tiny_run(out, tiny_model_dir, colour_detector, prompt_sets, attack_images=1,
             attack_prompts=1, iterations=3, target_images=2, lr=1e-2)
    item = anatomy.anatomy(out, steps=2)
    assert item["attack_tokens"] == 2 and item["prompt"] == "a photo of a car"
    assert [r["timestep"] for r in item["timesteps"]] == anatomy.TIMESTEPS
    for r in item["timesteps"]:
        for side in ("plain prompt", "attacked prompt"):
            norms = r["eraser_norm"][side]
            assert norms["inside_mask"] > 0 and norms["outside_mask"] > 0  # trained erasers
            assert 0 < r["soft_attention"][side] < 1
        losses = r["denoise_loss"]
        assert set(losses) == {"base, plain prompt", "erased, plain prompt",
                               "erased, attacked prompt"}
        assert losses["base, plain prompt"] != losses["erased, plain prompt"]
    md = anatomy.to_markdown([item])
    assert md.count("| run |") == 1 + len(anatomy.TIMESTEPS) and "→" in md  # header, one row per t
    assert anatomy.main([str(tmp_path / "missing")]) == 2
