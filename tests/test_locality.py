"""receler.eval.locality: the other classes' image change beside Acc_L."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from receler.eval.locality import features_of, image_change, other_class_images
from receler.eval.prompts import PromptRow


def save(folder, name, colour, size=8):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(folder / name)


def test_unchanged_images_are_zero_and_a_colour_shift_is_its_size(tmp_path):
    base, same, shifted = tmp_path / "b", tmp_path / "s", tmp_path / "t"
    for i, c in enumerate([(200, 100, 50), (10, 20, 30)]):
        save(base, f"{i}_0.png", c)
        save(same, f"{i}_0.png", c)
        save(shifted, f"{i}_0.png", tuple(v + 51 for v in c))  # +0.2 on every value
    names = ["0_0.png", "1_0.png", "9_0.png"]  # 9 is in neither: left out
    assert image_change(base, same, names) == {"n": 2, "pixel": 0.0, "pixel_max": 0.0,
                                               "feature": None, "feature_fd": None}
    change = image_change(base, shifted, names)
    assert change["n"] == 2 and change["pixel"] == pytest.approx(0.2)
    assert image_change(base, tmp_path / "none", names) is None


def test_features_compare_each_pair_by_cosine_distance(tmp_path):
    base, edited = tmp_path / "b", tmp_path / "e"
    for i in range(3):
        save(base, f"{i}_0.png", (100, 0, 0))
        save(edited, f"{i}_0.png", (100, 0, 0) if i else (0, 100, 0))

    def features(images):  # mean RGB as the features
        return np.stack([np.asarray(im, np.float64).mean(axis=(0, 1)) for im in images])

    change = image_change(base, edited, ["0_0.png", "1_0.png", "2_0.png"], features)
    assert change["feature"] == pytest.approx(1 / 3)  # one pair orthogonal, two identical
    assert change["feature_fd"] > 0
    same = image_change(base, base, ["0_0.png", "1_0.png", "2_0.png"], features)
    assert same["feature"] == pytest.approx(0.0, abs=1e-12)
    assert same["feature_fd"] == pytest.approx(0.0, abs=1e-6)


def test_other_class_images_leave_the_concept_and_unclassed_rows_out(tmp_path):
    rows = [PromptRow(case_number=i, prompt=f"a {c}", class_name=c, evaluation_seed=i)
            for i, c in enumerate(["star", "circle", "square", ""])]
    for name in ("0_0.png", "1_0.png", "1_1.png", "2_0.png", "3_0.png", "12_0.png", "x_0.png"):
        save(tmp_path, name, (0, 0, 0))
    assert other_class_images(rows, "star", tmp_path) == ["1_0.png", "1_1.png", "2_0.png"]
    # a model that erased several concepts: every one of them is left out
    assert other_class_images(rows, ["star", "square"], tmp_path) == ["1_0.png", "1_1.png"]


def test_a_multi_concept_run_s_change_leaves_every_erased_concept_out(tmp_path):
    """The other classes' change of a run measuring one of several erased concepts counts
    only the classes none of them is; one recorded before that is measured again."""
    from receler.eval.locality import run_image_change
    from receler.eval.prompts import read_prompts
    from receler.protocol import PromptSets

    rows = read_prompts(PromptSets.toy().simple)
    case = {c: next(r for r in rows if r.class_name == c).case_number
            for c in ("circle", "square", "star")}
    run = tmp_path / "run"
    for c, n in case.items():  # circle kept as it was; square and star (erased) changed
        save(tmp_path / "base" / "simple", f"{n}_0.png", (100, 100, 100))
        save(run / "images" / "erased" / "simple", f"{n}_0.png",
             (100, 100, 100) if c == "circle" else (255, 255, 255))
    res = {"concept": "star", "erased": ["star", "square"], "base_images": str(tmp_path / "base"),
           "image_change_others": {"n": 2, "pixel": 0.3, "feature": None}}  # square counted
    change = run_image_change(run, res)
    assert change["n"] == 1 and change["pixel"] == 0.0
    assert change["left_out"] == ["square", "star"]
    res["image_change_others"] = change  # recorded with the erased concepts left out: read
    assert run_image_change(run, res) is change
    single = {"concept": "star", "image_change_others": {"n": 2, "pixel": 0.3}}
    assert run_image_change(run, single) is single["image_change_others"]


def test_features_only_where_the_detector_has_them():
    class NoFeatures:
        def detect(self, images, labels):
            return [{}]

    assert features_of(NoFeatures()) is None
