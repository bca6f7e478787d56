"""benchmarks/multi.py: one edit for k concepts, each measured by the protocol on the toy
model (tiny counts), the rows, the pooled attack and resuming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_benchmark

MULTI = Path(__file__).resolve().parents[1] / "benchmarks" / "multi.py"
TINY = ["--per-class", "1", "--concept-rows", "2", "--sample-steps", "2",
        "--attack-images", "1", "--attack-prompts", "1", "--attack-steps", "1",
        "--attack-tokens", "1", "--token-candidates", "4", "--token-sweeps", "1"]


@pytest.fixture(scope="module")
def multi():
    return load_benchmark("multi")


def test_training_methods_get_k_times_the_recommended_steps(multi):
    from receler.config import model_erase_defaults
    from receler.pipeline import default_model

    rec = model_erase_defaults(default_model(), "receler")
    assert multi.scaled_flags("receler", 3, None, []) == [
        f"--iterations={rec['iterations'] * 3}", f"--adv-start={rec['adv_start'] * 3}"]
    # a flag the user gives wins; closed-form edits have no steps to scale
    assert multi.scaled_flags("receler", 3, None, ["--iterations=10"]) == [
        f"--adv-start={rec['adv_start'] * 3}"]
    assert multi.scaled_flags("uce", 5, None, []) == []
    assert multi.seeded("receler") and not multi.seeded("uce")


def test_attack_is_pooled_over_the_erased_concepts(multi):
    rows = [{"attack_success_soft": 0.1, "attack_n": 50}, {"attack_success_soft": 0.5,
                                                           "attack_n": 50}]
    p = multi.pooled(rows)
    assert p["n"] == 100 and p["rate"] == pytest.approx(0.3)
    assert p["ci"][0] < 0.3 < p["ci"][1]
    assert multi.pooled([{"attack_success_soft": None, "attack_n": None}]) is None


def test_k_concepts_are_erased_by_one_edit_and_measured_without_each_other(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"

    def bench(*extra):
        return subprocess.run(
            [sys.executable, str(MULTI), "--methods", "uce", "--k", "1,2", "--seeds", "0,1",
             "--order", "star,heart", "--work", str(work), "--base-work", str(tmp_path / "b"),
             "--out", str(out), "--skip", "latency,two-object",
             *(f"--protocol-flag={f}" for f in TINY), *extra],
            capture_output=True, text=True, timeout=600)

    proc = bench()
    assert proc.returncode == 0, proc.stderr + proc.stdout
    rows = json.loads((out / "multi.json").read_text())
    # UCE does not depend on the seed: one row per k
    assert [(r["method"], r["k"], r["seed"], r["concepts"]) for r in rows] == [
        ("uce", 1, 0, ["star"]), ("uce", 2, 0, ["star", "heart"])]
    one, two = rows
    saved = json.loads((work / "uce" / "k2_seed0" / "erasers" / "eraser_config.json")
                       .read_text())
    assert saved["concepts"] == ["star", "heart"]
    # locality on the classes not erased: 9 then 8 classes, one simple prompt each
    assert one["acc_l_remaining_n"] == 9 and two["acc_l_remaining_n"] == 8
    # the remaining classes' image change, both erased concepts left out
    star_run = json.loads((work / "uce" / "k2_seed0" / "star" / "results.json").read_text())
    assert star_run["image_change_others"]["left_out"] == ["heart", "star"]
    assert two["pixel_change_remaining"] == star_run["image_change_others"]["pixel"]
    assert 0.0 <= two["feature_change_remaining"] <= 2.0
    heart = json.loads((work / "uce" / "k2_seed0" / "heart" / "results.json").read_text())
    assert heart["erased"] == ["star", "heart"]
    # the token attack's size flags reach the protocol
    assert (heart["config"]["attack"]["candidates"], heart["config"]["attack"]["sweeps"]) == (4, 1)
    assert set(two["per_concept"]) == {"star", "heart"}
    assert two["attack_n"] == 2 and 0.0 <= two["attack_success_soft"] <= 1.0
    assert two["acc_e"] == pytest.approx((two["per_concept"]["star"]["acc_e"]
                                          + two["per_concept"]["heart"]["acc_e"]) / 2)
    assert (out / "multi.png").is_file() and "| uce | 2 | 0 | star, heart |" in \
        (out / "multi.md").read_text()

    # finished steps are reused: nothing runs again
    logs = sorted(work.rglob("*.log"))
    before = [p.read_text() for p in logs]
    assert bench().returncode == 0
    assert [p.read_text() for p in logs] == before
    assert bench("--collect").returncode == 0
    assert json.loads((out / "multi.json").read_text()) == rows


def test_exported_row_measures_the_merged_unet_of_receler_s_erasers(tmp_path):
    """``receler-exported``: ``receler``'s eraser set of the same k and seed, merged into the
    UNet by ``receler export``; each erased concept measured on the merged UNet with every
    erased concept left out of Acc_L, and the cost of both stages in the row."""
    work, out = tmp_path / "work", tmp_path / "out"
    erase = ["--iterations=2", "--adv-start=0", "--adv-steps=0", "--ddim-steps=3", "--rank=4",
             "--base-images=1"]
    exporting = ["--iterations=2", "--adv-steps=1", "--eval-trajectories=0"]

    def bench(*extra, erase=erase, export=exporting):
        return subprocess.run(
            [sys.executable, str(MULTI), "--methods", "receler-exported", "--k", "2", "--seeds",
             "0", "--order", "star,heart", "--work", str(work), "--base-work",
             str(tmp_path / "b"), "--out", str(out), "--skip", "latency,two-object",
             *(f"--protocol-flag={f}" for f in TINY), *(f"--erase-flag={f}" for f in erase),
             *(f"--export-flag={f}" for f in export), *extra],
            capture_output=True, text=True, timeout=600)

    proc = bench()
    assert proc.returncode == 0, proc.stderr + proc.stdout
    [row] = json.loads((out / "multi.json").read_text())
    assert (row["method"], row["k"], row["concepts"]) == ("receler-exported", 2, ["star", "heart"])
    # the flags the run was made with label its row
    assert row["variant"] == " ".join(erase + exporting)
    assert f"| receler-exported ({row['variant']}) | 2 | 0 |" in (out / "multi.md").read_text()
    erasers = json.loads((work / "receler" / "k2_seed0" / "erasers" / "eraser_config.json")
                         .read_text())
    merged = work / "receler-exported" / "k2_seed0"
    export = json.loads((merged / "merged_unet" / "merge_config.json").read_text())
    assert export["concepts"] == ["star", "heart"] and export["merge"]["iterations"] == 2
    heart = json.loads((merged / "heart" / "results.json").read_text())
    assert heart["erased"] == ["star", "heart"] and heart["candidate"]["kind"] == "unet"
    assert row["acc_l_remaining_n"] == 8
    both = (erasers["stats"]["unet_forward"] + erasers["stats"]["unet_backward"]
            + export["stats"]["unet_forward"] + export["stats"]["unet_backward"])
    assert row["unet_passes"] == both

    # a collection cannot label the run with settings it was not made with, given or left
    # out ...
    for wrong, says in ((dict(erase=[*erase[:-2], "--rank=8"]), "rank=4, not 8"),
                        (dict(erase=erase[:-1]), "base_images=1, not 8"),
                        (dict(export=["--iterations=2", "--adv-steps=3"]), "adv_steps=1, not 3"),
                        (dict(export=exporting[:2]), "eval_trajectories=0, not 2")):
        proc = bench("--collect", **wrong)
        assert proc.returncode != 0 and says in proc.stderr, proc.stderr
    # ... and --append keeps the rows of other work folders, replacing the same row
    other = {**row, "method": "receler", "variant": "--concept-balance=1"}
    (out / "multi.json").write_text(json.dumps([other, {**row, "acc_e": -1.0}]))
    assert bench("--collect", "--append").returncode == 0
    assert json.loads((out / "multi.json").read_text()) == [other, row]
    assert "| receler (--concept-balance=1) | 2 |" in (out / "multi.md").read_text()
