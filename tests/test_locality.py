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


def test_features_only_where_the_detector_has_them():
    class NoFeatures:
        def detect(self, images, labels):
            return [{}]

    assert features_of(NoFeatures()) is None
