"""GenEval's conventions, shared by the shapes world (to make captions true) and the
GenEval benchmark (to generate prompts and score images): colours, relations, number
words, the article and plural rules, and the relative-position rule.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

GENEVAL_COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
GENEVAL_TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBER_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
)
POSITION_THRESHOLD = 0.1  # the official evaluator shrinks offsets by 0.1 x (dimA + dimB)


def with_article(word: str) -> str:
    """'an' before a lower-case vowel letter, else 'a' (the official rule, no phonetics)."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(word: str) -> str:
    """'es' after a final 's', else 's' (the official rule: cross -> crosses, skis -> skises)."""
    return f"{word}es" if word.endswith("s") else f"{word}s"


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD) -> list[str]:
    """Relations of box A to box B (x0, y0, x1, y1; y down), in the order of RELATIONS.

    offset = centre_A - centre_B; per axis the offset shrinks towards 0 by
    threshold * (size_A + size_B) (never past 0); if both shrunk components are < 1e-3 no
    relation holds; otherwise (dx, dy) = shrunk / |offset| and each component beyond
    +-0.5 gives a relation, so a diagonal offset can give two.
    """
    a = np.asarray(box_a[:4], dtype=np.float64).reshape(2, 2)
    b = np.asarray(box_b[:4], dtype=np.float64).reshape(2, 2)
    offset = a.mean(axis=0) - b.mean(axis=0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return []
    dx, dy = revised / np.linalg.norm(offset)
    holds = (dx < -0.5, dx > 0.5, dy < -0.5, dy > 0.5)
    return [r for r, h in zip(RELATIONS, holds) if h]
