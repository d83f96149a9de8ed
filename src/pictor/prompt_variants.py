"""Prompt variants and prompt files for `pictor generate` (as A1111's Dynamic Prompts extension and
ComfyUI's wildcard nodes give them): pure text work, no torch.

Syntax, read only when variants are asked for (a prompt with braces is otherwise left as it is):

- ``{red|green|blue}`` one of the options; options may nest (``{a {big|small}|the} circle``) and be empty
  (``{|very }red``); ``{2::red|blue}`` weighs an option (default 1; weights count only for random draws);
- ``__colours__`` one line of the wildcard file ``colours.txt`` (``__people/names__``: ``people/names.txt``)
  in the wildcard folder; its lines may hold variants and wildcards themselves;
- ``\\{``, ``\\|``, ``\\}``, ``\\_`` and ``\\\\`` are the characters themselves; any other backslash stays.

A template is parsed (`parse_template`), its wildcards replaced by their files' lines (`link`), and then
either drawn from (`pick`, one variant) or expanded (`expand_all`, every combination, in a stable order).
`plan_runs` does all of it for a list of prompts and says which requests `generate` runs.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from random import Random

MODES = ("random", "all")
# `--variants all` refuses more prompts than this (every one is generated -n times).
MAX_COMBINATIONS = 1000
# Braces inside braces plus wildcards inside wildcards: deeper than this is a mistake, not a prompt.
MAX_DEPTH = 24
# A resolved text longer than this (characters plus the pieces it is built from) is refused before it is
# built: wildcards that use each other several times multiply, and a text encoder reads ~2,000 characters
# at most (T5's 512 tokens).
MAX_TEXT_SIZE = 20_000
# Counts are kept below this, so a template of thousands of braces is refused with a number, not a
# 4,000-digit one.
_COUNT_CEILING = 10**15

_ESCAPABLE = "{}|_\\"
_WILDCARD = re.compile(r"__([^\W_][\w\-./]*?)__")
_WEIGHT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)::")


class VariantError(ValueError):
    """A prompt template, wildcard file or prompt file that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Choice:
    """``{a|b|c}``: one of the options (each a sequence of nodes), drawn with these weights."""

    options: tuple[Template, ...]
    weights: tuple[float, ...]


@dataclass(frozen=True)
class Wildcard:
    """``__name__``: one line of the wildcard file name.txt (`link` replaces it by a `Choice`)."""

    name: str


Node = Text | Choice | Wildcard
Template = tuple[Node, ...]


def _excerpt(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Parser:
    """Recursive descent over one text; `where` names it in errors (e.g. "the prompt 'a {red'")."""

    def __init__(self, text: str, where: str) -> None:
        self.text = text
        self.where = where
        self.i = 0

    def fail(self, problem: str) -> VariantError:
        return VariantError(f"{self.where}: {problem}")

    def sequence(self, depth: int, inside: bool) -> Template:
        text, nodes, chars = self.text, [], []

        def flush() -> None:
            if chars:
                nodes.append(Text("".join(chars)))
                chars.clear()

        while self.i < len(text):
            c = text[self.i]
            if c == "\\" and self.i + 1 < len(text) and text[self.i + 1] in _ESCAPABLE:
                chars.append(text[self.i + 1])
                self.i += 2
            elif c == "{":
                flush()
                self.i += 1
                nodes.append(self.choice(depth + 1))
            elif c == "}" and not inside:
                raise self.fail(
                    f"'}}' at character {self.i + 1} closes no '{{'; remove it or write a literal brace "
                    "as \\}"
                )
            elif c in "|}" and inside:
                break
            elif c == "_" and (m := _WILDCARD.match(text, self.i)):
                flush()
                nodes.append(Wildcard(m.group(1)))
                self.i = m.end()
            else:
                chars.append(c)
                self.i += 1
        flush()
        return tuple(nodes)

    def choice(self, depth: int) -> Choice:
        start = self.i  # just after the '{'
        if depth > MAX_DEPTH:
            raise self.fail(f"braces nest deeper than {MAX_DEPTH} levels; flatten the template")
        options: list[Template] = []
        while True:
            options.append(self.sequence(depth, inside=True))
            if self.i >= len(self.text):
                raise self.fail(
                    f"the '{{' at character {start} is never closed; add '}}' or write a literal brace "
                    "as \\{"
                )
            closing = self.text[self.i] == "}"
            self.i += 1
            if closing:
                break
        weighted = [_weighted(option) for option in options]
        weights = tuple(w for w, _ in weighted)
        if not math.isfinite(sum(weights)):  # float('9' * 400) is inf: every draw would be the last option
            raise self.fail(f"the weights of the '{{' at character {start} are too large; use smaller ones")
        if not any(weights):
            raise self.fail(
                f"every option of the '{{' at character {start} weighs 0; give one a weight above 0"
            )
        return Choice(tuple(o for _, o in weighted), weights)


def _weighted(option: Template) -> tuple[float, Template]:
    """``2::red`` -> (2.0, ``red``); an option without a weight prefix weighs 1."""
    if option and isinstance(option[0], Text) and (m := _WEIGHT.match(option[0].text)):
        rest = option[0].text[m.end() :]
        return float(m.group(1)), ((Text(rest),) if rest else ()) + option[1:]
    return 1.0, option


def parse_template(text: str, where: str | None = None) -> Template:
    """The nodes of a prompt template; unbalanced braces are a `VariantError` naming `where` (default: the
    text itself) and the character."""
    parser = _Parser(text, where or f"the prompt '{_excerpt(text)}'")
    return parser.sequence(0, inside=False)


def read_lines(path: Path) -> list[str]:
    """A file's options: its lines, stripped, without blank lines and ``#`` comments."""
    return [line for _, line in numbered_lines(path)]


def numbered_lines(path: Path) -> list[tuple[int, str]]:
    """A file's options with their line numbers in the file: stripped, without blank lines and ``#``
    comments. A UTF-8 byte order mark (Notepad's) is dropped; only line breaks (\\n, \\r\\n, \\r) split
    lines, not the other characters `str.splitlines` splits at (U+2028, form feeds)."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise VariantError(f"{path} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    lines = ((k, line.strip()) for k, line in enumerate(re.split(r"\r\n|\n|\r", raw), 1))
    return [(k, line) for k, line in lines if line and not line.startswith("#")]


class WildcardFolder:
    """The wildcard files of `--wildcards DIR`: ``__name__`` is DIR/name.txt, read and parsed once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise VariantError(
                f"--wildcards {root}: no such folder; give the folder that holds the NAME.txt files"
            )
        self._cache: dict[str, tuple[Template, ...]] = {}

    def path(self, name: str) -> Path:
        parts = name.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise VariantError(
                f"wildcard __{name}__: a name is a path of folder and file names inside --wildcards, without "
                "'.', '..' or empty parts (e.g. __people/names__)"
            )
        return self.root.joinpath(*parts[:-1], f"{parts[-1]}.txt")

    def known(self, limit: int = 10) -> str:
        files = (p for p in self.root.rglob("*.txt") if p.is_file())
        names = sorted(p.relative_to(self.root).with_suffix("").as_posix() for p in files)
        shown = ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
        return f"it has {shown}" if names else "it has no .txt files"

    def options(self, name: str) -> tuple[Template, ...]:
        """The parsed lines of name.txt."""
        if name not in self._cache:
            path = self.path(name)
            if not path.is_file():
                raise VariantError(
                    f"unknown wildcard __{name}__: there is no {path.relative_to(self.root).as_posix()} in "
                    f"--wildcards {self.root} ({self.known()}); add the file or fix the name"
                )
            lines = numbered_lines(path)
            if not lines:
                raise VariantError(
                    f"wildcard file {path} has no options (only blank or # lines); put one option per line"
                )
            self._cache[name] = tuple(
                parse_template(line, f"{path} line {k} '{_excerpt(line)}'") for k, line in lines
            )
        return self._cache[name]


def link(template: Template, wildcards: WildcardFolder | None) -> Template:
    """The template with every ``__name__`` replaced by a choice among its file's lines (equally likely),
    recursively; a cycle of wildcards, nesting deeper than MAX_DEPTH, or a wildcard without a folder is a
    `VariantError`."""
    return _Linker(wildcards).sequence(template, (), 0)[0]


class _Linker:
    def __init__(self, wildcards: WildcardFolder | None) -> None:
        self.wildcards = wildcards
        self.done: dict[str, tuple[Choice, int]] = {}  # name -> (its choice, its nesting depth)

    def sequence(self, template: Template, chain: tuple[str, ...], depth: int) -> tuple[Template, int]:
        """(linked template, the deepest nesting below it)."""
        if depth > MAX_DEPTH:
            raise self.too_deep(chain)
        nodes, height = [], 0
        for node in template:
            if isinstance(node, Text):
                nodes.append(node)
                continue
            if isinstance(node, Choice):
                linked = [self.sequence(o, chain, depth + 1) for o in node.options]
                nodes.append(Choice(tuple(o for o, _ in linked), node.weights))
                below = 1 + max(h for _, h in linked)
            else:
                choice, below = self.wildcard(node.name, chain, depth)
                nodes.append(choice)
            if depth + below > MAX_DEPTH:  # a wildcard linked before, at a shallower place
                raise self.too_deep(chain)
            height = max(height, below)
        return tuple(nodes), height

    @staticmethod
    def too_deep(chain: tuple[str, ...]) -> VariantError:
        through = f" (through {' -> '.join(f'__{n}__' for n in chain)})" if chain else ""
        return VariantError(
            f"variants and wildcards nest deeper than {MAX_DEPTH} levels{through}; flatten them"
        )

    def wildcard(self, name: str, chain: tuple[str, ...], depth: int) -> tuple[Choice, int]:
        if self.wildcards is None:
            raise VariantError(
                f"__{name}__ is a wildcard: give the folder of {name}.txt with --wildcards DIR, or write the "
                f"underscores as \\_ to keep them"
            )
        if name in chain:
            loop = " -> ".join(f"__{n}__" for n in (*chain[chain.index(name) :], name))
            raise VariantError(f"wildcard cycle: {loop}; a wildcard file must not lead back to itself")
        if name not in self.done:
            lines = [self.sequence(t, (*chain, name), depth + 1) for t in self.wildcards.options(name)]
            choice = Choice(tuple(t for t, _ in lines), (1.0,) * len(lines))
            self.done[name] = (choice, 1 + max(h for _, h in lines))
        return self.done[name]


def count_combinations(template: Template) -> int:
    """How many texts `expand_all` gives at most (options of weight 0 left out), without making them;
    counts from 10^15 on are 10^15 (a template that large is refused anyway)."""
    memo: dict[int, int] = {}

    def seq(t: Template) -> int:
        n = 1
        for node in t:
            if isinstance(node, Choice):
                if id(node) not in memo:
                    options = (seq(o) for o, w in zip(node.options, node.weights, strict=True) if w)
                    memo[id(node)] = min(sum(options), _COUNT_CEILING)
                n = min(n * memo[id(node)], _COUNT_CEILING)
            elif isinstance(node, Wildcard):
                raise TypeError("count_combinations needs a linked template (see link)")
        return n

    return seq(template)


def largest_text(template: Template) -> int:
    """The most characters plus pieces a resolved text of a linked template can have, without making it
    (each choice its largest option): what drawing or expanding one text costs."""
    memo: dict[int, int] = {}

    def seq(t: Template) -> int:
        size = 0
        for node in t:
            if isinstance(node, Text):
                size += 1 + len(node.text)
            elif isinstance(node, Choice):
                if id(node) not in memo:
                    options = (seq(o) for o, w in zip(node.options, node.weights, strict=True) if w)
                    memo[id(node)] = min(max(options, default=0), _COUNT_CEILING)
                size = min(size + 1 + memo[id(node)], _COUNT_CEILING)
            else:
                raise TypeError("largest_text needs a linked template (see link)")
        return size

    return seq(template)


def _check_size(template: Template, what: str) -> None:
    size = largest_text(template)
    if size > MAX_TEXT_SIZE:
        shown = f"{size:,}" if size < _COUNT_CEILING else "more than 10^15"
        raise VariantError(
            f"{what} can resolve to a text of {shown} characters and pieces, more than {MAX_TEXT_SIZE:,}; "
            "shorten it (wildcards that use each other several times multiply: use each fewer times)"
        )


def expand_all(template: Template) -> list[str]:
    """Every text of a linked template, each once, in order: the options of a choice in their order, the
    first choice in the text varying slowest (as nested loops over the choices from left to right);
    options of weight 0 are left out."""

    def seq(t: Template) -> list[str]:
        texts = [""]
        for node in t:
            if isinstance(node, Text):
                texts = [s + node.text for s in texts]
            elif isinstance(node, Choice):
                tails = [x for o, w in zip(node.options, node.weights, strict=True) if w for x in seq(o)]
                texts = [s + tail for s in texts for tail in tails]
            else:
                raise TypeError("expand_all needs a linked template (see link)")
        return texts

    return list(dict.fromkeys(seq(template)))


def pick(template: Template, rng: Random) -> str:
    """One text of a linked template: each choice draws an option by weight from `rng` (one
    `rng.random()` per choice met, left to right)."""
    out: list[str] = []

    def seq(t: Template) -> None:
        for node in t:
            if isinstance(node, Text):
                out.append(node.text)
            elif isinstance(node, Choice):
                cumulative, total = [], 0.0
                for w in node.weights:
                    total += w
                    cumulative.append(total)
                k = bisect.bisect_right(cumulative, rng.random() * total)
                seq(node.options[min(k, len(node.options) - 1)])
            else:
                raise TypeError("pick needs a linked template (see link)")

    seq(template)
    return "".join(out)


def variant_rng(seed: int, text: str = "prompt") -> Random:
    """The generator an image's variants are drawn from: Python's `random.Random`, seeded by the image's
    seed and which text it is for ("prompt" or "negative"), so the same seed always gives the same
    resolved prompt, and torch's noise generator is never touched."""
    return Random(f"pictor-variants {text} {seed}")


def read_prompt_file(path: str | Path) -> list[str]:
    """`--from-file`: one prompt per line; blank lines and lines starting with ``#`` are skipped."""
    file = Path(path)
    if not file.is_file():
        what = "a folder" if file.is_dir() else "no such file"
        raise VariantError(f"--from-file {path}: {what}; give a text file with one prompt per line")
    prompts = read_lines(file)
    if not prompts:
        raise VariantError(
            f"--from-file {path} has no prompts (only blank or # lines); put one prompt per line"
        )
    return prompts


@dataclass(frozen=True)
class PromptRun:
    """One request of a `generate` run: its resolved texts, first seed and number of images (seeds
    seed .. seed + num_images - 1), and the templates they came from."""

    prompt: str
    negative_prompt: str
    seed: int | None
    num_images: int
    template: str
    negative_template: str


def plan_runs(
    prompts: Sequence[str],
    negative: str,
    seed: int | None,
    num_images: int,
    mode: str | None = None,
    wildcards: str | Path | None = None,
    max_combinations: int = MAX_COMBINATIONS,
) -> list[PromptRun]:
    """The requests that `generate` runs for these prompts, in order, every one checked before any runs.

    mode None: each prompt as written, `num_images` images from `seed`. "all": every combination of each
    prompt (in `expand_all`'s order) with every combination of the negative prompt, each `num_images`
    images from `seed`; more than `max_combinations` in all is refused. "random": image i of each prompt
    (seed + i) draws its own variant from `variant_rng(seed + i)`; consecutive images that draw the same
    texts share a request. `seed` may be None only without variants.
    """
    if mode is None:
        if wildcards is not None:
            raise VariantError(
                "--wildcards is read by --variants; add --variants random|all, or drop --wildcards"
            )
        return [PromptRun(p, negative, seed, num_images, p, negative) for p in prompts]
    if mode not in MODES:
        raise VariantError(f"unknown variants mode '{mode}'; use one of {', '.join(MODES)}")
    folder = WildcardFolder(wildcards) if wildcards is not None else None
    linked = [link(parse_template(p), folder) for p in prompts]
    negative_linked = link(parse_template(negative, f"the negative prompt '{_excerpt(negative)}'"), folder)
    for p, t in zip(prompts, linked, strict=True):  # before anything is drawn or expanded
        _check_size(t, f"the prompt '{_excerpt(p)}'")
    _check_size(negative_linked, f"the negative prompt '{_excerpt(negative)}'")
    if mode == "all":
        counts = sum(count_combinations(t) for t in linked) * count_combinations(negative_linked)
        if counts > max_combinations:
            total = f"{counts}" if counts < _COUNT_CEILING else "more than 10^15"
            raise VariantError(
                f"--variants all would make {total} prompts, more than {max_combinations}; use "
                "--variants random with -n, or fewer options"
            )
        negatives = expand_all(negative_linked)
        return [
            PromptRun(text, neg, seed, num_images, p, negative)
            for p, t in zip(prompts, linked, strict=True)
            for text in expand_all(t)
            for neg in negatives
        ]
    if seed is None:
        raise ValueError("random variants are drawn from the images' seeds: give plan_runs a seed")
    if num_images < 1:
        raise VariantError(f"-n must be at least 1, got {num_images}")
    runs: list[PromptRun] = []
    for p, t in zip(prompts, linked, strict=True):
        start = len(runs)
        for s in range(seed, seed + num_images):
            texts = (pick(t, variant_rng(s)), pick(negative_linked, variant_rng(s, "negative")))
            last = runs[-1] if len(runs) > start else None
            if last is not None and (last.prompt, last.negative_prompt) == texts:
                runs[-1] = PromptRun(*texts, last.seed, last.num_images + 1, p, negative)
            else:
                runs.append(PromptRun(*texts, s, 1, p, negative))
    return runs
