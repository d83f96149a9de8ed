"""Prompt weights in A1111's syntax: ``(words)`` weighs them 1.1, ``((words))`` 1.21, ``[words]`` 1/1.1,
``(words:1.5)`` 1.5; brackets nest and multiply; ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are those
characters, and any other backslash is dropped, as A1111 drops it. ComfyUI's own syntax differs: there an
explicit weight replaces the outer ones (``((red:1.5))`` is 1.5, here 1.65), ``[words]`` and an unclosed
``(`` are text. A1111's prompt editing (``[a:b:0.5]``), alternation (``[a|b]``), ``AND`` and ``BREAK`` are
not read: they are text (inside ``[ ]`` weighed 1/1.1).

The syntax is read only when a request asks for it (`prompt_weights`), as A1111 reads it always: a bracket
without its partner is text (a ``)`` or ``]``), or, for an opening one, weighs the rest of the prompt, as
A1111 does, so prompts written for it read the same; ``(style: ink)`` is text weighed 1.1, as there. A
weight of digits and dots that is not a number (``1.2.3``), or is written outside [-MAX_WEIGHT, MAX_WEIGHT],
is an error that says where it is (nesting multiplies written weights, and that is not bounded).

The parse gives the prompt as the text encoder reads it (the brackets and weights taken out) and its
pieces with their weights; `pictor.models.text_encoder.TextEncoder.encode_weighted` weighs each token's
state by the piece it comes from. Pure Python; no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

ROUND = 1.1  # A1111's multiplier for ( )
SQUARE = 1 / 1.1  # and for [ ]
MAX_WEIGHT = 10.0

# One match per meaningful part, in A1111's order: escapes, brackets, a ":weight)" close, plain runs.
_PARTS = re.compile(
    r"""
    \\[()\[\]\\]          # an escaped bracket or backslash
    | \\                  # any other backslash: dropped, as A1111 drops it
    | \(                  # open round
    | \[                  # open square
    | :\s*([+-]?[.\d]+)\s*\)   # ":1.5)": closes a round bracket with its weight
    | \)                  # close round
    | \]                  # close square
    | [^\\()\[\]:]+       # text
    | :                   # a colon that closes nothing: text
    """,
    re.VERBOSE,
)
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)$")


class PromptWeightError(ValueError):
    """A prompt whose weights cannot be read; the message says where and what to write instead."""


@dataclass(frozen=True)
class WeightedPrompt:
    """A prompt read for its weights: the text the encoder reads and its pieces, each with its weight."""

    text: str
    pieces: tuple[tuple[str, float], ...]  # (text, weight); their texts joined are `text`

    @property
    def weighted(self) -> bool:
        """Whether any piece weighs other than 1 (if none does, the prompt encodes as plain text)."""
        return any(w != 1.0 for _, w in self.pieces)


def parse_weights(prompt: str) -> WeightedPrompt:
    """``"a (red:1.5) circle"`` -> text ``"a red circle"``, pieces ``("a ", 1.0), ("red", 1.5), (" circle",
    1.0)``; neighbouring pieces of one weight are merged."""
    pieces: list[list[object]] = []  # [text, weight]
    round_open: list[int] = []  # where in `pieces` each open bracket started
    square_open: list[int] = []

    def weigh(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] = float(piece[1]) * factor  # type: ignore[arg-type]

    for match in _PARTS.finditer(prompt):
        part, weight = match.group(0), match.group(1)
        if part.startswith("\\"):  # A1111 keeps what follows the backslash: nothing for a lone one
            pieces.append([part[1:], 1.0])
        elif part == "(":
            round_open.append(len(pieces))
        elif part == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            weigh(round_open.pop(), _weight(weight, match.start(1) + 1))
        elif part == ")" and round_open:
            weigh(round_open.pop(), ROUND)
        elif part == "]" and square_open:
            weigh(square_open.pop(), SQUARE)
        else:  # text, or a bracket that closes nothing (a ":1.5)" without its "(" stays as written)
            pieces.append([part, 1.0])
    for start in round_open:  # A1111: an unclosed bracket weighs the rest of the prompt
        weigh(start, ROUND)
    for start in square_open:
        weigh(start, SQUARE)
    merged: list[tuple[str, float]] = []
    for text, w in pieces:
        if not text:
            continue
        if merged and merged[-1][1] == w:
            merged[-1] = (merged[-1][0] + str(text), float(w))  # type: ignore[arg-type]
        else:
            merged.append((str(text), float(w)))  # type: ignore[arg-type]
    return WeightedPrompt("".join(t for t, _ in merged), tuple(merged))


def _weight(text: str, at: int) -> float:
    """A ``(words:W)`` weight; errors say where in the prompt it is (`at`: its first character, from 1)."""
    if not _NUMBER.match(text):
        raise PromptWeightError(
            f"prompt weight '{text}' at character {at} is not a number: write it as (words:1.2), or escape "
            "the brackets (\\( \\)) for text"
        )
    value = float(text)
    if not (math.isfinite(value) and -MAX_WEIGHT <= value <= MAX_WEIGHT):
        raise PromptWeightError(
            f"prompt weight {text} at character {at} is outside [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]; use a "
            "smaller one (1.1 to 1.5 is a strong emphasis)"
        )
    return value


def plain_text(prompt: str, weighted: bool) -> str:
    """What the text encoder reads of `prompt`: without its weight syntax when `weighted`."""
    return parse_weights(prompt).text if weighted else prompt
