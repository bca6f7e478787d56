"""Keys of the protocol's image folders, so a reused folder never mixes measurements.

The protocol skips images already on disk (``{set}/{case_number}_0.png``), which makes
runs resumable and lets runs share one base-model folder (``--base-dir``). That is safe
only while every image on disk was made the way this run would make it. Each folder holds
``images_key.json``: the model, dtype and sampler, for the erased folder the candidate,
and per image the prompt, seed and the row's own guidance and size. A run whose settings
differ is refused with the first difference named. Rows may be added (a run with more
prompts per class extends the folder), never changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .serialization import atomic_write

KEY_FILE = "images_key.json"


def row_key(row) -> list:
    """What decides a row's image besides the folder's settings."""
    return [row.prompt, row.evaluation_seed, row.guidance, row.height, row.width]


def folder_key(model: str, dtype: str, settings, rows: dict[str, Sequence],
               candidate: dict | None = None) -> dict[str, Any]:
    """The key of one image folder (``candidate`` is ``None`` for the base model)."""
    return {"model": model, "dtype": dtype,
            "sampler": json.loads(json.dumps(asdict(settings), default=str)),
            "candidate": candidate,
            "images": {name: {str(r.case_number): row_key(r) for r in rs}
                       for name, rs in rows.items()}}


def summary(key: dict, path: Path) -> dict[str, Any]:
    """The key as results.json shows it: settings in full, each prompt set as its row count
    and a digest of its prompts, seeds, guidance and sizes."""
    prompts = {name: {"rows": len(rows), "digest": hashlib.sha256(
        json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]}
        for name, rows in key["images"].items()}
    return {"file": str(path), **{k: v for k, v in key.items() if k != "images"},
            "prompts": prompts}


def mismatch(stored: dict, key: dict) -> str | None:
    """The first setting in which ``key`` differs from the ``stored`` one, or the first image
    both name but make differently; ``None`` when the folder's images fit ``key``."""
    from .leaderboard import first_difference

    settings = {k: v for k, v in key.items() if k != "images"}
    diff = first_difference({k: stored.get(k) for k in settings}, settings)
    if diff:
        return diff
    for name, rows in key["images"].items():
        old = stored.get("images", {}).get(name, {})
        for case, value in rows.items():
            if case in old and old[case] != value:
                return (f"{name}/{case}_0.png: prompt {old[case][0]!r} seed {old[case][1]} "
                        f"against prompt {value[0]!r} seed {value[1]}"
                        if old[case][:2] != value[:2] else
                        f"{name}/{case}_0.png: guidance and size {old[case][2:]} against "
                        f"{value[2:]}")
    return None


def check(folder: Path, key: dict, *, what: str, fix: str) -> None:
    """Refuse ``folder`` if it holds images that ``key`` would make differently."""
    folder = Path(folder)
    file = folder / KEY_FILE
    if file.is_file():
        try:
            stored = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {file}: {e}; {fix}") from None
        diff = mismatch(stored, key)
        if diff:
            raise ValueError(f"{what} {folder} holds images made with other settings ({diff}; "
                             f"the folder's value first): {fix}")
    elif folder.is_dir() and next(folder.rglob("*.png"), None) is not None:
        raise ValueError(f"{what} {folder} holds images but no {KEY_FILE} (made by an older "
                         f"receler, or by hand), so they may not fit these settings: {fix}")


def claim(folder: Path, key: dict, *, what: str, fix: str) -> dict:
    """:func:`check`, then record ``key``'s rows in the folder's key (atomically); returns
    the summary for results.json."""
    check(folder, key, what=what, fix=fix)
    file = Path(folder) / KEY_FILE
    stored = json.loads(file.read_text()) if file.is_file() else {}
    images = stored.get("images", {})
    for name, rows in key["images"].items():
        images[name] = {**images.get(name, {}), **rows}
    text = json.dumps({**key, "images": images}, indent=2) + "\n"
    atomic_write(file, lambda tmp: tmp.write_text(text))
    return summary(key, file)
