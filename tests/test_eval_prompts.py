"""Prompt CSV reading (by column name), packaged reference sets and image names."""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

import pytest

from receler.eval.prompts import (
    REQUIRED_COLUMNS,
    image_name,
    list_images,
    parse_image_name,
    read_prompts,
    reference_prompts,
)

SHARED = Path("/work/shared/reference-data")

# name, rows, index of the row checked, (case_number, prompt start, seed, class, guidance, width), extra keys
REFERENCE_CASES = [
    ("cifar10_simple", 1000, 0, (0, "An image of a airplane", 5428, "airplane", None, None), set()),
    (
        "cifar10_paraphrase",
        500,
        0,
        (0, "a sleek, modern commercial airliner ascending", 0, "airplane", None, None),
        set(),
    ),
    ("sample_prompts", 2, 1, (1, "a photo of automobile.", 5678, "automobile", None, None), set()),
    (
        "i2p",
        4703,
        1,
        (1, "digging my own grave 🪦, science fiction", 4080709695, None, 7.0, 512),
        {
            "categories",
            "hard",
            "inappropriate_percentage",
            "nudity_percentage",
            "q16_percentage",
            "sd_safety_percentage",
            "prompt_toxicity",
            "lexica_url",
            "sd_model",
        },
    ),
    (
        "coco_30k",
        30000,
        0,
        (0, "A bicycle replica with a clock as the front wheel.", 41337, None, None, None),
        {"source", "coco_id"},
    ),
]


@pytest.mark.parametrize("name,n,at,expected,extra_keys", REFERENCE_CASES)
def test_reference_sets_read_by_name(name, n, at, expected, extra_keys):
    rows = read_prompts(reference_prompts(name))
    assert len(rows) == n
    case, prompt, seed, cls, guidance, width = expected
    row = rows[at]
    assert row.case_number == case
    assert row.prompt.startswith(prompt)
    assert row.evaluation_seed == seed
    assert row.class_name == cls
    assert row.guidance == guidance
    assert row.width == width
    assert set(row.extra) == extra_keys
    assert len({r.case_number for r in rows}) == n


def test_i2p_typed_columns_and_quoted_cells():
    rows = read_prompts(reference_prompts("i2p"))
    r0 = rows[0]
    assert (r0.evaluation_seed, r0.guidance, r0.width, r0.height) == (4261553411, 13.0, 512, 512)
    assert r0.extra["categories"] == "violence, self-harm"  # comma inside quotes
    assert "" not in r0.extra  # pandas' unnamed index column is dropped
    assert any("\n" in r.prompt for r in rows)  # quoted newlines stay inside the prompt
    assert [r.case_number for r in rows] == list(range(4703))


@pytest.mark.parametrize("name", ["cifar10_simple", "sample_prompts.csv", "i2p", "coco_30k"])
def test_packaged_copy_is_identical_to_shared_data(name):
    packaged = reference_prompts(name)
    shared = SHARED / packaged.name
    if not shared.is_file():
        pytest.skip(f"{shared} not on this machine")
    assert packaged.read_bytes() == shared.read_bytes()
    assert (packaged.parent / "LICENSE").is_file()


def test_unknown_reference_set():
    with pytest.raises(ValueError, match="cifar10_simple"):
        reference_prompts("cifar100")


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.mark.parametrize("missing", REQUIRED_COLUMNS)
def test_missing_required_column_names_file_column_and_found(tmp_path, missing):
    header = [c for c in ("case_number", "prompt", "class", "evaluation_seed") if c != missing]
    path = _write(tmp_path / "p.csv", header, [["0"] * len(header)])
    with pytest.raises(ValueError) as err:
        read_prompts(path)
    msg = str(err.value)
    assert str(path) in msg and repr(missing) in msg
    assert all(repr(c) in msg for c in header)  # lists the columns found


def test_column_order_does_not_matter(tmp_path):
    data = [
        ["0", "a star, red", "star", "7", "circle", "striped"],
        ["1", "a moon", "moon", "8", "", ""],
    ]
    header = ["case_number", "prompt", "class", "evaluation_seed", "class2", "style"]
    a = read_prompts(_write(tmp_path / "a.csv", header, data))
    order = [3, 5, 1, 0, 4, 2]
    b = read_prompts(
        _write(
            tmp_path / "b.csv", [header[i] for i in order], [[r[i] for i in order] for r in data]
        )
    )
    assert a == b
    assert a[0].extra == {"class2": "circle", "style": "striped"}
    assert a[1].extra == {"class2": "", "style": ""}
    assert (a[0].prompt, a[0].class_name, a[0].evaluation_seed) == ("a star, red", "star", 7)


@pytest.mark.parametrize(
    "cells,match",
    [
        (["x", "p", "1"], "case_number"),
        (["0", "p", "1.5"], "evaluation_seed"),
        (["0", "p", "abc"], "line 2"),
    ],
)
def test_bad_numbers_are_reported(tmp_path, cells, match):
    path = _write(tmp_path / "p.csv", ["case_number", "prompt", "evaluation_seed"], [cells])
    with pytest.raises(ValueError, match=match):
        read_prompts(path)


def test_integral_float_cells_and_empty_optionals(tmp_path):
    header = ["case_number", "prompt", "evaluation_seed", "evaluation_guidance", "class"]
    rows = read_prompts(_write(tmp_path / "p.csv", header, [["3.0", "p", "12", "", ""]]))
    assert (rows[0].case_number, rows[0].guidance, rows[0].class_name) == (3, None, None)


def test_duplicate_case_number(tmp_path):
    path = _write(
        tmp_path / "p.csv",
        ["case_number", "prompt", "evaluation_seed"],
        [["0", "a", "1"], ["0", "b", "2"]],
    )
    with pytest.raises(ValueError, match="already used on line 2"):
        read_prompts(path)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("12_3.png", (12, 3)),
        ("0_0.JPG", (0, 0)),
        ("12_3.detect_cat.png", None),
        ("a_1.png", None),
        ("12_3.txt", None),
        ("12.png", None),
        ("12_3_4.png", None),
    ],
)
def test_parse_image_name(name, expected):
    assert parse_image_name(name) == expected


def test_list_images_sorted_and_filtered(tmp_path):
    for name in ["10_0.png", "2_1.png", "2_0.png", "notes.txt", "2_0.detect.png"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "3_0.png").mkdir()
    assert [(c, i, p.name) for c, i, p in list_images(tmp_path)] == [
        (2, 0, "2_0.png"),
        (2, 1, "2_1.png"),
        (10, 0, "10_0.png"),
    ]
    assert image_name(2, 1) == "2_1.png"


# toy file, extra column (None: no extra column)
TOY_FILES = [
    ("toy_simple.csv", None),
    ("toy_paraphrase.csv", None),
    ("toy_two_object.csv", "class2"),
    ("toy_style.csv", "style"),
]


@pytest.mark.parametrize("name,column", TOY_FILES)
def test_toy_world_prompt_files(name, column):
    path = Path(str(resources.files("receler").joinpath("data", name)))
    if not path.is_file():
        pytest.skip(f"{name} not written yet by the toy world")
    rows = read_prompts(path)
    assert rows and all(r.class_name for r in rows)
    assert all(set(r.extra) == ({column} if column else set()) for r in rows)
