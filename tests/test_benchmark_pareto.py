"""benchmarks/pareto.py: the robustness–locality front over finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_benchmark
from PIL import Image


def fake_run(folder, concept, acc_l, attack, attack_3x, seed=0, method="receler", passes=None,
             acc_e=0.0, **train):
    """A results.json with the keys the front reads (what a protocol run writes); ``passes``:
    the training's UNet forward passes (none recorded when ``None``)."""
    folder.mkdir(parents=True)
    cost = {} if passes is None else {"train": {"unet_forward": passes, "unet_backward": 0,
                                                "seconds": 1.0}}
    (folder / "results.json").write_text(json.dumps({
        "concept": concept, "method": method, "acc_e": acc_e, "acc_r": 0.0, "acc_l": acc_l, "h": 0.9,
        "attack_success_soft": attack, "attack_n": 50, "attack_ci": [0.0, 0.1],
        "attack_success_soft_3x": attack_3x, "attack_n_3x": 50, "attack_ci_3x": [0.0, 0.2],
        **cost}))
    (folder / "erasers").mkdir()
    (folder / "erasers" / "eraser_config.json").write_text(
        json.dumps({"train": {"seed": seed, **train}}))
    return folder


def test_front_keeps_the_undominated_runs_of_each_concept(tmp_path, capsys):
    pareto = load_benchmark("pareto")
    runs = [fake_run(tmp_path / "star" / "a", "star", 1.00, 0.30, 0.9),   # best locality
            fake_run(tmp_path / "star" / "b", "star", 0.95, 0.00, 0.5, seed=2),  # most robust
            fake_run(tmp_path / "star" / "c", "star", 0.95, 0.10, 0.2),   # dominated by b
            fake_run(tmp_path / "heart" / "a", "heart", 0.80, 0.50, 0.6),  # best Acc_L: on front
            fake_run(tmp_path / "heart" / "e", "heart", 0.60, 0.90, 0.9, method="esd-x")]
    runs += [fake_run(tmp_path / f"m{i}" / "merged", "heart", 0.7, 0.1 * i, 0.2) for i in (1, 2)]
    nothing = fake_run(tmp_path / "star" / "d", "star", 1.00, 1.0, 1.0)
    res = json.loads((nothing / "results.json").read_text())
    (nothing / "results.json").write_text(json.dumps(dict(res, acc_e=1.0)))  # erases nothing
    runs.append(nothing)
    runs.append(fake_run(tmp_path / "star" / "v", "star", 0.90, 0.90, 1.0, seed=1, eta=3.0))
    # a closed-form edit records the default seed but does not read it: no seed in its label
    runs.append(fake_run(tmp_path / "heart" / "u", "heart", 0.99, 1.0, 1.0, method="uce"))
    (tmp_path / "star" / "base").mkdir()  # no results.json: skipped, named
    out = tmp_path / "out"
    assert pareto.main([*map(str, runs), str(tmp_path / "star" / "base"), "--out", str(out)]) == 0
    assert "skipped" in capsys.readouterr().err
    got = json.loads((out / "pareto.json").read_text())
    # labelled by method and seed; where a label repeats or a method has runs of several
    # settings, by the folder as well
    assert {(r["concept"], r["method"]) for r in got} == {
        ("star", "receler s0 (star/a)"), ("star", "receler s2 (star/b)"),
        ("star", "receler s0 (star/c)"), ("star", "receler s0 (star/d)"),
        ("star", "receler s1 (star/v)"),  # another setting: every star run is named
        ("heart", "receler s0 (heart/a)"), ("heart", "esd-x s0"),
        ("heart", "receler s0 (m1/merged)"), ("heart", "receler s0 (m2/merged)"),
        ("heart", "uce")}
    rows = {(r["concept"], Path(r["run"]).name if "merged" not in r["run"] else
             Path(r["run"]).parent.name): r for r in got}
    # d keeps Acc_L 1.00 by not erasing: never on the front
    assert [rows["star", m]["on_front"] for m in "abcd"] == [True, True, False, False]
    # at 3×, c (same Acc_L as b, lower attack) dominates b; a keeps the best Acc_L
    assert [rows["star", m]["on_front_3x"] for m in "abc"] == [True, False, True]
    assert rows["heart", "a"]["on_front"] and rows["star", "b"]["seed"] == 2
    assert not rows["heart", "e"]["on_front"]  # dominated by heart a
    assert rows["heart", "m1"]["on_front"] and not rows["heart", "m2"]["on_front"]
    assert rows["star", "a"]["attack_n"] == 50 and rows["star", "a"]["attack_ci"] == [0.0, 0.1]
    # runs that differ only in the seed pool: attacked images summed, Wilson interval
    pool = {(p["concept"], p["method"]): p for p in json.loads((out / "pooled.json").read_text())}
    assert set(pool) == {("star", "receler (star/a)"), ("star", "receler (star/v)"),
                         ("heart", "receler (heart/a)"), ("heart", "esd-x"), ("heart", "uce")}
    assert pool["heart", "uce"]["seeds"] == [] and rows["heart", "u"]["seed"] is None
    star = pool["star", "receler (star/a)"]
    assert star["seeds"] == [0, 0, 0, 2] and star["attack_n"] == 200
    assert star["attack"] == pytest.approx((15 + 0 + 5 + 50) / 200)
    assert star["attack_ci"][0] < star["attack"] < star["attack_ci"][1]
    assert star["acc_l_min"] == 0.95 and star["acc_l"] == pytest.approx(0.975)
    assert len(pool["heart", "receler (heart/a)"]["runs"]) == 3
    assert pool["star", "receler (star/v)"]["seeds"] == [1]
    md = (out / "pareto.md").read_text()
    assert "## Pooled over training seeds" in md
    assert "## star" in md and "## heart" in md and "0.00 [0.00, 0.10] (n 50)" in md
    assert Image.open(out / "pareto_star.png").size == (760, 460)


def test_no_finished_run_is_a_one_line_error(tmp_path, capsys):
    pareto = load_benchmark("pareto")
    (tmp_path / "base").mkdir()
    assert pareto.main([str(tmp_path / "base"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: none of the folders holds a finished run")
    assert not (tmp_path / "out").exists()


def test_runs_made_before_the_key_get_their_image_change_from_the_folders(tmp_path):
    pareto = load_benchmark("pareto")
    from receler.eval.prompts import read_prompts
    from receler.protocol import PromptSets

    run = fake_run(tmp_path / "run", "star", 1.0, 0.1, 0.2)
    res = json.loads((run / "results.json").read_text())
    res["base_images"] = str(tmp_path / "base")
    (run / "results.json").write_text(json.dumps(res))
    rows = read_prompts(PromptSets.toy().simple)
    circle = next(r for r in rows if r.class_name == "circle").case_number
    star = next(r for r in rows if r.class_name == "star").case_number
    for folder, shade in ((tmp_path / "base" / "simple", 100), (run / "images" / "erased" /
                                                                "simple", 151)):
        folder.mkdir(parents=True)
        for case in (circle, star):  # star's own image may change: it is not counted
            Image.new("RGB", (8, 8), (shade, shade, shade) if case == circle
                      else (0, 0, 0)).save(folder / f"{case}_0.png")
    (run / "images" / "erased" / "simple" / f"{star}_0.png").unlink()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(run / "images" / "erased" / "simple" /
                                                   f"{star}_0.png")
    from receler.eval.locality import run_image_change

    change = run_image_change(run, res, {"toy": None})
    assert change["n"] == 1 and change["pixel"] == pytest.approx(51 / 255)
    assert run_image_change(run, res)["pixel"] == change["pixel"]  # no feature cache: pixels
    compare = load_benchmark("compare")
    res.setdefault("config", {})["out"] = str(run)
    assert compare.pixel_change_others(res) == pytest.approx(51 / 255)
    # recorded by the protocol: read, not measured again
    res["image_change_others"] = {"n": 9, "pixel": 0.25, "feature": None}
    assert compare.pixel_change_others(res) == 0.25
    res["pixel_change_others"] = 0.5  # recorded by the protocol: read, not measured again
    assert pareto.row_of(run, res)["pixel_change"] == 0.5


def test_a_folder_named_twice_is_counted_once(tmp_path, capsys):
    """Two shell globs naming the same run (once by another path) must not pool its
    attacked images twice."""
    pareto = load_benchmark("pareto")
    run = fake_run(tmp_path / "star" / "a", "star", 1.00, 0.30, 0.9)
    other = fake_run(tmp_path / "star" / "b", "star", 1.00, 0.10, 0.9, seed=1)
    out = tmp_path / "out"
    again = tmp_path / "star" / ".." / "star" / "a"
    assert pareto.main([str(run), str(other), str(again), "--out", str(out)]) == 0
    assert "1 folder(s) named twice, counted once" in capsys.readouterr().err
    assert len(json.loads((out / "pareto.json").read_text())) == 2
    (pool,) = json.loads((out / "pooled.json").read_text())
    assert pool["attack_n"] == 100


def test_an_exported_run_is_its_own_model_not_pooled_with_the_erasers(tmp_path):
    """`receler protocol --export` keeps the erasers' training settings in its folder: the
    run is labelled by its name and pooled only with exports of the same settings."""
    pareto = load_benchmark("pareto")
    runs = [fake_run(tmp_path / "star" / f"r{s}", "star", 1.0, 0.5, 0.9, seed=s) for s in (1, 2)]
    for s in (1, 2):
        run = fake_run(tmp_path / "star" / f"x{s}", "star", 1.0, 0.0, 0.1, seed=s)
        res = json.loads((run / "results.json").read_text())
        res.update(name="receler (exported)", export={"merge": {"iterations": 600}})
        (run / "results.json").write_text(json.dumps(res))
        runs.append(run)
    out = tmp_path / "out"
    assert pareto.main([*map(str, runs), "--out", str(out)]) == 0
    labels = sorted(r["method"] for r in json.loads((out / "pareto.json").read_text()))
    assert labels == ["receler (exported) s1", "receler (exported) s2", "receler s1",
                      "receler s2"]
    pool = {p["method"]: p for p in json.loads((out / "pooled.json").read_text())}
    assert pool["receler (exported)"]["attack"] == 0.0 and pool["receler"]["attack"] == 0.5
    assert pool["receler (exported)"]["attack_n"] == pool["receler"]["attack_n"] == 100


def test_cost_front_weighs_the_stronger_attack_against_training_passes(tmp_path):
    """Pooled runs that erase and keep Acc_L ≥ 0.97: on the cost front when none is as cheap
    and as robust at 3× the budget; ESD-x's passes are the yardstick."""
    pareto = load_benchmark("pareto")
    runs = [fake_run(tmp_path / "esd", "star", 1.00, 0.5, 0.8, method="esd-x", passes=8000),
            fake_run(tmp_path / "r1", "star", 1.00, 0.1, 0.5, seed=1, passes=12000),
            fake_run(tmp_path / "r2", "star", 1.00, 0.1, 0.3, seed=2, passes=12000),
            fake_run(tmp_path / "x", "star", 0.98, 0.0, 0.0, seed=1, passes=48000, rank=8),
            fake_run(tmp_path / "slow", "star", 1.00, 0.1, 0.6, seed=1, passes=60000, rank=4),
            fake_run(tmp_path / "broad", "star", 0.90, 0.0, 0.0, seed=1, passes=100, rank=2),
            fake_run(tmp_path / "uce", "star", 1.00, 1.0, 1.0, method="uce", passes=0)]
    out = tmp_path / "out"
    assert pareto.main([*map(str, runs), "--out", str(out)]) == 0
    pool = {p["runs"][0].split("/")[-1]: p for p in json.loads((out / "pooled.json").read_text())}
    assert pool["r1"]["unet_passes"] == 12000 and pool["r1"]["attack_3x"] == pytest.approx(0.4)
    front = {name for name, p in pool.items() if p["on_cost_front"]}
    # uce: cheapest; esd-x dominated by nothing cheaper; slow: dominated by r1 (cheaper, as
    # robust); broad: loses locality, never on it
    assert front == {"uce", "esd", "r1", "x"}
    md = (out / "pareto.md").read_text()
    assert "## The cost of robustness" in md and "| 48,000 | 6.00 |" in md
    assert "broad" not in md.split("## The cost of robustness")[1]
    assert Image.open(out / "cost_star.png").size == (760, 460)
    assert "ESD-x does not erase" not in md


def test_the_cost_table_says_when_esd_x_does_not_erase_the_concept(tmp_path):
    """× ESD-x on a concept ESD-x leaves in place (the style striped) is the cost of a run
    that erased nothing: the table says so."""
    pareto = load_benchmark("pareto")
    runs = [fake_run(tmp_path / "esd", "striped", 1.00, 1.0, 1.0, method="esd-x", passes=8000,
                     acc_e=1.0),
            fake_run(tmp_path / "r", "striped", 1.00, 0.0, 0.0, seed=1, passes=12000)]
    out = tmp_path / "out"
    assert pareto.main([*map(str, runs), "--out", str(out)]) == 0
    cost = (out / "pareto.md").read_text().split("## The cost of robustness")[1]
    assert "ESD-x does not erase striped (Acc_E 1.00)" in cost and "| 12,000 | 1.50 |" in cost


def test_a_baseline_s_seeds_pool_across_settings_added_since(tmp_path):
    """ESD-x's seeds pool when one was trained before a training setting existed and the
    other after, with that setting at its default (as compare.py reuses such runs); a
    setting at another value keeps the run apart."""
    pareto = load_benchmark("pareto")
    runs = [fake_run(tmp_path / "star" / "e1", "star", 1.0, 0.4, 0.9, seed=1, method="esd-x",
                     concepts="star"),
            fake_run(tmp_path / "star" / "e2", "star", 1.0, 0.2, 0.8, seed=2, method="esd-x",
                     concepts="star", init_erasers=""),
            fake_run(tmp_path / "star" / "e3", "star", 1.0, 0.0, 0.1, seed=3, method="esd-x",
                     concepts="star", iterations=7)]
    out = tmp_path / "out"
    assert pareto.main([*map(str, runs), "--out", str(out)]) == 0
    pool = [p for p in json.loads((out / "pooled.json").read_text()) if p["attack_n"] == 100]
    assert len(pool) == 1 and pool[0]["attack"] == pytest.approx(0.3)
