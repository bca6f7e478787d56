"""Metrics against hand-computed cases."""

from __future__ import annotations

import json

import pytest

from receler.eval.metrics import (
    ImageRecord,
    Rate,
    any_detected_rate,
    detection_rate,
    erasure_metrics,
    harmonic_score,
    mean_score,
    multi_concept_metrics,
    nudity_counts,
    per_class_rates,
    to_dict,
    to_markdown,
    two_object_locality,
    wilson,
)
from receler.eval.prompts import PromptRow

# successes, total, low, high: textbook Wilson 95% intervals (4 decimals)
WILSON_CASES = [
    (0, 10, 0.0, 0.2775),
    (5, 10, 0.2366, 0.7634),
    (10, 10, 0.7225, 1.0),
    (1, 1, 0.2065, 1.0),
    (0, 1, 0.0, 0.7935),
]


@pytest.mark.parametrize("k,n,low,high", WILSON_CASES)
def test_wilson(k, n, low, high):
    r = wilson(k, n)
    assert (r.successes, r.total, r.rate) == (k, n, k / n)
    assert r.low == pytest.approx(low, abs=5e-5)
    assert r.high == pytest.approx(high, abs=5e-5)


@pytest.mark.parametrize("k,n", [(0, 0), (3, 2), (-1, 4)])
def test_wilson_rejects_bad_counts(k, n):
    with pytest.raises(ValueError, match="successes"):
        wilson(k, n)


# acc_e, acc_r, acc_l, H (exact fractions where H is not an edge case)
H_CASES = [
    (0.0, 0.0, 1.0, 1.0),
    (0.5, 0.5, 0.5, 0.5),
    (0.2, 0.4, 0.9, 108 / 145),  # 3 / (5/4 + 5/3 + 10/9)
    (1.0, 0.0, 1.0, 0.0),  # concept fully kept: 1 - Acc_E = 0
    (0.0, 1.0, 1.0, 0.0),  # paraphrases fully kept
    (0.0, 0.0, 0.0, 0.0),  # locality destroyed
]


@pytest.mark.parametrize("e,r,l,h", H_CASES)
def test_harmonic_score(e, r, l, h):  # noqa: E741
    assert harmonic_score(e, r, l) == pytest.approx(h, rel=1e-12, abs=0.0)


@pytest.mark.parametrize("args", [(1.5, 0.0, 1.0), (0.0, -0.1, 1.0), (0.0, 0.0, 100.0)])
def test_harmonic_score_rejects_out_of_range(args):
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        harmonic_score(*args)


def rec(case: int, cls: str | None, present: list[str], asked: list[str], **extra) -> ImageRecord:
    """Record whose asked labels score 1 if present, else 0 (threshold 0.5)."""
    row = PromptRow(case, f"prompt {case}", case, cls, extra={k: v for k, v in extra.items()})
    return ImageRecord(row, 0, {lb: float(lb in present) for lb in asked}, 0.5)


def simple_set() -> list[ImageRecord]:
    """A: 4 images, 'a' detected on 1. B: 4 images, all show 'b'. C: 2 images, none show 'c'."""
    out = [rec(i, "a", ["a"] if i == 0 else [], ["a"]) for i in range(4)]
    out += [rec(10 + i, "b", ["b"], ["b", "a"]) for i in range(4)]
    out += [rec(20 + i, "c", [], ["c", "a"]) for i in range(2)]
    return out


def paraphrase_set() -> list[ImageRecord]:
    """A: 2 paraphrases, 'a' detected on 1; B: 1 paraphrase."""
    return [rec(100, "a", ["a"], ["a"]), rec(101, "a", [], ["a"]), rec(102, "b", ["b"], ["b"])]


def test_erasure_metrics_hand_computed():
    res = erasure_metrics(simple_set(), "a", paraphrase=paraphrase_set())
    assert (res.acc_e.successes, res.acc_e.total) == (1, 4)
    assert (res.acc_r.successes, res.acc_r.total) == (1, 2)
    assert (res.acc_l.successes, res.acc_l.total) == (4, 6)  # pooled over B and C
    assert res.acc_l_macro == 0.5  # (4/4 + 0/2) / 2, the reference's average
    assert res.locality_classes == ["b", "c"]
    assert res.h == pytest.approx(18 / 29, rel=1e-12)  # 3 / (4/3 + 2 + 3/2)


def test_erasure_metrics_without_paraphrases():
    res = erasure_metrics(simple_set(), "a")
    assert res.acc_r is None and res.h is None


def test_erasure_metrics_missing_concept():
    with pytest.raises(ValueError, match="No simple images target 'z'"):
        erasure_metrics(simple_set(), "z")


def test_multi_concept_metrics_hand_computed():
    res = multi_concept_metrics(simple_set(), ["a", "b"], paraphrase=paraphrase_set())
    a, b = res.per_concept
    assert (a.acc_e.rate, b.acc_e.rate) == (0.25, 1.0)
    assert (a.acc_r.rate, b.acc_r.rate) == (0.5, 1.0)
    assert (res.acc_l.successes, res.acc_l.total) == (0, 2)  # only C is left
    assert a.locality_classes == b.locality_classes == ["c"]
    assert res.mean_acc_e == 0.625 and res.mean_acc_r == 0.75
    assert res.h == 0.0 and res.mean_h == 0.0  # Acc_L = 0


def test_multi_concept_rejects_repeats():
    with pytest.raises(ValueError, match="without repeats"):
        multi_concept_metrics(simple_set(), ["a", "a"])


def test_per_class_rates_own_and_fixed_label():
    own = per_class_rates(simple_set())
    assert [(c.class_name, c.label, c.rate.successes, c.rate.total) for c in own] == [
        ("a", "a", 1, 4),
        ("b", "b", 4, 4),
        ("c", "c", 0, 2),
    ]
    fixed = per_class_rates(simple_set(), label="a")
    assert [(c.label, c.rate.successes) for c in fixed] == [("a", 1), ("a", 0), ("a", 0)]


def test_style_concept_targets_style_column():
    recs = [
        rec(0, "star", ["striped", "star"], ["striped", "star"], style="striped"),
        rec(1, "moon", [], ["striped", "moon"], style="striped"),
        rec(2, "moon", ["moon"], ["moon"], style=""),
    ]
    res = erasure_metrics(recs, "striped")
    assert (res.acc_e.successes, res.acc_e.total) == (1, 2)
    assert (res.acc_l.successes, res.acc_l.total) == (1, 1)


def test_two_object_locality():
    recs = [
        rec(0, "a", ["b"], ["a", "b"], class2="b"),  # other kept, erased gone
        rec(1, "c", ["a"], ["c", "a"], class2="a"),  # other lost, erased kept
        rec(2, "a", ["a"], ["a"], class2="a"),  # both the erased class: skipped
        rec(3, "b", [], ["b", "c"], class2="c"),  # no erased class: skipped
        rec(4, "d", ["d", "a"], ["d", "a"], class2="a"),
    ]
    res = two_object_locality(recs, "a")
    assert (res.other_survives.successes, res.other_survives.total) == (2, 3)
    assert (res.erased_detected.successes, res.erased_detected.total) == (2, 3)
    with pytest.raises(ValueError, match="class2"):
        two_object_locality(recs[2:4], "a")
    # c erased too (one model, several concepts): its pair with a is not a locality check
    both = two_object_locality(recs, "a", erased=["a", "c"])
    assert (both.other_survives.successes, both.other_survives.total) == (2, 2)


def test_present_uses_threshold_and_rejects_unasked_labels():
    row = PromptRow(0, "p", 0, "a")
    r = ImageRecord(row, 0, {"a": 0.5, "b": 0.4999}, threshold=0.5)
    assert r.present("a") and not r.present("b")
    with pytest.raises(ValueError, match="no score for 'c'"):
        r.present("c")
    assert detection_rate([r], "a") == Rate(1, 1, 1.0, wilson(1, 1).low, 1.0)


def test_nudity_counts_and_any_rate():
    labels = ["FEET_EXPOSED", "BELLY_EXPOSED"]
    recs = [
        rec(0, None, ["FEET_EXPOSED", "BELLY_EXPOSED"], labels),
        rec(1, None, ["FEET_EXPOSED"], labels),
        rec(2, None, [], labels),
    ]
    assert nudity_counts(recs, labels) == {"FEET_EXPOSED": 2, "BELLY_EXPOSED": 1, "total": 3}
    assert any_detected_rate(recs, labels).successes == 2


def test_mean_score_uses_prompt_by_default():
    row = PromptRow(0, "a cat", 0, None)
    recs = [ImageRecord(row, 0, {"a cat": 30.0}, 20.0), ImageRecord(row, 1, {"a cat": 20.0}, 20.0)]
    assert mean_score(recs) == 25.0


def test_to_markdown_exact():
    res = erasure_metrics(simple_set(), "a", paraphrase=paraphrase_set())
    lines = to_markdown(res).splitlines()
    assert lines[0] == "| concept | Acc_E (%) ↓ | Acc_R (%) ↓ | Acc_L (%) ↑ | H (%) ↑ |"
    assert lines[2] == (
        f"| a | 25.0 [{100 * res.acc_e.low:.1f}, {100 * res.acc_e.high:.1f}] | "
        f"50.0 [{100 * res.acc_r.low:.1f}, {100 * res.acc_r.high:.1f}] | "
        f"66.7 [{100 * res.acc_l.low:.1f}, {100 * res.acc_l.high:.1f}] | 62.1 |"
    )
    multi = to_markdown(multi_concept_metrics(simple_set(), ["a", "b"])).splitlines()
    assert len(multi) == 5 and multi[-1].startswith("| mean | 62.5 | - |")
    assert to_markdown({"FEET_EXPOSED": 2, "total": 2}).splitlines()[2] == "| FEET_EXPOSED | 2 |"
    with pytest.raises(TypeError, match="to_markdown"):
        to_markdown(3.0)


def test_to_dict_is_json_serialisable():
    res = multi_concept_metrics(simple_set(), ["a", "b"], paraphrase=paraphrase_set())
    d = json.loads(json.dumps(to_dict(res)))
    assert d["per_concept"][0]["acc_e"] == {
        "successes": 1,
        "total": 4,
        "rate": 0.25,
        "low": res.per_concept[0].acc_e.low,
        "high": res.per_concept[0].acc_e.high,
    }
    assert d["concepts"] == ["a", "b"] and d["h"] == 0.0
    assert json.loads(json.dumps(to_dict(per_class_rates(simple_set()))))[2]["class_name"] == "c"
    assert to_dict({"x": float("nan")}) == {"x": None}
