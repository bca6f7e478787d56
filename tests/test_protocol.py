"""The whole protocol on a tiny pipeline, with a small real detector registered for the test."""

from __future__ import annotations

import dataclasses
import json

import pytest

from receler.attack import AttackConfig
from receler.config import TrainConfig
from receler.protocol import Protocol, ProtocolConfig
from receler.report import write_report


def test_protocol_runs_every_stage_and_writes_results(tiny_model_dir, prompt_sets, colour_detector,
                                                      tmp_path):
    cfg = ProtocolConfig(
        concept="car", out=tmp_path / "run", model=str(tiny_model_dir), detector="colour",
        per_class=2, concept_rows=2, attack_images=2, attack_prompts=3, prompts=prompt_sets,
        train=TrainConfig(concepts="car", iterations=3, ddim_steps=4, adv_steps=1, adv_tokens=4,
                          rank=4, mask_image_every=1),
        attack=AttackConfig(tokens=2, steps=3, sweeps=1, candidates=3, target_images=2,
                            noise_draws=2))
    results = Protocol(cfg, show_progress=False).run()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("acc_e", "acc_r", "acc_l", "h", "attack_success_soft",
                "attack_success_discrete", "base", "seconds"):
        assert key in saved, key
    for key in ("acc_e", "acc_r", "acc_l", "h", "attack_success_soft"):
        assert 0.0 <= saved["base"][key] <= 1.0
    assert saved["seconds"]["erase"] > 0 and saved["seconds"]["generate"] > 0
    # 3 soft attacks × 2 images, pooled, at 3 steps and at 9, erased and base model alike
    for side in (saved, saved["base"]):
        for suffix in ("", "_3x"):
            assert side[f"attack_n{suffix}"] == 6
            lo, hi = side[f"attack_ci{suffix}"]
            assert lo <= side[f"attack_success_soft{suffix}"] <= hi
    attacks = saved["attack"]["soft_attacks"]
    assert [a["prompt"] for a in attacks] == ["a photo of a car", "a red picture", "the blue"]
    assert sorted(attacks[0]["steps"]) == ["3", "9"] and len({a["seed"] for a in attacks}) == 3
    hits = sum(a["steps"]["3"]["successes"] for a in attacks)
    assert saved["attack_success_soft"] == hits / 6
    assert results["rows"] == {"simple": 6, "paraphrase": 2, "two_object": 1}
    # the other classes' images (dog, truck: 4) against the base model's, pixel by pixel;
    # the colour detector has no features to compare
    change = saved["image_change_others"]
    assert change["n"] == 4 and change["feature"] is None
    assert saved["pixel_change_others"] == change["pixel"] and 0.0 <= change["pixel"] <= 1.0
    assert len(list((tmp_path / "run" / "images" / "erased" / "simple").glob("*.png"))) == 6
    report = (tmp_path / "run" / "report" / "report.md").read_text()
    for picture in ("compare.png", "loss_curves.png", "masks.png", "attack/erased.png"):
        assert picture in report, picture
    assert (tmp_path / "run" / "report" / "compare.png").is_file()

    # A second run reuses the erasers and the images: nothing is generated again.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "images").rglob("*.png")}
    Protocol(cfg, show_progress=False).run()
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "images").rglob("*.png")}
    assert before == after

    # The base model's cached attack is keyed by every attack setting (K, seeds, budgets).
    key = json.loads((tmp_path / "run" / "images" / "base" / "attack.json").read_text())["key"]
    assert key["plan"] == [[a["prompt"], a["seed"]] for a in attacks]
    assert len(key["plan"]) == 3 and key["budgets"] == [3, 9]

    # Other settings in the same folder would report the old erasers' numbers: refused.
    changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, iterations=4))
    with pytest.raises(ValueError, match="iterations=3, not 4"):
        Protocol(changed, show_progress=False).erase(pipe=None)
    other = dataclasses.replace(cfg, method="receler-eraser-reg")
    with pytest.raises(ValueError, match="method 'receler', not 'receler-eraser-reg'"):
        Protocol(other, show_progress=False).erase(pipe=None)


def test_report_tables_show_base_and_erased(tmp_path):
    rate = {"rate": 0.5, "low": 0.2, "high": 0.8, "successes": 1, "total": 2}
    per_class = [{"class_name": "car", "label": "car", "rate": rate}]
    side = {"acc_e": 0.5, "acc_r": 0.25, "acc_l": 1.0, "h": 0.6, "two_object_locality": None,
            "attack_success_plain": 1.0, "attack_success_soft": 0.5,
            "attack_success_discrete": 0.0, "metrics": {"per_class": per_class}}
    results = {**side, "base": side, "concept": "car", "method": "receler", "model": "m",
               "detector": "d"}
    text = write_report(tmp_path, results).read_text()
    assert "| receler | 50.0% | 25.0% | 100.0% | 60.0% | – | 100.0% | 50.0% | 0.0% |" in text
    assert "| car (erased) | 50.0% [20.0, 80.0] | 50.0% [20.0, 80.0] |" in text


def test_evaluate_command_writes_json_and_markdown(pipe, prompt_sets, colour_detector, tmp_path,
                                                   capsys):
    from receler.cli import main
    from receler.eval.prompts import read_prompts
    from receler.sampling import SamplerSettings, generate_prompt_file

    settings = SamplerSettings(steps=2, guidance=3.0)
    for name, csv in (("s", prompt_sets.simple), ("p", prompt_sets.paraphrase)):
        generate_prompt_file(pipe, read_prompts(csv), tmp_path / name, settings=settings)
    args = ["evaluate", "--images", str(tmp_path / "s"), "--prompts", str(prompt_sets.simple),
            "--paraphrase-images", str(tmp_path / "p"), "--paraphrase-prompts",
            str(prompt_sets.paraphrase), "--erased", "car", "--detector", "colour",
            "--out", str(tmp_path / "eval.json")]
    assert main(args) == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    per = res["metrics"]["per_concept"][0]
    assert per["concept"] == "car" and per["acc_e"]["total"] == 2 and per["acc_r"]["total"] == 2
    assert per["acc_l"]["total"] == 4  # dog and truck images
    assert "car" in (tmp_path / "eval.md").read_text()
    assert main(args) == 2  # results are not overwritten without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    half = ["evaluate", "--images", str(tmp_path / "s"), "--prompts", str(prompt_sets.simple),
            "--paraphrase-images", str(tmp_path / "p"), "--erased", "car", "--detector",
            "colour", "--out", str(tmp_path / "e2.json")]
    assert main(half) == 2  # paraphrase images without their prompt file
    assert "go together" in capsys.readouterr().err


def test_checkpointed_run_with_other_settings_is_refused(prompt_sets, tiny_model_dir, tmp_path):
    import torch

    from receler.serialization import CHECKPOINT_FILE, save_tensors

    train = TrainConfig(concepts="car", iterations=8, adv_steps=0, adv_lr=0.5)
    cfg = ProtocolConfig(concept="car", out=tmp_path / "run", model=str(tiny_model_dir),
                         method="receler-eraser-reg", prompts=prompt_sets, train=train)
    (tmp_path / "run" / "erasers").mkdir(parents=True)
    save_tensors(tmp_path / "run" / "erasers" / CHECKPOINT_FILE, {"rng": torch.zeros(1)},
                 {"config": dataclasses.replace(train, lr=1e-2).to_dict()})
    with pytest.raises(ValueError, match=r"lr=0.01, not 0.0003.*another --out"):
        Protocol(cfg, show_progress=False).erase(pipe=None)

    # Without an attack its settings change nothing, so they are not compared.
    from receler.methods.edits import EditConfig
    from receler.methods.registry import settings_mismatch

    saved = EditConfig(method="receler-eraser-reg", train=dataclasses.replace(train, adv_lr=1.0).to_dict())
    assert settings_mismatch("receler-eraser-reg", train, saved) is None
    saved.train["reg_weight"] = 2.0
    assert settings_mismatch("receler-eraser-reg", train, saved) == "reg_weight=2.0, not 0.1"
    # one concept has nothing to balance: a run recorded with another balance is the same run
    one = EditConfig(method="receler", train=dataclasses.replace(train, concept_balance=0.0).to_dict())
    assert settings_mismatch("receler", dataclasses.replace(train, concept_balance=1.0), one) is None
    two = dataclasses.replace(train, concepts=["car", "dog"])
    saved_two = EditConfig(method="receler", train=two.to_dict())
    assert settings_mismatch("receler", dataclasses.replace(two, concept_balance=1.0),
                             saved_two) == "concept_balance=0.0, not 1.0"


def tiny_config(tmp_path, model_dir, prompt_sets, **kw) -> ProtocolConfig:
    kw.setdefault("train", TrainConfig(concepts="car", iterations=2, ddim_steps=2, adv_steps=1,
                                       adv_tokens=2, rank=2))
    return ProtocolConfig(
        concept="car", out=tmp_path / "run", model=str(model_dir), detector="colour",
        per_class=1, concept_rows=1, attack_images=1, attack_prompts=1, prompts=prompt_sets,
        attack=AttackConfig(tokens=1, steps=1, sweeps=1, candidates=2, target_images=1,
                            noise_draws=1), **kw)


def without_timing(value):
    """``value`` less wall times and file fingerprints (VARYING_KEYS), at any depth."""
    from receler.protocol import VARYING_KEYS

    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in VARYING_KEYS}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def test_the_protocol_is_deterministic(tiny_model_dir, prompt_sets, colour_detector, tmp_path):
    import shutil

    cfg = tiny_config(tmp_path, tiny_model_dir, prompt_sets, skip=("latency",),
                      deterministic=True)
    first = Protocol(cfg, show_progress=False).run()
    shutil.rmtree(cfg.out)  # erase, generate and attack again from nothing
    second = Protocol(cfg, show_progress=False).run()
    assert first["attack_n"] == 1 and first["train"]["unet_backward"] > 0  # every stage ran
    assert without_timing(first) == without_timing(second)
    import torch

    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


def test_skipped_stages_are_null(tiny_model_dir, prompt_sets, colour_detector, tmp_path):
    cfg = tiny_config(tmp_path, tiny_model_dir, prompt_sets, method="uce", train=None,
                      skip="latency,attack,two-object")
    res = Protocol(cfg, show_progress=False).run()
    assert res["schema_version"] == 1 and res["skipped"] == ["latency", "attack", "two-object"]
    for key in ("attack_success_soft", "attack_ci", "attack_success_discrete", "attack",
                "latency_s", "overhead_ratio", "two_object_locality"):
        assert res[key] is None and res["base"].get(key) is None, key
    assert "two_object" not in res["rows"] and res["acc_e"] is not None
    with pytest.raises(ValueError, match="unknown stage 'lunch' to skip: choose from latency"):
        tiny_config(tmp_path, tiny_model_dir, prompt_sets, skip=("lunch",))


def test_a_base_folder_made_differently_is_refused(tiny_model_dir, prompt_sets, colour_detector,
                                                   tmp_path):
    from receler.image_keys import KEY_FILE, mismatch

    base = tmp_path / "base"
    cfg = tiny_config(tmp_path, tiny_model_dir, prompt_sets, method="uce", train=None,
                      skip="latency,attack,two-object", base_dir=base, sample_steps=2)
    res = Protocol(cfg, show_progress=False).run()
    key = res["base_key"]
    assert key["file"] == str(base / KEY_FILE) and key["model"] == str(tiny_model_dir)
    assert key["sampler"]["steps"] == 2 and key["prompts"]["simple"]["rows"] == 3
    # more prompts per class extend the folder; other sampler settings are refused
    more = dataclasses.replace(cfg, out=tmp_path / "more", per_class=2)
    assert Protocol(more, show_progress=False).run()["base_key"]["prompts"]["simple"]["rows"] == 6
    steps = dataclasses.replace(cfg, out=tmp_path / "steps", sample_steps=3)
    with pytest.raises(ValueError, match=r"--base-dir .* \(sampler.steps: 2 against 3;"):
        Protocol(steps, show_progress=False).run()
    # the same file name made from another prompt is named
    stored = json.loads((base / KEY_FILE).read_text())
    new = json.loads(json.dumps(stored))
    new["images"]["simple"]["0"][0] = "a photo of a dog"
    assert mismatch(stored, new) == ("simple/0_0.png: prompt 'a photo of a car' seed 0 "
                                     "against prompt 'a photo of a dog' seed 0")
    # images without a key (an older receler, or by hand) may not fit: refused
    (base / KEY_FILE).unlink()
    with pytest.raises(ValueError, match="holds images but no images_key.json"):
        Protocol(dataclasses.replace(cfg, out=tmp_path / "again"), show_progress=False).run()


def test_export_measures_the_merged_unet_and_adds_its_cost(tiny_model_dir, prompt_sets,
                                                           colour_detector, tmp_path):
    """``--export``: the erasers are trained, merged into the UNet's weights, and the merged
    UNet (no erasers) is what the protocol measures; the cost is both stages'."""
    from diffusers import UNet2DConditionModel

    from receler.erasers import get_erasers
    from receler.merge import MERGE_FILE, MergeConfig
    from receler.protocol import EXPORT_FOLDER

    export = MergeConfig(iterations=2, adv_steps=1, eval_trajectories=1, checkpoint_every=1)
    cfg = tiny_config(tmp_path, tiny_model_dir, prompt_sets, skip=("latency",), export=export)
    protocol = Protocol(cfg, show_progress=False)
    res = protocol.run()
    merged = tmp_path / "run" / EXPORT_FOLDER
    record = json.loads((merged / MERGE_FILE).read_text())
    erase = json.loads((tmp_path / "run" / "erasers" / "eraser_config.json").read_text())["stats"]
    assert res["name"] == "receler (exported)" and res["method"] == "receler"
    assert res["candidate"]["kind"] == "erase+export"
    assert res["candidate"]["merge"]["iterations"] == 2
    for key in ("unet_forward", "unet_backward"):
        assert res["train"][key] == erase[key] + record["stats"][key] > erase[key]
    assert res["train"]["trainable_parameters"] == record["stats"]["trainable_parameters"]
    assert res["export"]["fidelity"] == record["fidelity"]
    # the merged UNet is a plain UNet; the images measured are its, not the erasers': the
    # same erasers attached (their folder copied into a run of its own) draw others
    import shutil

    import numpy as np
    from PIL import Image

    assert not get_erasers(UNet2DConditionModel.from_pretrained(merged, use_safetensors=True))
    shutil.copytree(tmp_path / "run" / "erasers", tmp_path / "e" / "run" / "erasers")
    attached = Protocol(tiny_config(tmp_path / "e", tiny_model_dir, prompt_sets,
                                    skip=("latency",),
                                    base_dir=tmp_path / "run" / "images" / "base"),
                        show_progress=False).run()
    assert attached["name"] == "receler" and attached["train"] == erase

    def pixels(run):
        folder = run / "images" / "erased" / "simple"
        return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]

    exported, with_erasers = pixels(tmp_path / "run"), pixels(tmp_path / "e" / "run")
    assert len(exported) == len(with_erasers) == 3
    assert any(not np.array_equal(a, b) for a, b in zip(exported, with_erasers, strict=True))

    # run again: the finished export is reused, not trained again
    stamp = (merged / MERGE_FILE).stat().st_mtime_ns
    again = Protocol(cfg, show_progress=False).run()
    assert (merged / MERGE_FILE).stat().st_mtime_ns == stamp
    assert again["train"] == res["train"]
    # other export settings in the same folder: refused, naming the setting
    other = dataclasses.replace(cfg, export=dataclasses.replace(export, iterations=3))
    with pytest.raises(ValueError, match="iterations=2, not 3.*another --out"):
        Protocol(other, show_progress=False).run()
    # an export recorded before a setting existed ran with that setting off: taken as
    # finished, and refused where the setting is asked for
    del record["merge"]["adv_restart"]
    (merged / MERGE_FILE).write_text(json.dumps(record))
    assert Protocol(cfg, show_progress=False).check_export_folder()
    restart = dataclasses.replace(cfg, export=dataclasses.replace(export, adv_restart=5))
    with pytest.raises(ValueError, match="adv_restart=0, not 5.*another --out"):
        Protocol(restart, show_progress=False).check_export_folder()


def test_export_is_refused_where_nothing_is_trained_or_no_eraser_is_left(
        tiny_model_dir, prompt_sets, tmp_path):
    from receler.merge import MergeConfig

    with pytest.raises(ValueError, match="--export merges the erasers.*--unet"):
        tiny_config(tmp_path, tiny_model_dir, prompt_sets, train=None, erasers=tmp_path,
                    export=MergeConfig())
    with pytest.raises(ValueError, match="--method esd-x leaves none.*drop --export"):
        tiny_config(tmp_path, tiny_model_dir, prompt_sets, method="esd-x", export=MergeConfig())
