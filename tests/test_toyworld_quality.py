"""Reduced quality bars of the shipped toy model (about a minute on a 2-core CPU).

The full bars (50 images per class per set) are measured by scripts/toyworld/measure.py.
Here each set is subsampled, so every threshold is the bar loosened by about two
binomial standard errors of the smaller sample (sqrt(p (1 - p) / n)), no more.
"""

from __future__ import annotations

import math

import pytest
import torch

from receler.toyworld.model import default_model_path, default_sampler_settings
from receler.toyworld.prompts import prompt_file
from receler.toyworld.quality import (
    detector_accuracy,
    generate,
    read_rows,
    score_classes,
    score_style,
    subsample,
)


def _shipped():
    try:
        path = default_model_path()
        from receler.toyworld import load_detector

        det = load_detector()
    except FileNotFoundError as e:
        pytest.skip(f"toy weights not shipped yet: {e}")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe, det, default_sampler_settings(path)


def _loosened(bar: float, n: int, *, upper: bool = False) -> float:
    """``bar`` moved by two binomial standard errors for ``n`` samples."""
    se = math.sqrt(max(bar * (1 - bar), 0.05 * 0.95) / n)
    return bar + 2 * se if upper else bar - 2 * se


@pytest.fixture(scope="module")
def shipped():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the module's generation is the suite's slowest part
    yield _shipped()
    torch.set_num_threads(threads)  # the other modules keep conftest's one thread


def test_detector_accuracy_on_fresh_renders(shipped):
    _, det, _ = shipped
    assert detector_accuracy(det, 300) >= _loosened(0.98, 300)


@pytest.mark.parametrize(
    "name, per_class, columns, bar",
    [
        ("simple", 5, ("class",), 0.90),
        ("paraphrase", 3, ("class",), 0.80),
        ("two_object", 3, ("class", "class2"), 0.70),
    ],
)
def test_prompted_classes_are_generated(shipped, name, per_class, columns, bar):
    pipe, det, settings = shipped
    rows = subsample(read_rows(prompt_file(name)), per_class)
    rate = score_classes(det, generate(pipe, rows, settings, progress=False), rows, columns)
    assert rate >= _loosened(bar, len(rows)), f"{name}: {rate:.3f} over {len(rows)} images"


def test_style_follows_the_style_word(shipped):
    pipe, det, settings = shipped
    rows = subsample(
        read_rows(prompt_file("style")), 2, ("class", "style")
    )  # 2 with, 2 without per class
    m = score_style(det, generate(pipe, rows, settings, progress=False), rows)
    n = len(rows) // 2
    assert m["style_rate_with_word"] >= _loosened(0.80, n), m
    assert m["style_rate_without_word"] <= _loosened(0.10, n, upper=True), m
