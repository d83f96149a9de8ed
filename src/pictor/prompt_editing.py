"""A1111's prompt editing: a prompt whose words change during sampling.

- ``[from:to:when]`` reads ``from`` until step ``when`` and ``to`` after it; ``[to:when]`` adds ``to``
  after ``when``; ``[from::when]`` drops ``from`` after it; they may nest (``a[b:[c:d:2]:1]e``). ``when``
  follows A1111's rule since 1.6 (and Forge's): a number with a dot is a share of the steps (``0.25`` of
  20: 5; ``1.0``: never switches), a whole number a step; a switch at or before step 0 reads the later
  text throughout; in a hires fix's second pass whole numbers count on from the first pass's steps and
  shares from 1.0 (``1.5``: half way through the second pass). (A1111's older rule, still offered there as
  "Old prompt editing timelines", is not.)
- ``[a|b|c]`` alternates: step 1 reads a, step 2 b, step 3 c, step 4 a again...
- Everything else is kept as written (``(words:1.2)``, ``[words]`` and escapes are for
  `pictor.prompt_weights`, which reads each scheduled text afterwards); a prompt the grammar cannot read
  (a stray ``|`` outside brackets, a lone trailing backslash) is kept whole, as A1111 keeps it.

`prompt_schedule` is A1111's ``get_learned_conditioning_prompt_schedules`` for one prompt: the texts and
the step each ends at (tests/test_prompt_editing.py has its doctests). Written from its grammar (a
recursive descent where A1111 uses lark's Earley parser; stray brackets and colons at the top level are
text, as its ``start`` rule allows). A reviewer compared it with A1111's own code on 200,000 random prompts:
the differences left are where A1111's grammar is ambiguous (an edit followed by two stray brackets, e.g.
``[a:1]((``, which lark reads as text and pictor as an edit; lark's choice there changes between its
versions) and A1111's old bugs (an empty alternation option crashed it).

Which text a sampler step reads: A1111 counts its model calls from 0 and gives call ``c`` the first text
whose end step is at least ``c``; pictor gives sampler step ``i`` (from 0) the text of ``c = i``, and a
model call at time t the step whose time t is (`step_of_time`), so a second-order sampler's corrector call
at the next step's time reads the next step's text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

__all__ = ["PromptSchedule", "has_editing", "prompt_schedule", "step_of_time", "text_at", "texts_read"]

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_SPECIAL = "[]():|\\"


class _Unreadable(Exception):
    """The grammar cannot read this part (the caller backs off, or the prompt is kept whole)."""


@dataclass(frozen=True)
class _Scheduled:
    before: list[object] | None  # None: nothing before (``[to:when]``)
    after: list[object]
    when: str  # as written: a dot makes it a share of the steps


@dataclass(frozen=True)
class _Alternate:
    options: list[list[object]]


# A parsed prompt is a list of nodes: str (text kept as written), _Scheduled, _Alternate.
Nodes = list[object]


def _parse(text: str, pos: int, stops: str, top: bool) -> tuple[Nodes, int]:
    """Nodes from `pos` up to (not including) a character of `stops` or the end. At the top level, brackets
    and colons that start nothing readable are text; elsewhere they make this part unreadable."""
    nodes: Nodes = []
    while pos < len(text):
        ch = text[pos]
        if ch in stops:
            break
        if ch in "[(":
            try:
                node, end = (_bracket if ch == "[" else _paren)(text, pos)
                nodes.extend(node)
                pos = end
                continue
            except _Unreadable:
                if not top:
                    raise
        if ch in "[]():":
            if not top:
                raise _Unreadable
            nodes.append(ch)
            pos += 1
            continue
        if ch == "|":
            raise _Unreadable  # an alternation's bar outside its brackets
        start = pos
        while pos < len(text) and text[pos] not in _SPECIAL:
            pos += 1
        if pos < len(text) and text[pos] == "\\":  # an escape keeps its character, for the weights
            if pos + 1 >= len(text):
                raise _Unreadable
            pos += 2
        nodes.append(text[start:pos])
    return nodes, pos


def _expect(text: str, pos: int, ch: str) -> int:
    if pos >= len(text) or text[pos] != ch:
        raise _Unreadable
    return pos + 1


def _number_then_close(text: str, pos: int) -> tuple[str, int] | None:
    """``[WHITESPACE] NUMBER [WHITESPACE] "]"`` at pos: the number as written and the position after the
    bracket, or None."""
    at = pos
    while at < len(text) and text[at].isspace():
        at += 1
    m = _NUMBER.match(text, at)
    if m is None:
        return None
    end = m.end()
    while end < len(text) and text[end].isspace():
        end += 1
    if end >= len(text) or text[end] != "]":
        return None
    return m.group(0), end + 1


def _bracket(text: str, pos: int) -> tuple[Nodes, int]:
    """What starts with ``[`` at pos: a scheduled part, an alternation or an emphasis ``[words]``."""
    first, at = _parse(text, pos + 1, ":|]", top=False)
    if at >= len(text):
        raise _Unreadable
    if text[at] == "]":
        return ["[", *first, "]"], at + 1
    if text[at] == "|":
        options = [first]
        while at < len(text) and text[at] == "|":
            option, at = _parse(text, at + 1, "|]", top=False)
            options.append(option)
        return [_Alternate(options)], _expect(text, at, "]")
    at += 1  # past the first ':'
    only = _number_then_close(text, at)
    if only is not None:  # [to:when]
        return [_Scheduled(None, first, only[0])], only[1]
    second, at = _parse(text, at, ":]", top=False)
    at = _expect(text, at, ":")
    both = _number_then_close(text, at)
    if both is None:
        raise _Unreadable
    return [_Scheduled(first, second, both[0])], both[1]


def _paren(text: str, pos: int) -> tuple[Nodes, int]:
    """``(words)`` or ``(words:weight)``: kept as written (with scheduled parts inside resolved)."""
    first, at = _parse(text, pos + 1, ":)", top=False)
    if at < len(text) and text[at] == ")":
        return ["(", *first, ")"], at + 1
    at = _expect(text, at, ":")
    second, at = _parse(text, at, ":)", top=False)
    return ["(", *first, ":", *second, ")"], _expect(text, at, ")")


@dataclass(frozen=True)
class _Count:
    """How `when`s count in a pass: A1111's rule since 1.6. A whole number is a step of the first pass and
    a number with a dot a share of it; in a hires fix's second pass (`base` = the first pass's steps) a
    whole number counts on from the first pass's steps and a share from 1.0 (1.5: half of the second)."""

    steps: int
    base: int = 0  # whole numbers' offset: the steps before this pass
    shares: float = 0.0  # shares' offset: 1.0 in a second pass

    def when(self, written: str) -> int:
        v = float(written)
        v = (v - self.shares) * self.steps if "." in written else v - self.base
        return min(self.steps, int(v))


def _steps_of(nodes: Nodes, count: _Count, out: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            when = count.when(node.when)
            if when >= 1:  # a switch before the first step: the later text throughout
                out.add(when)
            _steps_of(node.before or [], count, out)
            _steps_of(node.after, count, out)
        elif isinstance(node, _Alternate):
            out.update(range(1, count.steps + 1))
            for option in node.options:
                _steps_of(option, count, out)


def _text(nodes: Nodes, step: int, count: _Count) -> str:
    out = []
    for node in nodes:
        if isinstance(node, _Scheduled):
            chosen = (node.before or []) if step <= count.when(node.when) else node.after
            out.append(_text(chosen, step, count))
        elif isinstance(node, _Alternate):
            out.append(_text(node.options[(step - 1) % len(node.options)], step, count))
        else:
            out.append(str(node))
    return "".join(out)


def _nodes(prompt: str) -> Nodes | None:
    """The parsed prompt, or None where the grammar cannot read it (kept whole, as A1111 keeps it; brackets
    nested hundreds deep too, which a recursive reader cannot follow)."""
    try:
        nodes, end = _parse(prompt, 0, "", top=True)
    except (_Unreadable, RecursionError):
        return None
    assert end == len(prompt)
    return nodes


# (the step this text ends at, the text), in order; the last ends at the number of steps.
PromptSchedule = list[tuple[int, str]]


def prompt_schedule(prompt: str, steps: int, first_pass_steps: int | None = None) -> PromptSchedule:
    """The texts `prompt` reads over a pass of `steps` steps and the step each ends at (A1111's schedule);
    `first_pass_steps`: this is a hires fix's second pass, after a first of that many steps."""
    nodes = _nodes(prompt)
    if nodes is None:
        return [(steps, prompt)]
    count = _Count(steps) if first_pass_steps is None else _Count(steps, first_pass_steps, 1.0)
    ends: set[int] = {steps}
    _steps_of(nodes, count, ends)
    return [(t, _text(nodes, t, count)) for t in sorted(ends)]


def texts_read(
    prompt: str, negative: str, editing: bool, steps: int, hires_steps: int | None = None
) -> list[tuple[str, str]]:
    """("prompt" or "negative prompt", text) for every text a model reads of the two: as written, or with
    prompt editing each distinct text their schedules reach in a pass of `steps` and, with a hires fix, its
    second pass of `hires_steps`."""
    pairs = [("prompt", prompt), ("negative prompt", negative)]
    if not editing:
        return pairs
    out: dict[tuple[str, str], None] = {}
    for what, text in pairs:
        passes = [prompt_schedule(text, steps)]
        if hires_steps:
            passes.append(prompt_schedule(text, hires_steps, steps))
        for schedule in passes:
            out.update(((what, t), None) for _, t in schedule)
    return list(out)


def has_editing(prompt: str) -> bool:
    """Whether `prompt` holds prompt editing or an alternation the grammar reads (whatever they switch)."""
    nodes = _nodes(prompt)
    stack = list(nodes or [])
    while stack:
        node = stack.pop()
        if isinstance(node, (_Scheduled, _Alternate)):
            return True
    return False


def text_at(schedule: PromptSchedule, step: int) -> int:
    """The index in `schedule` of the text sampler step `step` (from 0) reads: the first whose end step is at
    least the step (A1111's `reconstruct_cond_batch`)."""
    for k, (end, _) in enumerate(schedule):
        if step <= end:
            return k
    return len(schedule) - 1


def step_of_time(ts: torch.Tensor, t: float) -> int:
    """The sampler step (from 0) of a model call at time `t` on schedule `ts`: the step whose time is
    nearest. A call at a step time reads that step's text; a sampler's call between step times (DPM2's and
    DPM2 a's midpoints, DPM++ 2S a's and DPM++ SDE's) reads the text of the step time nearest it, often the
    next step's (A1111 counts model calls instead, so its DPM2 runs a schedule at twice its pace)."""
    return int(torch.argmin((ts - t).abs()).item())
