"""Training captions for the shapes world: many sentence templates over the benchmark's vocabulary.

The benchmark (shapes-dev.jsonl) uses exactly five sentence forms, with C a colour, S a shape and N a
count word:

    "a C S"                      (single_object, colors)
    "a photo of a C S"           (single_object)
    "N C S"                      (counting, N in two..four, S plural)
    "a C S and a C S"            (two_object, color_attr)
    "a C S {left of|right of|above|below} a C S"   (position)

No template here produces one of those forms (tests/data/test_shapes.py checks thousands of draws), so a
model scored on the benchmark has to generalize from the words, not recall one template.
"""

from __future__ import annotations

import numpy as np

from pictor.data.shapes_render import COUNT_WORDS, PLURALS


def _pick(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def noun_phrase(obj: dict, rng: np.random.Generator, alone: bool = True) -> str:
    """'a red circle', 'one red circle', 'three red stars', 'two stars, both red'... for one group;
    the comma forms only when the group is the whole list (`alone`), where they cannot be misread."""
    shape, color, n = obj["shape"], obj["color"], int(obj.get("count", 1))
    if n == 1:
        # The benchmark writes "a orange circle"; training sees both that and the grammatical "an".
        a = "an" if color[0] in "aeiou" and rng.random() < 0.5 else "a"
        return _pick(
            rng,
            [
                f"{a} {color} {shape}",
                f"{a} {color} {shape}",
                f"one {color} {shape}",
                f"a single {color} {shape}",
                f"a {shape} colored {color}",
                f"{a} {color} colored {shape}",
            ],
        )
    word, plural = COUNT_WORDS[n], PLURALS[shape]
    forms = [
        f"{word} {color} {plural}",
        f"{word} {color} {plural}",
        f"{word} {plural} colored {color}",
        f"exactly {word} {color} {plural}",
    ]
    if alone:
        forms.append(f"two {plural}, both {color}" if n == 2 else f"{word} {plural}, all {color}")
    return _pick(rng, forms)


def _join(phrases: list[str], rng: np.random.Generator) -> str:
    if len(phrases) == 1:
        return phrases[0]
    if len(phrases) == 2:
        a, b = phrases
        return _pick(
            rng,
            [
                f"{a} and {b}",
                f"{a}, {b}",
                f"{a} with {b}",
                f"{a} plus {b}",
                f"{a} as well as {b}",
                f"both {a} and {b}",
                f"{a} and also {b}",
            ],
        )
    head = ", ".join(phrases[:-1])
    return _pick(rng, [f"{head} and {phrases[-1]}", f"{head}, and {phrases[-1]}", ", ".join(phrases)])


def _frame(body: str, plural: bool, rng: np.random.Generator, bg: str | None = None) -> str:
    """Wrap an object list in a sentence; never bare, so the benchmark's forms cannot appear."""
    if bg:
        return _pick(rng, [f"{body} on a {bg} background", f"a {bg} background with {body}"])
    frames = [
        f"an image of {body}",
        f"a picture of {body}",
        f"a drawing of {body}",
        f"a photo showing {body}",
        f"a photo with {body}",
        f"a simple scene with {body}",
        f"a scene containing {body}",
        f"{body} on a plain background",
        f"{body}, nothing else",
        f"flat shapes: {body}",
        f"there {'are' if plural else 'is'} {body}",
        f"{body} in the picture",
    ]
    return _pick(rng, frames)


_REL_PHRASES: dict[str, list[str]] = {
    "left of": ["to the left of", "on the left of", "on the left side of", "left of"],
    "right of": ["to the right of", "on the right of", "on the right side of", "right of"],
    "above": ["above", "over", "higher than", "further up than"],
    "below": ["below", "under", "beneath", "underneath", "lower than"],
}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# "with X <rel> it" needs phrasings that read well with a pronoun object.
_REL_IT: dict[str, list[str]] = {
    "left of": ["to its left", "on its left", "to the left of it"],
    "right of": ["to its right", "on its right", "to the right of it"],
    "above": ["above it", "over it"],
    "below": ["below it", "under it", "beneath it"],
}


def _definite(obj: dict) -> str:
    return f"the {obj['color']} {obj['shape']}"


def _relation_caption(a: dict, b: dict, rel: str, rng: np.random.Generator) -> str:
    na, nb = noun_phrase(a, rng), noun_phrase(b, rng)
    r = _pick(rng, _REL_PHRASES[rel])
    inv = _pick(rng, _REL_PHRASES[_INVERSE[rel]])
    templates = [
        f"{na} is {r} {nb}",
        f"{na} sits {r} {nb}",
        f"{na} placed {r} {nb}",
        f"{nb} with {na} {_pick(rng, _REL_IT[rel])}",
        f"{nb} is {inv} {na}",
        f"{r} {nb}, {na}",
        f"{r} {nb} there is {na}",
        f"{_definite(a)} is {r} {_definite(b)}",
        f"{na} and {nb}, {_definite(a)} {r} {_definite(b)}",
        f"an image of {na} {r} {nb}",
        f"a picture with {na} {r} {nb}",
    ]
    # The bare "<np> <rel> <np>" is the benchmark's form; only the longer phrasings may go bare.
    if r.startswith(("to ", "on ", "higher", "further", "lower")):
        templates.append(f"{na} {r} {nb}")
    return _pick(rng, templates)


def caption(spec: dict, rng: np.random.Generator) -> str:
    """A training caption for a scene spec (benchmark JSON format, optional 'background' name)."""
    objects = spec["objects"]
    rel = spec.get("relation")
    bg = spec.get("background") if rng.random() < 0.25 else None
    if rel:
        text = _relation_caption(objects[rel["a"]], objects[rel["b"]], rel["rel"], rng)
        if bg:
            text = f"{text}, {bg} background"
    else:
        order = rng.permutation(len(objects)) if len(objects) > 1 else [0]
        phrases = [noun_phrase(objects[i], rng, alone=len(objects) == 1) for i in order]
        plural = int(objects[order[0]].get("count", 1)) > 1
        body = _join(phrases, rng)
        if len(objects) == 1 and not plural and not bg and rng.random() < 0.15:
            # A bare noun phrase, but in forms the benchmark does not use ("a single red star").
            obj = objects[0]
            text = _pick(rng, [f"a single {obj['color']} {obj['shape']}", f"{obj['color']} {obj['shape']}"])
        else:
            text = _frame(body, plural, rng, bg)
    if rng.random() < 0.2:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.2:
        text += "."
    return text
