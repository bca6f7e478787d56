"""receler leaderboard: runs measured alike go side by side; others are refused by name."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from receler.cli import main
from receler.leaderboard import build, first_difference, to_markdown, to_picture


def result(method: str, h: float, attack_rate: float, **config) -> dict:
    attack = attack_rate
    rate = lambda r: {"successes": 0, "total": 10, "rate": r, "low": max(0, r - 0.1),  # noqa: E731
                      "high": min(1, r + 0.1)}
    return {"method": method, "concept": "star", "model": None, "detector": "toy",
            "rows": {"simple": 100, "paraphrase": 30}, "acc_e": 0.0, "acc_r": 0.05, "acc_l": 0.95,
            "h": h, "attack_success_soft": attack, "attack_n": 50,
            "attack_ci": [max(0, attack - 0.1), min(1, attack + 0.12)],
            "metrics": {"detail": {"acc_e": rate(0.0), "acc_l": rate(0.95)}},
            "train": {"unet_forward": 100, "unet_backward": 40, "seconds": 3.0},
            "config": {"concept": "star", "per_class": 10, "concept_rows": 30,
                       "attack": {"steps": 100, "tokens": 8}, "method": method,
                       "train": {"lr": 0.1 if method == "esd-x" else 0.003}, "out": method}
            | config}


def write_run(folder, data):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(data))
    return folder


def test_leaderboard_ranks_and_draws(tmp_path, capsys):
    a = write_run(tmp_path / "a", result("receler", 0.99, 0.1))
    b = write_run(tmp_path / "b", result("esd-x", 0.97, 0.6))
    assert main(["leaderboard", str(b), str(a), "--out", str(tmp_path / "lb")]) == 0
    board = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())
    assert [r["method"] for r in board["rows"]] == ["receler", "esd-x"]  # by H
    assert board["rows"][0]["attack_ci"] == [0.0, pytest.approx(0.22)]
    assert board["rows"][0]["unet_passes"] == 140
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "| receler | 0.990 | 0.000 [0.00, 0.10]" in md and "(50)" in md
    assert Image.open(tmp_path / "lb" / "leaderboard.png").size == (640, 480)
    # a second write is refused without --overwrite
    assert main(["leaderboard", str(a), "--out", str(tmp_path / "lb")]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("change, named", [
    ({"attack": {"steps": 30, "tokens": 8}}, "attack.steps: 100 against 30"),
    ({"per_class": 5}, "per_class: 10 against 5"),
])  # fmt: skip
def test_runs_measured_differently_are_refused(tmp_path, change, named):
    a = write_run(tmp_path / "a", result("receler", 0.99, 0.1))
    b = write_run(tmp_path / "b", result("esd-x", 0.97, 0.6, **change))
    with pytest.raises(ValueError, match=named.replace("[", r"\[")):
        build([a, b])


def test_other_detector_is_named(tmp_path):
    other = result("esd-x", 0.9, 0.5)
    other["detector"] = "grounding-dino"
    a = write_run(tmp_path / "a", result("receler", 0.99, 0.1))
    b = write_run(tmp_path / "b", other)
    with pytest.raises(ValueError, match="detector: 'toy' against 'grounding-dino'"):
        build([a, b])


def test_the_same_method_twice_is_told_apart(tmp_path):
    a = write_run(tmp_path / "seed0", result("receler", 0.99, 0.1))
    b = write_run(tmp_path / "seed1", result("receler", 0.98, 0.2))
    labels = [r["label"] for r in build([a, b])["rows"]]
    assert labels == ["receler (seed0)", "receler (seed1)"]


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.json"):
        build([tmp_path])
    (tmp_path / "results.json").write_text('{"acc_e": 0}')
    with pytest.raises(ValueError, match="not a protocol result"):
        build([tmp_path])
    assert first_difference({"a": {"b": 1}}, {"a": {"b": 1}}) is None


def test_models_made_elsewhere_and_skipped_stages(tmp_path):
    unet = result("unet", 0.95, 0.3)
    unet.update(name="unet:my-finetune", candidate={"kind": "unet"}, train=None,
                config={**unet["config"], "unet": "/models/my-finetune", "skip": ["attack"]})
    unet.update(attack_success_soft=None, attack_n=None, attack_ci=None)
    a = write_run(tmp_path / "a", result("receler", 0.99, 0.1))
    b = write_run(tmp_path / "b", unet)
    board = build([a, b])
    assert [(r["label"], r["kind"]) for r in board["rows"]] == [("receler", "erase"),
                                                                 ("unet:my-finetune", "unet")]
    line = to_markdown(board).splitlines()[-1]
    assert line.startswith("| unet:my-finetune | 0.950 |") and line.endswith("| – | – | – |")
    assert to_picture(board).size == (640, 480)  # the run without an attack has no point


def test_base_images_and_schema_are_checked(tmp_path):
    key = {"sampler": {"steps": 50}, "prompts": {"simple": {"rows": 100, "digest": "aa"}}}
    a = write_run(tmp_path / "a", result("receler", 0.99, 0.1) | {"base_key": key})
    other = {**key, "prompts": {"simple": {"rows": 100, "digest": "bb"}}}
    b = write_run(tmp_path / "b", result("uce", 0.9, 0.5) | {"base_key": other})
    with pytest.raises(ValueError, match="base_images.prompts.simple.digest: 'aa' against 'bb'"):
        build([a, b])
    c = write_run(tmp_path / "c", result("uce", 0.9, 0.5) | {"schema_version": 2})
    with pytest.raises(ValueError, match="schema_version 2, newer than this receler reads"):
        build([c])
