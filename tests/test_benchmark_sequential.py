"""benchmarks/sequential.py: a second erasure on top of the first's erasers, both concepts
measured by the protocol on the toy model (tiny counts), and resuming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sequential.py"
TINY = ["--per-class", "1", "--concept-rows", "2", "--sample-steps", "2",
        "--attack-images", "1", "--attack-prompts", "1", "--attack-steps", "1",
        "--attack-tokens", "1", "--token-candidates", "4", "--token-sweeps", "1"]
FAST = ["--iterations=2", "--adv-start=1", "--adv-steps=1", "--ddim-steps=3", "--rank=4",
        "--checkpoint-every=1", "--mask-image-every=0"]


def test_second_erasure_starts_from_the_first_and_both_are_measured(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"

    def bench(*extra):
        return subprocess.run(
            [sys.executable, str(SCRIPT), "--first", "star", "--then", "heart", "--seed", "1",
             "--work", str(work), "--base-work", str(tmp_path / "b"), "--out", str(out),
             "--skip", "latency,two-object", *(f"--erase-flag={f}" for f in FAST),
             *(f"--protocol-flag={f}" for f in TINY), *extra],
            capture_output=True, text=True, timeout=600)

    proc = bench()
    assert proc.returncode == 0, proc.stderr + proc.stdout
    s = json.loads((out / "sequential_star_heart_s1.json").read_text())
    assert [(r["erased"], r["concept"]) for r in s["rows"]] == [
        ("star", "star"), ("star, then heart", "star"), ("star, then heart", "heart")]
    seq = json.loads((work / "star_then_heart_s1" / "erasers" / "eraser_config.json")
                     .read_text())
    assert seq["concepts"] == ["star", "heart"]
    assert seq["train"]["init_erasers"] == str(work / "star_s1" / "erasers")
    assert seq["train"]["seed"] == 1
    # the sequential set leaves both concepts out of Acc_L: 8 classes, one prompt each
    assert s["rows"][1]["acc_l_remaining_n"] == 8 and s["rows"][0]["acc_l_remaining_n"] == 9
    assert s["rows"][1]["unet_passes"] > 0
    assert "| star, then heart | heart |" in (out / "sequential_star_heart_s1.md").read_text()

    # finished steps are reused: nothing runs again
    logs = sorted(work.rglob("*.log"))
    before = [p.read_text() for p in logs]
    assert bench().returncode == 0
    assert [p.read_text() for p in logs] == before


def test_bad_arguments_are_one_line_errors(tmp_path):
    for extra, message in ((["--first", "star", "--then", "star"], "name two concepts"),
                           (["--first", "star", "--then", "heart", "--first-erasers",
                             str(tmp_path)], "holds no eraser_config.json")):
        proc = subprocess.run([sys.executable, str(SCRIPT), *extra], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]
