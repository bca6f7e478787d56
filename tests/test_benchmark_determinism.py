"""benchmarks/determinism.py: variants' commands, and the per-image comparison counts what
changed (pixels, top class, detections) against the reference run."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import load_benchmark
from PIL import Image


@pytest.fixture(scope="module")
def det():
    return load_benchmark("determinism")


class ChannelDetector:
    """Scores red and green by the image's mean channel value."""

    labels, threshold = ["red", "green"], 0.5

    def detect(self, images, labels):
        return [{lb: im.getpixel((0, 0))[("red", "green").index(lb)] / 255 for lb in labels}
                for im in images]


def fake_run(root, colours: dict[str, tuple], acc_l: float):
    """A protocol run folder: one base and one erased image set, and its results.json."""
    for which in ("base", "erased"):
        folder = root / "images" / which / "simple"
        folder.mkdir(parents=True)
        for name, colour in colours.items():
            Image.new("RGB", (4, 4), colour).save(folder / name)
    side = {"acc_e": 0.0, "acc_r": None, "acc_l": acc_l, "h": 0.9}
    (root / "results.json").write_text(json.dumps({**side, "base": side, "model": "toy",
                                                   "rows": {"simple": 3},
                                                   "seconds": {"total": 5.0}}))
    return json.loads((root / "results.json").read_text())


def test_changes_are_counted_per_image_against_the_reference(det, tmp_path):
    same = {"0_0.png": (200, 10, 0), "1_0.png": (10, 200, 0), "2_0.png": (100, 100, 0)}
    results = {"1-thread": fake_run(tmp_path / "1-thread", same, 0.8),
               "2-threads": fake_run(tmp_path / "2-threads",  # one last bit, one flipped class
                                     {**same, "0_0.png": (201, 10, 0), "2_0.png": (100, 160, 0)},
                                     0.7)}
    args = SimpleNamespace(runs=tmp_path, concept="heart", erasers=tmp_path / "e", per_class=1,
                           concept_rows=1, sample_steps=None)
    report = det.summarise(args, list(results), results, det.Reader(ChannelDetector()))
    ref, other = report["variants"]["1-thread"], report["variants"]["2-threads"]
    assert ref["images"] == {"images": 6, "pixels_changed": 0, "top_class_changed": 0,
                             "detections_changed": 0}
    s = other["sets"]["erased/simple"]
    assert (s["pixels_changed"], s["max_pixel_change"], s["changed_pixel_values"]) == (2, 60, 32)
    assert (s["top_class_changed"], s["detections_changed"], s["changed"]) == (1, 1, ["2_0.png"])
    assert s["max_score_change"] == pytest.approx(60 / 255)
    assert other["images"]["top_class_changed"] == 2  # base and erased alike
    assert other["delta"]["erased"]["acc_l"] == pytest.approx(-0.1)
    assert other["delta"]["erased"]["acc_r"] is None
    js, md = det.write(report, tmp_path / "results")
    assert json.loads(js.read_text())["reference"] == "1-thread"
    assert "| 2-threads | 0.000 | – | 0.700 | 0.900 | 0.700 | 4/6 | 60 | 0.24 | 2 | 2 | 5 |" \
        in md.read_text()

    fake_run(tmp_path / "short", {"0_0.png": (0, 0, 0)}, 0.8)
    with pytest.raises(ValueError, match="different images"):
        det.compare_sets(det.Reader(ChannelDetector()).read(tmp_path / "1-thread" / "images"
                                                             / "base" / "simple"),
                         det.Reader(ChannelDetector()).read(tmp_path / "short" / "images"
                                                            / "base" / "simple"))


def test_variant_commands_and_bad_input(det, tmp_path):
    (tmp_path / "eraser_config.json").write_text("{}")
    args = det.parse_args(["--erasers", str(tmp_path), "--concept", "heart", "--runs",
                           str(tmp_path / "runs"), "--variants", "2-processes,"
                           "1-thread-deterministic"])
    assert args.variant_names == ["2-processes", "1-thread-deterministic"]
    cmd, env = det.protocol_command(args, "2-processes", tmp_path / "out")
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert "--deterministic" not in cmd and env["OMP_NUM_THREADS"] == "1"
    cmd, env = det.protocol_command(args, "1-thread-deterministic", tmp_path / "out")
    assert cmd[-1] == "--deterministic" and cmd[cmd.index("--threads") + 1] == "1"
    with pytest.raises(SystemExit, match="unknown variant '3-threads': choose from 1-thread"):
        det.parse_variants("1-thread,3-threads")
    with pytest.raises(SystemExit, match="not a finished `receler erase` folder"):
        det.parse_args(["--erasers", str(tmp_path / "nothing"), "--concept", "heart"])
