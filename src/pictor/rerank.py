"""Best-of-N: generate N candidates, score each with a scorer, return them best first.

A scorer is any callable (image, prompt) -> float, higher is better; SCORERS names the built-in ones so the
CLI and the server can pick one by name. Register more by adding to the dict (CLIP score, an aesthetic
model, a human in the loop...).

The built-in "shapes" scorer is for models of the shapes world (benchmarks/SHAPES.md). Turning an arbitrary
prompt into a benchmark spec is not possible in general, so it asks a simpler question: how many of the
objects found by `pictor.eval.shapes.detect_objects` have a (colour, shape) pair that the prompt names?
The prompt is split into phrases at "and", at commas followed by a new article, and at the relation words
(left of, right of, above, below); every colour and shape word of one phrase pair up ("two stars, both red"
names (red, star)). Counts and relations are not checked, and an extra matching object scores one more:
it ranks candidates by "the named things are there", which is what a sample of a weak model most often
gets wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace

import numpy as np
from PIL import Image

from pictor.data.shapes import PALETTE, SHAPES
from pictor.eval.shapes import detect_objects
from pictor.pipeline import GeneratedImage, GenerationError, GenerationRequest, Pipeline, ProgressFn

Scorer = Callable[[Image.Image, str], float]

_RELATION_WORDS = {"and", "left", "right", "above", "below", "of"}
_PLURALS = {shape + "s": shape for shape in SHAPES}
# Words that start a new noun phrase after a comma ("a red circle, a blue star" vs "two stars, both red").
_OPENERS = {"a", "an", "the", "one", "two", "three", "four"}


def prompt_pairs(prompt: str) -> set[tuple[str, str]]:
    """The (colour, shape) pairs a shapes-world prompt names, e.g. {("red", "circle"), ("blue", "square")}."""
    pairs: set[tuple[str, str]] = set()
    colors: set[str] = set()
    shapes: set[str] = set()

    def close() -> None:
        pairs.update((c, s) for c in colors for s in shapes)
        colors.clear()
        shapes.clear()

    words = re.findall(r"[a-z]+|,", prompt.lower())
    for k, word in enumerate(words):
        if word in _RELATION_WORDS or (word == "," and k + 1 < len(words) and words[k + 1] in _OPENERS):
            close()
        elif word in PALETTE:
            colors.add(word)
        elif word in SHAPES or word in _PLURALS:
            shapes.add(_PLURALS.get(word, word))
    close()
    return pairs


def shapes_scorer(image: Image.Image, prompt: str) -> float:
    """Number of detected objects whose (colour, shape) the prompt names (see the module doc)."""
    wanted = prompt_pairs(prompt)
    found = detect_objects(np.asarray(image.convert("RGB")))
    return float(sum((d.color, d.shape) in wanted for d in found if d.shape is not None))


SCORERS: dict[str, Scorer] = {"shapes": shapes_scorer}


def get_scorer(name: str) -> Scorer:
    try:
        return SCORERS[name]
    except KeyError:
        raise GenerationError(
            f"unknown scorer '{name}'; choose one of {', '.join(sorted(SCORERS))}"
        ) from None


def generate_best_of(
    pipe: Pipeline,
    request: GenerationRequest,
    n: int,
    scorer: Scorer | str = "shapes",
    progress: ProgressFn | None = None,
) -> list[GeneratedImage]:
    """Generate n candidates (seeds seed .. seed + n - 1; with a variation strength, the seed's variations
    of variation seeds v .. v + n - 1) and return them sorted best first.

    Each record gets "best_of": {"n", "rank" (1 = best), "score", "scorer"}; the rest of the record is the
    plain generation record, so `reproduce` still regenerates each candidate. Ties keep seed order.
    """
    if n < 1:
        raise GenerationError(f"best-of needs n >= 1 candidates, got {n}")
    name = scorer if isinstance(scorer, str) else getattr(scorer, "__name__", type(scorer).__name__)
    score = get_scorer(scorer) if isinstance(scorer, str) else scorer
    images = pipe.generate(replace(request, num_images=n), progress=progress)
    scored = [(float(score(g.image, g.record["prompt"])), i) for i, g in enumerate(images)]
    scored.sort(key=lambda si: (-si[0], si[1]))
    ranked: list[GeneratedImage] = []
    for rank, (value, i) in enumerate(scored, start=1):
        g = images[i]
        g.record["best_of"] = {"n": n, "rank": rank, "score": value, "scorer": name}
        ranked.append(g)
    return ranked
