"""ComfyUI's prompt weights, written in A1111's syntax (pictor's): `(words)` is 1.1 and `(words:1.5)`
is 1.5 in both, but in ComfyUI a written weight replaces the outer ones, `[words]` is text and only
`\\(` / `\\)` are escapes. Kept apart from `pictor.comfy_workflow`, which reads the graph: this is
about one string, and ComfyUI's bracket reading is long enough to want its own page.
"""

from __future__ import annotations

import math
import re

from pictor.comfy_graph import ComfyGraphError, listed, shortened
from pictor.prompt_weights import MAX_WEIGHT

# A prompt's units, as ComfyUI's weight reading sees them (an escaped bracket is text).
_TEXT, _OPEN, _CLOSE = 0, 1, 2


def comfy_prompt_as_a1111(text: str, notices: list[str] | None = None, role: str = "prompt") -> str:
    """A prompt as ComfyUI's text encoders read its weights, written in A1111's syntax (pictor's).

    ComfyUI reads ``(words)`` as 1.1 and ``(words:1.5)`` as 1.5, and there an explicit weight replaces the
    outer ones; ``[words]``, an unclosed ``(`` and a backslash other than ``\\(`` / ``\\)`` are text. So
    each piece is written out with its weight, and its brackets and backslashes escaped: pictor then reads
    the same pieces with the same weights. A weight beyond pictor's [-10, 10] (``(red:12)``, or 26
    brackets deep) is taken as 10 (or -10), said in `notices`; one that is not a number (``(red:inf)``,
    ``(red:nan)``, which ComfyUI reads too) is a ComfyGraphError. Linear in the prompt's length, at any
    depth of brackets (`_comfy_weights`).
    """
    chars, weights = _comfy_weights(text)
    written: list[str] = []
    beyond: list[str] = []
    run: list[str] = []
    run_weight: float | None = None

    def flush() -> None:
        if not run or run_weight is None:
            return
        piece, weight = "".join(run), run_weight
        if not math.isfinite(weight):
            raise ComfyGraphError(f"its {role} weighs '{shortened(piece)}' {weight}, not a finite weight")
        if abs(weight) > MAX_WEIGHT:
            beyond.append(f"{shortened(piece)!r} {weight:g}")
            weight = math.copysign(MAX_WEIGHT, weight)
        plain = re.sub(r"([\\()\[\]])", r"\\\1", piece)
        written.append(plain if weight == 1.0 else f"({plain}:{_weight_text(weight)})")

    for char, weight in zip(chars, weights, strict=True):
        if weight is None:  # a group's brackets, and its ":weight"
            continue
        if weight != run_weight and not (  # nan != nan: a nan piece is one run too
            math.isnan(weight) and run_weight is not None and math.isnan(run_weight)
        ):
            flush()
            run, run_weight = [], weight
        run.append(char)
    flush()
    if beyond and notices is not None:
        notices.append(
            f"the {role} weighs {listed(beyond, 'pieces')} in ComfyUI, beyond pictor's [-{MAX_WEIGHT:g}, "
            f"{MAX_WEIGHT:g}]: taken as {MAX_WEIGHT:g} (or -{MAX_WEIGHT:g})"
        )
    return "".join(written)


def _comfy_weights(text: str) -> tuple[list[str], list[float | None]]:
    """ComfyUI's reading of prompt weights (its `token_weights`), as each character's weight (None for the
    brackets and ``:weight`` it takes out), in one pass however deep the brackets nest.

    ComfyUI cuts a text into top-level runs and ``( )`` groups (a ``)`` with nothing open is text, an
    unclosed group runs to the end), reads each group's inside again at 1.1 times the weight, or, where it
    ends in ``:number`` after its first character, at that number, and keeps everything else at the weight.
    Read again and again, that is quadratic in the depth; here brackets are matched once, and each group is
    read once: inside a closed group the matched pairs are the groups; an unclosed one, cut short at its
    last ``)``, holds matched pairs and, from its first bracket left open, the next unclosed one. ``\\(``
    and ``\\)`` are text (ComfyUI's escapes); every other character is itself.
    """
    chars: list[str] = []
    kinds: list[int] = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 2] in ("(", ")"):
            chars.append(text[i + 1])
            kinds.append(_TEXT)
            i += 2
            continue
        chars.append(text[i])
        kinds.append(_OPEN if text[i] == "(" else _CLOSE if text[i] == ")" else _TEXT)
        i += 1
    n = len(chars)
    match = [-1] * n  # each ( 's ), matched as a stack matches them (a ) with nothing open matches none)
    opened: list[int] = []
    for i, kind in enumerate(kinds):
        if kind == _OPEN:
            opened.append(i)
        elif kind == _CLOSE and opened:
            match[opened.pop()] = i
    last_colon = [-1] * n  # the last ":" at or before each place
    next_bracket = [n] * (n + 1)  # the first bracket at or after each place
    for i in range(n):
        last_colon[i] = i if chars[i] == ":" and kinds[i] == _TEXT else last_colon[i - 1] if i else -1
    for i in range(n - 1, -1, -1):
        next_bracket[i] = i if kinds[i] != _TEXT else next_bracket[i + 1]
    weights: list[float | None] = [None] * n
    groups: list[tuple[int, int, float]] = []  # (its "(", its ")", the weight around it), to read

    def cut(start: int, end: int, weight: float) -> None:
        """ComfyUI's cut of the inside start..end (no ")" at its top level): its runs are weighed and its
        groups queued; an unclosed group runs to the end, a group where it ends in ")", else text."""
        i = start
        while i < end:
            if kinds[i] != _OPEN:
                j = max(i + 1, min(next_bracket[i], end))
                weights[i:j] = [weight] * (j - i)
                i = j
            elif i < match[i] < end:
                groups.append((i, match[i], weight))
                i = match[i] + 1
            else:
                if end - i >= 2 and kinds[end - 1] == _CLOSE:
                    groups.append((i, end - 1, weight))
                else:
                    weights[i:end] = [weight] * (end - i)
                i = end

    depth, start = 0, 0  # the top level, cut as ComfyUI cuts it (a ")" with nothing open is text)
    for i, kind in enumerate(kinds):
        if kind == _OPEN:
            if depth == 0:
                weights[start:i] = [1.0] * (i - start)
                start = i
            depth += 1
        elif kind == _CLOSE:
            depth -= 1
            if depth == 0:
                groups.append((start, i, 1.0))
                start = i + 1
    if start < n and kinds[start] == _OPEN:  # a group left open at the end: read as any inside's end is
        cut(start, n, 1.0)
    elif start < n:  # text (a ")" with nothing open makes the rest of the run text, brackets and all)
        weights[start:n] = [1.0] * (n - start)
    while groups:
        opening, closing, weight = groups.pop()
        inner, end = weight * 1.1, closing
        colon = last_colon[closing - 1]
        if colon > opening + 1 and next_bracket[colon + 1] >= closing:  # ComfyUI: "(text:number)"
            number = _python_float("".join(chars[colon + 1 : closing]))
            if number is not None:  # else "(a:b)": text weighed 1.1
                inner, end = number, colon
        cut(opening + 1, end, inner)
    return chars, weights


def _python_float(text: str) -> float | None:
    """`text` as float() reads it, as ComfyUI reads a weight ("1.5", " 2 ", "1e1", "inf"), else None."""
    try:
        return float(text)
    except ValueError:
        return None


def _weight_text(weight: float) -> str:
    """A weight as pictor's parser reads it: digits and a dot (no exponent), to 4 places."""
    return f"{weight:.4f}".rstrip("0").rstrip(".") or "0"
