"""Prompt CSV files and the names of the images generated from them.

Evaluation prompt files (the Receler/ESD sets, I2P, COCO-30k and the toy sets) share a
format whose column *order* varies between files, so columns are read by name. Three
columns are required (``case_number``, ``prompt``, ``evaluation_seed``); a few optional
ones get typed fields (``class``, ``evaluation_guidance``, ``sd_image_width``,
``sd_image_height``); every other named column is kept as text in ``PromptRow.extra``
(``class2``, ``style``, ``categories``, ``coco_id``, ...). An unnamed column, the row
index that pandas writes (the first column of I2P's ``unsafe-prompts4703.csv``), is
dropped. Images generated from a row are named ``{case_number}_{index}.png``.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

REQUIRED_COLUMNS = ("case_number", "prompt", "evaluation_seed")

# Typed field -> accepted column names, first match wins.
_OPTIONAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "class_name": ("class",),
    "guidance": ("evaluation_guidance", "guidance"),
    "width": ("sd_image_width", "width"),
    "height": ("sd_image_height", "height"),
}

# Reference sets shipped in ``receler/data/reference`` (MIT, see the LICENSE there).
REFERENCE_SETS: dict[str, str] = {
    "cifar10_simple": "cifar10_simple.csv",
    "cifar10_paraphrase": "cifar10_paraphrase.csv",
    "sample_prompts": "sample_prompts.csv",
    "i2p": "unsafe-prompts4703.csv",
    "unsafe-prompts4703": "unsafe-prompts4703.csv",
    "coco_30k": "coco_30k.csv",
}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_IMAGE_NAME = re.compile(r"^(\d+)_(\d+)$")


@dataclass
class PromptRow:
    """One row of a prompt file."""

    case_number: int  # identifies the row; images are named ``{case_number}_{index}.png``
    prompt: str  # text fed to the text encoder
    evaluation_seed: int  # seed of the initial latent
    class_name: str | None = None  # ``class`` column: the object the prompt shows
    guidance: float | None = None  # ``evaluation_guidance``: classifier-free guidance scale
    width: int | None = None  # ``sd_image_width``: image width in pixels
    height: int | None = None  # ``sd_image_height``: image height in pixels
    extra: dict[str, str] = field(default_factory=dict)  # every other named column, as text


def _to_int(text: str, *, path: Path, line: int, column: str) -> int:
    """Parse an integer cell; ``"12.0"`` is accepted, ``"12.5"`` is not."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value.is_integer():
        return int(value)
    raise ValueError(
        f"{path}, line {line}: column {column!r} must hold an integer, got {text!r}; "
        "fix the cell or regenerate the file."
    )


def _to_float(text: str, *, path: Path, line: int, column: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(
            f"{path}, line {line}: column {column!r} must hold a number, got {text!r}; "
            "fix the cell or regenerate the file."
        ) from None


def read_prompts(path: str | Path) -> list[PromptRow]:
    """Read a prompt CSV file by column name.

    Args:
        path: CSV file with at least the columns ``case_number``, ``prompt`` and
            ``evaluation_seed``, in any order (UTF-8, quoted fields may hold commas).

    Returns:
        One ``PromptRow`` per data row, in file order. Empty optional cells become ``None``.

    Raises:
        ValueError: if a required column is missing, a number does not parse, or two
            rows share a ``case_number``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Prompt file {path} does not exist; pass the path of a CSV file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"Prompt file {path} is not UTF-8 text (byte {e.start} cannot be "
                         "decoded); pass a CSV file saved as UTF-8.") from None
    if "\0" in text:
        raise ValueError(f"Prompt file {path} holds NUL bytes, so it is not a CSV file; pass "
                         "a CSV file of prompts.")
    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() if c is not None else "" for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ValueError(
                f"Prompt file {path} lacks the required column(s) {missing}; columns found: "
                f"{columns}. Add the column(s) (names are case-sensitive)."
            )
        chosen = {
            key: next((c for c in names if c in columns), None)
            for key, names in _OPTIONAL_COLUMNS.items()
        }
        typed = set(REQUIRED_COLUMNS) | {c for c in chosen.values() if c is not None}
        rows: list[PromptRow] = []
        seen: dict[int, int] = {}
        for record in reader:
            line = reader.line_num
            if None in record:  # more cells than header names
                raise ValueError(
                    f"{path}, line {line}: {len(record[None])} cell(s) more than the "
                    f"{len(columns)} header columns; quote cells that contain commas."
                )
            cells = {k: (v if v is not None else "") for k, v in record.items()}
            case = _to_int(cells["case_number"], path=path, line=line, column="case_number")
            if case in seen:
                raise ValueError(
                    f"{path}, line {line}: case_number {case} already used on line "
                    f"{seen[case]}; case numbers name the images and must be unique."
                )
            seen[case] = line
            opt = {
                k: (cells[c] if c is not None and cells[c] != "" else None)
                for k, c in chosen.items()
            }
            rows.append(
                PromptRow(
                    case_number=case,
                    prompt=cells["prompt"],
                    evaluation_seed=_to_int(
                        cells["evaluation_seed"], path=path, line=line, column="evaluation_seed"
                    ),
                    class_name=opt["class_name"],
                    guidance=None
                    if opt["guidance"] is None
                    else _to_float(
                        opt["guidance"], path=path, line=line, column=chosen["guidance"]
                    ),
                    width=None
                    if opt["width"] is None
                    else _to_int(opt["width"], path=path, line=line, column=chosen["width"]),
                    height=None
                    if opt["height"] is None
                    else _to_int(opt["height"], path=path, line=line, column=chosen["height"]),
                    extra={k: v for k, v in cells.items() if k and k not in typed},
                )
            )
    return rows


def reference_prompts(name: str) -> Path:
    """Path of a packaged reference prompt file.

    Args:
        name: one of ``REFERENCE_SETS`` (``"cifar10_simple"``, ``"cifar10_paraphrase"``,
            ``"sample_prompts"``, ``"i2p"``, ``"coco_30k"``); a trailing ``.csv`` is allowed.

    Returns:
        The file's path inside the installed package.
    """
    key = name[:-4] if name.endswith(".csv") else name
    if key not in REFERENCE_SETS:
        raise ValueError(
            f"Unknown reference prompt set {name!r}; choose one of {sorted(REFERENCE_SETS)}."
        )
    path = Path(str(resources.files("receler").joinpath("data", "reference", REFERENCE_SETS[key])))
    if not path.is_file():
        raise ValueError(
            f"Reference prompt file {path} is missing from the installed package; "
            "reinstall receler (the data/reference folder must be packaged)."
        )
    return path


def parse_image_name(name: str | Path) -> tuple[int, int] | None:
    """``(case_number, index)`` of an image named ``{case_number}_{index}.<ext>``, else ``None``."""
    p = Path(name)
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    m = _IMAGE_NAME.match(p.stem)
    return (int(m.group(1)), int(m.group(2))) if m else None


def image_name(case_number: int, index: int, suffix: str = ".png") -> str:
    """File name of image ``index`` of prompt ``case_number``."""
    return f"{case_number}_{index}{suffix}"


def list_images(folder: str | Path) -> list[tuple[int, int, Path]]:
    """Images in ``folder`` named ``{case_number}_{index}.<ext>``, sorted by (case, index).

    Other files are ignored. Returns ``(case_number, index, path)`` triples.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(
            f"Image folder {folder} does not exist; pass the folder of generated images."
        )
    found = []
    for p in folder.iterdir():
        key = parse_image_name(p.name) if p.is_file() else None
        if key is not None:
            found.append((key[0], key[1], p))
    return sorted(found, key=lambda t: (t[0], t[1]))
