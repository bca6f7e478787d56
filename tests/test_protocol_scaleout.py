"""The protocol split across processes gives the single-process run's results, merged once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from PIL import Image

from receler.eval.detectors import evaluate_folder
from receler.eval.prompts import PromptRow
from receler.protocol import VARYING_KEYS, detect_share


def test_detection_shares_cover_every_image_once_with_one_process_scores(colour_detector,
                                                                         tmp_path):
    from receler.eval.detectors import get_detector

    rows = [PromptRow(case_number=i, prompt=f"p{i}", evaluation_seed=i,
                      class_name=("car", "dog")[i % 2]) for i in range(40)]
    for r in rows:  # 20 images per label: two detection batches each
        Image.new("RGB", (8, 8), (6 * r.case_number, 255 - 5 * r.case_number, 90)).save(
            tmp_path / f"{r.case_number}_0.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "99_0.png")  # another run's row: left out
    detector = get_detector(colour_detector)
    one = evaluate_folder(tmp_path, rows + [PromptRow(99, "x", 0, class_name="car")], detector)
    shares = [detect_share(tmp_path, rows, detector, index=i, count=3) for i in range(3)]
    # batches car 0-15, car 16-19, dog 0-15, dog 16-19, dealt out whole
    assert [len(s) for s in shares] == [20, 4, 16]
    merged = sorted(sum(shares, []), key=lambda d: d[0])
    assert [pos for pos, _ in merged] == list(range(40))
    assert [(r.row.case_number, r.scores) for _, r in merged] == \
        [(r.row.case_number, r.scores) for r in one if r.row.case_number != 99]


def comparable(results: dict, out) -> dict:
    """results.json without wall times and fingerprints, the run folder's path as <out>."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VARYING_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return json.loads(json.dumps(strip(results)).replace(str(out), "<out>"))


def images(folder) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))
            if "report" not in p.parts}


def test_two_processes_give_the_single_process_results(tmp_path):
    """Erase on the main process, generation and detection split over two CPU processes
    (torchrun sets the variables `accelerate launch` sets), merged results as one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    args = ["-m", "receler", "-v", "protocol", "--concept", "heart", "--per-class", "1",
            "--concept-rows", "3", "--sample-steps", "2", "--iterations", "2",
            "--skip", "latency,attack", "--device", "cpu"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    def counts(log, what):  # images per process, summed over the prompt sets
        found = {}
        for p, n in re.findall(rf"process (\d)/2 {what} (\d+)", log):
            found[p] = found.get(p, 0) + int(n)
        return found

    rows = sum(json.loads((tmp_path / "one" / "results.json").read_text())["rows"].values())
    for what in ("generated", "scored"):
        per_process = counts(two.stderr, what)
        assert sorted(per_process) == ["0", "1"] and all(per_process.values()), what
        assert sum(per_process.values()) == 2 * rows, what  # base and erased, each image once
    assert two.stdout.count("heart (receler): Acc_E") == 1  # one summary, the main's
    assert comparable(json.loads((tmp_path / "two" / "results.json").read_text()),
                      tmp_path / "two") == \
        comparable(json.loads((tmp_path / "one" / "results.json").read_text()), tmp_path / "one")
    assert images(tmp_path / "two" / "images") == images(tmp_path / "one" / "images")
