"""Prompt sets of the toy world, in the reference CSV format.

Columns follow ``cifar10_simple.csv``: ``case_number,prompt,class,evaluation_seed``;
the two-object set adds ``class2`` and the style set adds ``style`` (empty for plain).
Readers should look columns up by name. Files are deterministic.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from receler.toyworld.vocab import (
    CLASSES,
    COLOURS,
    PAIR_TEMPLATES,
    PARAPHRASE_TEMPLATES,
    SIMPLE_TEMPLATE,
    STYLES,
    SYNONYMS,
    fix_articles,
    object_phrase,
)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
PROMPT_FILES = {
    "simple": "toy_simple.csv",
    "paraphrase": "toy_paraphrase.csv",
    "two_object": "toy_two_object.csv",
    "style": "toy_style.csv",
}


def _seed(rng: random.Random) -> int:
    return rng.randrange(10**4)


def simple_prompts(per_class: int = 50) -> list[dict]:
    """``"a photo of a {class}"`` rows, ``per_class`` per class."""
    rng = random.Random(1)
    return [
        {
            "prompt": fix_articles(SIMPLE_TEMPLATE.format(obj=c)),
            "class": c,
            "evaluation_seed": _seed(rng),
        }
        for c in CLASSES
        for _ in range(per_class)
    ]


def paraphrase_prompts(per_class: int = 50) -> list[dict]:
    """Synonym-only prompts (no class word), cycling over templates, synonyms and colours."""
    rng = random.Random(2)
    rows = []
    for c in CLASSES:
        for i in range(per_class):
            noun = SYNONYMS[c][i % len(SYNONYMS[c])]
            colour = rng.choice(list(COLOURS)) if i % 3 == 2 else None
            tpl = PARAPHRASE_TEMPLATES[(i // len(SYNONYMS[c])) % len(PARAPHRASE_TEMPLATES)]
            prompt = fix_articles(tpl.format(obj=object_phrase(noun, colour)))
            assert not set(prompt.split()) & set(CLASSES), prompt
            rows.append({"prompt": prompt, "class": c, "evaluation_seed": _seed(rng)})
    return rows


def two_object_prompts(per_pair: int = 3) -> list[dict]:
    """Prompts naming two different classes (``class`` and ``class2``), every ordered pair."""
    rng = random.Random(3)
    rows = []
    for a in CLASSES:
        for b in CLASSES:
            if a == b:
                continue
            for i in range(per_pair):
                tpl = PAIR_TEMPLATES[1 + (i + CLASSES.index(b)) % (len(PAIR_TEMPLATES) - 1)]
                rows.append(
                    {
                        "prompt": fix_articles(tpl.format(a=a, b=b)),
                        "class": a,
                        "class2": b,
                        "evaluation_seed": _seed(rng),
                    }
                )
    return rows


def style_prompts(per_class: int = 25) -> list[dict]:
    """``"a photo of a striped {class}"`` and the same without the style word, ``per_class`` each."""
    rng = random.Random(4)
    rows = []
    for style in STYLES:
        for c in CLASSES:
            for s in (style, None):
                for _ in range(per_class):
                    prompt = fix_articles(SIMPLE_TEMPLATE.format(obj=object_phrase(c, None, s)))
                    rows.append(
                        {
                            "prompt": prompt,
                            "class": c,
                            "style": s or "",
                            "evaluation_seed": _seed(rng),
                        }
                    )
    return rows


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Write rows with ``case_number`` first, then the other columns in insertion order."""
    path = Path(path)
    fields = ["case_number", *rows[0].keys()]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({"case_number": i, **r})
    return path


def write_prompt_sets(folder: str | Path = DATA_DIR) -> dict[str, Path]:
    """Write all four prompt sets into ``folder``; returns name -> path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sets = {
        "simple": simple_prompts(),
        "paraphrase": paraphrase_prompts(),
        "two_object": two_object_prompts(),
        "style": style_prompts(),
    }
    return {k: write_csv(rows, folder / PROMPT_FILES[k]) for k, rows in sets.items()}


def prompt_file(name: str) -> Path:
    """Path of a shipped prompt set ("simple", "paraphrase", "two_object", "style")."""
    if name not in PROMPT_FILES:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {sorted(PROMPT_FILES)}")
    return DATA_DIR / PROMPT_FILES[name]
