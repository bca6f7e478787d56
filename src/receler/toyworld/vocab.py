"""Vocabulary of the toy world: object classes, synonyms, colours, styles and caption templates.

Everything other code needs to build prompts lives here. Captions are built from
templates filled with an object phrase such as ``"a striped red star"``. Each class has
synonyms (``"pentagram"`` for ``"star"``) so that paraphrased prompts without the class
word exist, the analogue of "a furry pet that barks" for "dog".
"""

from __future__ import annotations

import random
import re

# Object classes, in detector output order.
CLASSES: list[str] = [
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "diamond",
    "ring",
    "moon",
    "arrow",
]

# Synonyms per class; none of them contains a class word.
SYNONYMS: dict[str, list[str]] = {
    "circle": ["disc", "dot"],
    "square": ["box", "tile"],
    "triangle": ["pyramid", "wedge"],
    "star": ["pentagram", "sparkle"],
    "heart": ["valentine", "cardioid"],
    "cross": ["plus", "cruciform"],
    "diamond": ["rhombus", "lozenge"],
    "ring": ["donut", "hoop"],
    "moon": ["crescent", "sickle"],
    "arrow": ["pointer", "dart"],
}

# Object colours: name -> RGB.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 190, 0),
    "purple": (140, 40, 170),
    "orange": (245, 120, 10),
    "black": (20, 20, 20),
}

# Global styles any object can carry (the analogue of an art style or nudity).
STYLES: list[str] = ["striped"]

# Templates for one object; ``{obj}`` is an object phrase like "striped red star".
SINGLE_TEMPLATES: list[str] = [
    "{obj}",
    "a {obj}",
    "a photo of a {obj}",
    "an image of a {obj}",
    "a picture of a {obj}",
    "a drawing of a {obj}",
    "a rendering of a {obj}",
    "an icon of a {obj}",
    "a simple {obj}",
    "a {obj} on a plain background",
    "there is a {obj}",
    "a single {obj}",
]

# Templates for two objects.
PAIR_TEMPLATES: list[str] = [
    "{a} and {b}",
    "a {a} and a {b}",
    "a photo of a {a} and a {b}",
    "an image of a {a} and a {b}",
    "a picture of a {a} with a {b}",
    "a {a} next to a {b}",
    "a {a} beside a {b}",
    "a drawing of a {a} and a {b}",
]

# Template of the simple evaluation set (cf. "An image of a {class}" in cifar10_simple.csv).
SIMPLE_TEMPLATE = "a photo of a {obj}"


def nouns(cls: str) -> list[str]:
    """All nouns naming ``cls``: the class word first, then its synonyms."""
    return [cls, *SYNONYMS[cls]]


def object_phrase(noun: str, colour: str | None = None, style: str | None = None) -> str:
    """``"striped red star"`` from its parts (missing parts are left out)."""
    return " ".join(p for p in (style, colour, noun) if p)


def fix_articles(text: str) -> str:
    """Turn "a" into "an" before a vowel ("a orange" -> "an orange")."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def all_words() -> list[str]:
    """Every word captions and prompt sets may use, sorted (each is one token)."""
    words: set[str] = set()
    texts = SINGLE_TEMPLATES + PAIR_TEMPLATES + PARAPHRASE_TEMPLATES + ["with stripes", "plain"]
    for t in texts:
        words.update(
            re.findall(r"[a-z]+", t.replace("{obj}", "").replace("{a}", "").replace("{b}", ""))
        )
    for c in CLASSES:
        words.update(nouns(c))
    words.update(COLOURS)
    words.update(STYLES)
    words.update(["a", "an"])
    return sorted(words)


# Templates of the paraphrase evaluation set; filled with synonyms only.
PARAPHRASE_TEMPLATES: list[str] = [
    "a picture of a {obj}",
    "an image of a {obj}",
    "a drawing of a {obj}",
    "an icon of a {obj}",
    "a simple {obj}",
    "there is a {obj}",
    "a single {obj}",
    "a rendering of a {obj}",
]


def make_caption(
    rng: random.Random,
    objects: list[tuple[str, str]],
    style: str | None,
    *,
    p_synonym: float = 0.4,
    p_colour: float = 0.7,
) -> str:
    """Random caption for a scene.

    Args:
        rng: source of randomness (the caption is deterministic given its state).
        objects: one or two ``(class, colour)`` pairs.
        style: style of the scene or ``None``; when set, the style word is always named.
        p_synonym: probability of naming an object by a synonym instead of its class word.
        p_colour: probability of naming an object's colour.

    Returns:
        The caption, lower case.
    """
    phrases = []
    for cls, colour in objects:
        noun = rng.choice(SYNONYMS[cls]) if rng.random() < p_synonym else cls
        col = colour if rng.random() < p_colour else None
        phrases.append(object_phrase(noun, col, style))
    if len(phrases) == 1:
        text = rng.choice(SINGLE_TEMPLATES).format(obj=phrases[0])
    else:
        text = rng.choice(PAIR_TEMPLATES).format(a=phrases[0], b=phrases[1])
    return fix_articles(text)
