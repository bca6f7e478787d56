"""benchmarks/compare.py's table rows and its latency re-measurement, on a tiny protocol run."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

from receler.attack import AttackConfig
from receler.config import TrainConfig
from receler.protocol import Protocol, ProtocolConfig

COMPARE = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"


@pytest.fixture(scope="module")
def compare():
    return load_benchmark("compare")


def test_latency_is_measured_again_alone_and_used_in_the_row(compare, tiny_model_dir,
                                                             prompt_sets, colour_detector,
                                                             tmp_path):
    out = tmp_path / "run"
    cfg = ProtocolConfig(
        concept="car", out=out, model=str(tiny_model_dir), detector=colour_detector, per_class=1,
        concept_rows=1, attack_images=1, prompts=prompt_sets,
        train=TrainConfig(concepts="car", iterations=2, ddim_steps=3, adv_steps=0, rank=4,
                          mask_image_every=0),
        attack=AttackConfig(tokens=1, steps=1, sweeps=1, candidates=2, target_images=1,
                            noise_draws=1))
    res = Protocol(cfg, show_progress=False).run()

    threads = torch.get_num_threads()
    compare.measure_alone([out], repeats=2)
    assert torch.get_num_threads() == threads  # restored for the caller
    lat = json.loads((out / compare.LATENCY_FILE).read_text())
    assert lat["repeats"] == 2 and lat["latency_base_s"] > 0 and lat["latency_s"] > 0
    assert lat["overhead_ratio"] == pytest.approx(lat["latency_s"] / lat["latency_base_s"] - 1)

    row = compare.row("receler", "car", res, 100.0, alone=lat)
    assert row["overhead_ratio"] == lat["overhead_ratio"] and row["overhead_measured_alone"]
    assert row["overhead_ratio_protocol"] == res["overhead_ratio"]
    assert compare.row("receler", "car", res, None)["overhead_ratio"] == res["overhead_ratio"]

    # Already measured with these repeats: not measured again.
    before = (out / compare.LATENCY_FILE).stat().st_mtime_ns
    compare.measure_alone([out], repeats=2)
    assert (out / compare.LATENCY_FILE).stat().st_mtime_ns == before

    # --seeds: the run stands in for seeds 0 and 3 of a benchmark's work folder, as a
    # variant whose flags are its settings (seed 3's erasers and results are edited so that
    # the two differ); --collect checks and reuses both finished folders and writes the
    # per-seed rows, their spread and the picture.
    flags = ("--iterations 2 --ddim-steps 3 --adv-steps 0 --rank 4 --per-class 1 "
             "--concept-rows 1 --attack-images 1 --attack-steps 1 --attack-tokens 1 "
             "--token-candidates 2 --token-sweeps 1")
    label = f"receler ({flags})"
    work = tmp_path / "bench"
    seed0, seed3 = (compare.run_folder(work / "quick", "car", label, s) for s in (0, 3))
    shutil.copytree(out, seed0)
    shutil.copytree(out, seed3)
    saved = json.loads((seed3 / "erasers" / "eraser_config.json").read_text())
    saved["train"]["seed"] = 3
    (seed3 / "erasers" / "eraser_config.json").write_text(json.dumps(saved))
    res3 = dict(res, acc_l=res["acc_l"] / 2, h=0.25)
    (seed3 / "results.json").write_text(json.dumps(res3))
    table = tmp_path / "table.json"

    def collect(variant):
        return subprocess.run(
            [sys.executable, str(COMPARE), "--quick", "--concepts", "car", "--methods", "",
             f"--variant={variant}", "--seeds", "0,3", "--work", str(work), "--out", str(table),
             "--model", str(tiny_model_dir), "--collect", "--latency-repeats", "0"],
            capture_output=True, text=True, timeout=300)

    # the copies are read where they lie now, not where their results.json says they ran
    shutil.rmtree(out / "images" / "erased")
    proc = collect(flags)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(table.read_text())
    assert rows[1]["pixel_change_others"] is not None
    assert [(r["method"], r.get("seed")) for r in rows] == [
        ("base (no erasure)", None), (label, 0), (label, 3)]
    assert rows[2]["h"] == 0.25 and rows[1]["h"] == res["h"]
    (spread,) = json.loads(table.with_name("table_seeds.json").read_text())
    assert spread["seeds"] == [0, 3]
    assert spread["h"] == pytest.approx((res["h"] + 0.25) / 2)
    assert spread["h_sd"] == pytest.approx(statistics.stdev([res["h"], 0.25]))
    assert spread["acc_l_min"] == pytest.approx(res["acc_l"] / 2)
    # both seeds' attacked images pooled into one rate with its interval
    pooled = spread["attack_pooled"]
    assert pooled["n"] == 2 * res["attack_n"] == 2 * rows[1]["attack_n"]
    assert pooled["ci"][0] <= pooled["rate"] <= pooled["ci"][1]
    assert rows[1]["attack_ci"] == res["attack_ci"]
    md = table.with_suffix(".md").read_text()
    assert "| seed |" in md and "Across training seeds 0,3" in md
    # the picture: base and seed 0's run, the concept's images then the other classes'
    from PIL import Image

    grid = Image.open(table.with_name("table_car.png"))
    assert "table_car.png" in md
    assert grid.height == 14 + 2 * (64 + 2) + 2  # column labels, two rows scaled to 64 px

    # A finished folder trained with other settings is refused, not reported under these.
    (seed3 / "erasers" / "eraser_config.json").write_text(
        json.dumps(dict(saved, train=dict(saved["train"], iterations=7))))
    proc = collect(flags)
    assert proc.returncode != 0
    assert "holds a finished run with iterations=7, not 2" in proc.stderr.strip().splitlines()[-1]
    # So is one whose soft attack ran in the text encoder's input space.
    (seed3 / "erasers" / "eraser_config.json").write_text(json.dumps(saved))
    res3["config"] = dict(res3["config"], attack=dict(res3["config"]["attack"], space="input"))
    (seed3 / "results.json").write_text(json.dumps(res3))
    proc = collect(flags)
    assert proc.returncode != 0
    assert "attack_space=input, not output" in proc.stderr.strip().splitlines()[-1]


def test_seeds_run_only_the_methods_that_train(compare, tmp_path):
    """UCE and SLD do not read the seed: --seeds runs them once. --collect lists what is
    missing, so an empty work folder shows the whole plan."""
    table = tmp_path / "t.json"
    proc = subprocess.run(
        [sys.executable, str(COMPARE), "--quick", "--methods", "receler,uce,sld", "--seeds",
         "0,5", "--work", str(tmp_path / "w"), "--out", str(table), "--collect",
         "--latency-repeats", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = table.with_suffix(".md").read_text()
    planned = md.split("Not finished: ")[1].split(".\n")[0].split(", ")
    assert sorted(planned) == ["star/receler", "star/receler_seed5", "star/sld", "star/uce"]


def test_across_seeds_summarises_each_method_and_leaves_missing_values_out(compare):
    def r(method, seed, h, acc_l, lost=()):
        return {"method": method, "concept": "star", "seed": seed, "acc_e": 0.0, "acc_r": 0.0,
                "acc_l": acc_l, "h": h, "attack_success_soft": 0.5 * seed,
                "two_object_locality": None, "pixel_change_others": 0.1,
                "classes_lost": list(lost)}

    rows = [{"method": "base (no erasure)", "concept": "star", "seed": None},
            r("a", 0, 0.9, 0.8, ["diamond", "circle"]), r("a", 1, 0.7, 0.6, ["diamond"]),
            r("b", 0, 1.0, 1.0)]
    a, b = compare.across_seeds(rows)
    assert (a["method"], a["seeds"], b["seeds"]) == ("a", [0, 1], [0])
    assert a["h"] == pytest.approx(0.8) and a["h_sd"] == pytest.approx(0.1414213562)
    assert (a["h_min"], a["h_max"]) == (0.7, 0.9)
    assert a["attack_success_soft"] == 0.25
    assert a["two_object_locality"] is None and a["two_object_locality_sd"] is None
    assert b["h"] == 1.0 and b["h_sd"] is None  # one seed: no spread
    md = compare.spread_markdown([a, b])
    assert "0.800 ± 0.141 (0.70–0.90)" in md and "| b | star | 0 | 0.000 |" in md
    assert a["classes_lost"] == {"diamond": 2, "circle": 1} and b["classes_lost"] == {}
    assert "| diamond 2/2, circle 1/2 |" in md and md.rstrip().endswith("| none |")


def test_classes_lost_are_the_other_classes_below_half_their_base_rate(compare):
    def per_class(rates):
        return {"per_class": [{"class_name": c, "rate": {"rate": v}} for c, v in rates.items()]}

    res = {"concept": "heart",
           "metrics": per_class({"heart": 0.0, "diamond": 0.0, "circle": 0.6, "moon": 0.2}),
           "base": {"metrics": per_class({"heart": 1.0, "diamond": 1.0, "circle": 1.0,
                                          "moon": 0.4})}}
    by_class = compare.locality_by_class(res)
    assert set(by_class) == {"diamond", "circle", "moon"}  # the erased concept is not locality
    assert by_class["circle"] == {"edited": 0.6, "base": 1.0}
    # moon is at half its base rate, not below; circle lost 40% of its rate, not half
    assert compare.classes_lost(by_class) == ["diamond"]
    assert compare.fmt(["diamond", "circle"]) == "diamond, circle" and compare.fmt([]) == "none"


def test_published_recipe_and_variants_are_flags_the_protocol_accepts(compare):
    from receler.cli import build_parser

    def parsed(flags):
        return build_parser().parse_args(["protocol", "--concept", "star", "--out", "x", *flags])

    from receler.cli import _train_config

    assert compare.PUBLISHED["label"] == "receler (paper)"
    pub = _train_config(parsed(compare.PUBLISHED["flags"]), "star", "receler", quiet=True)
    # the official code's settings, none of the toy model's recommendations
    assert (pub.iterations, pub.adv_steps, pub.ddim_steps, pub.adv_start) == (500, 50, 50, 0)
    assert (pub.anchor_weight, pub.reg_weight, pub.rank, pub.lr) == (0.0, 0.1, 128, 3e-4)
    assert (pub.adv_lr, pub.adv_init, pub.erase_on, pub.mask_source) == (
        0.1, "uniform", "attacked", "attention")

    v = compare.variant("--reg-weight 5 --seed 1")
    assert v["label"] == "receler (--reg-weight 5 --seed 1)" and v["method"] == "receler"
    ns = parsed(v["flags"])
    assert (ns.reg_weight, ns.seed) == (5.0, 1)
    quoted = compare.variant("--anchors '|a red|a blue'")  # a flag value with spaces
    assert parsed(quoted["flags"]).anchors == "|a red|a blue"


def test_methods_without_a_seed_run_once_and_are_given_no_seed(compare):
    """--seeds 1,2: UCE runs on seed 1 only, without --seed (the CLI refuses it); Receler
    runs on both seeds with theirs."""
    seeded = {"receler": True, "uce": False}.__getitem__
    ((concept, runs),) = compare.plan(["star"], [1, 2], ["receler", "uce"], [], "none", seeded)
    assert concept == "star"
    assert runs == [("receler", "receler", ["--seed", "1"], 1), ("uce", "uce", [], 1),
                    ("receler", "receler", ["--seed", "2"], 2)]
    ((_, runs),) = compare.plan(["star"], [0], ["uce"], [], "all", seeded)
    assert [r[0] for r in runs] == ["uce", compare.PUBLISHED["label"]]
    # the published recipe on a seed of its own: its run folder and --seed follow it
    seeded = {"receler": True, "uce": False}.__getitem__
    ((_, runs),) = compare.plan(["star"], [1, 2], ["uce"], [], "all", seeded, published_seed=0)
    assert runs == [("uce", "uce", [], 1), (compare.PUBLISHED["label"], "receler",
                                            list(compare.PUBLISHED["flags"]), 0)]
    ((_, runs),) = compare.plan(["star"], [1, 2], ["uce"], [], "all", seeded)
    assert runs[1] == (compare.PUBLISHED["label"], "receler",
                       [*compare.PUBLISHED["flags"], "--seed", "1"], 1)


def test_the_exported_row_starts_from_the_same_seeds_erasers_and_is_checked(
        compare, tiny_model_dir, prompt_sets, colour_detector, tmp_path):
    """``receler-exported``: `receler protocol --export`, run from the erasers of the same
    seed's `receler` run when their settings match; its finished folder is refused when the
    export's settings differ, and its latency is measured on the merged UNet."""
    from receler.merge import MergeConfig

    seeded = {"receler": True}.__getitem__
    ((_, runs),) = compare.plan(["star"], [1], ["receler", "receler-exported"], [], "none", seeded)
    assert runs == [("receler", "receler", ["--seed", "1"], 1),
                    ("receler (exported)", "receler", ["--export", "--seed", "1"], 1)]

    work = tmp_path / "work"
    first = compare.run_folder(work, "car", "receler")
    exported = compare.run_folder(work, "car", "receler (exported)")
    assert exported.name == "receler_exported"
    train = TrainConfig(concepts="car", iterations=2, ddim_steps=3, adv_steps=0, rank=4,
                        mask_image_every=0)
    common = dict(concept="car", model=str(tiny_model_dir), detector=colour_detector,
                  per_class=1, concept_rows=1, attack_images=1, prompts=prompt_sets,
                  attack=AttackConfig(tokens=1, steps=1, sweeps=1, candidates=2,
                                      target_images=1, noise_draws=1), skip=("latency",))
    Protocol(ProtocolConfig(out=first, train=train, **common), show_progress=False).run()
    flags = ["--iterations", "2", "--ddim-steps", "3", "--adv-steps", "0", "--rank", "4",
             "--per-class", "1", "--concept-rows", "1", "--attack-images", "1",
             "--attack-steps", "1", "--attack-tokens", "1", "--token-candidates", "2",
             "--token-sweeps", "1"]
    # other training settings: not copied (the run trains its own)
    other = [*flags[:1], "3", *flags[2:]]
    assert not compare.reuse_erasers(first, exported, "car", "receler", other,
                                     str(tiny_model_dir))
    assert not (exported / "erasers").exists()
    assert compare.reuse_erasers(first, exported, "car", "receler", flags, str(tiny_model_dir))
    same = (first / "erasers" / "erasers.safetensors").read_bytes()
    assert (exported / "erasers" / "erasers.safetensors").read_bytes() == same

    export = MergeConfig(iterations=2, adv_steps=1, eval_trajectories=1, checkpoint_every=1)
    res = Protocol(ProtocolConfig(out=exported, train=train, export=export, **common),
                   show_progress=False).run()
    assert res["train"]["erase"]["unet_forward"] < res["train"]["unet_forward"]
    options = ["--export", "--export-option", "iterations=2", "--export-option", "adv_steps=1",
               "--export-option", "eval_trajectories=1", "--export-option", "checkpoint_every=1"]
    args = (exported, "car", "receler")
    assert compare.stale(*args, flags + options, str(tiny_model_dir)) is None
    assert compare.stale(*args, flags, str(tiny_model_dir)) == "export=on, not off"
    # a token attack of another size (here the default 64 candidates) is another evaluation
    assert compare.stale(*args, flags[:-4] + options, str(tiny_model_dir)) == \
        "token_candidates=2, not 64"
    assert compare.stale(*args, flags + options + ["--export-option", "iterations=3"],
                         str(tiny_model_dir)) == "export iterations=2, not 3"
    assert compare.stale(first, "car", "receler", flags + options,
                         str(tiny_model_dir)) == "export=off, not on"
    # a run recorded before an export setting existed ran with it off
    done = json.loads((exported / "results.json").read_text())
    del done["config"]["export"]["adv_restart"]
    (exported / "results.json").write_text(json.dumps(done))
    assert compare.stale(*args, flags + options, str(tiny_model_dir)) is None
    assert compare.stale(*args, flags + options + ["--export-option", "adv_restart=5"],
                         str(tiny_model_dir)) == "export adv_restart=0, not 5"

    compare.measure_alone([exported], repeats=1)
    lat = json.loads((exported / compare.LATENCY_FILE).read_text())
    assert lat["repeats"] == 1 and lat["latency_s"] > 0 and lat["latency_base_s"] > 0
    row = compare.row("receler (exported)", "car", res, None, alone=lat)
    assert row["unet_passes"] == res["train"]["unet_forward"] + res["train"]["unet_backward"]
