"""A1111's prompt editing: a prompt whose words change during sampling.

- ``[from:to:when]`` reads ``from`` until step ``when`` and ``to`` after it; ``[to:when]`` adds ``to``
  after ``when``; ``[from::when]`` drops ``from`` after it. ``when`` below 1 is a share of the steps
  (``0.25`` of 20 steps: 5), else a step number; it may nest (``a[b:[c:d:2]:1]e``).
- ``[a|b|c]`` alternates: step 1 reads a, step 2 b, step 3 c, step 4 a again...
- Everything else is kept as written (``(words:1.2)``, ``[words]`` and escapes are for
  `pictor.prompt_weights`, which reads each scheduled text afterwards); a prompt the grammar cannot read
  (a stray ``|`` outside brackets, a lone trailing backslash) is kept whole, as A1111 keeps it.

`prompt_schedule` is A1111's ``get_learned_conditioning_prompt_schedules`` for one prompt: the texts and
the step each ends at, its doctests reproduced in tests/test_prompt_editing.py. Written from its grammar
(a recursive descent where A1111 uses lark's Earley parser; stray brackets and colons at the top level are
text, as its ``start`` rule allows).

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
    when: float


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


def _number_then_close(text: str, pos: int) -> tuple[float, int] | None:
    """``[WHITESPACE] NUMBER "]"`` at pos: the number and the position after the bracket, or None."""
    at = pos
    while at < len(text) and text[at].isspace():
        at += 1
    m = _NUMBER.match(text, at)
    if m is None or m.end() >= len(text) or text[m.end()] != "]":
        return None
    return float(m.group(0)), m.end() + 1


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


def _steps_of(nodes: Nodes, steps: int, out: set[int]) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            out.add(_when(node.when, steps))
            _steps_of(node.before or [], steps, out)
            _steps_of(node.after, steps, out)
        elif isinstance(node, _Alternate):
            out.update(range(1, steps + 1))
            for option in node.options:
                _steps_of(option, steps, out)


def _when(when: float, steps: int) -> int:
    """A1111's: a share below 1 times the steps, then whole steps (truncated), at most `steps`."""
    return min(steps, int(when * steps if when < 1 else when))


def _text(nodes: Nodes, step: int, steps: int) -> str:
    out = []
    for node in nodes:
        if isinstance(node, _Scheduled):
            chosen = (node.before or []) if step <= _when(node.when, steps) else node.after
            out.append(_text(chosen, step, steps))
        elif isinstance(node, _Alternate):
            out.append(_text(node.options[(step - 1) % len(node.options)], step, steps))
        else:
            out.append(str(node))
    return "".join(out)


# (the step this text ends at, the text), in order; the last ends at the number of steps.
PromptSchedule = list[tuple[int, str]]


def prompt_schedule(prompt: str, steps: int) -> PromptSchedule:
    """The texts `prompt` reads over `steps` steps and the step each ends at (A1111's schedule)."""
    try:
        nodes, end = _parse(prompt, 0, "", top=True)
    except _Unreadable:
        return [(steps, prompt)]
    assert end == len(prompt)
    ends: set[int] = {steps}
    _steps_of(nodes, steps, ends)
    return [(t, _text(nodes, t, steps)) for t in sorted(ends)]


def texts_read(prompt: str, negative: str, editing: bool, step_counts: list[int]) -> list[tuple[str, str]]:
    """("prompt" or "negative prompt", text) for every text a model reads of the two: as written, or with
    prompt editing each text their schedules reach over any of `step_counts` (a run's passes' steps)."""
    pairs = [("prompt", prompt), ("negative prompt", negative)]
    if not editing:
        return pairs
    out: list[tuple[str, str]] = []
    for what, text in pairs:
        for steps in step_counts:
            out += [(what, t) for _, t in prompt_schedule(text, steps) if (what, t) not in out]
    return out


def has_editing(prompt: str) -> bool:
    """Whether `prompt` changes during sampling at all (at some number of steps)."""
    return len({text for _, text in prompt_schedule(prompt, 100)}) > 1 or len(prompt_schedule(prompt, 1)) > 1


def text_at(schedule: PromptSchedule, step: int) -> int:
    """The index in `schedule` of the text sampler step `step` (from 0) reads: the first whose end step is at
    least the step (A1111's `reconstruct_cond_batch`)."""
    for k, (end, _) in enumerate(schedule):
        if step <= end:
            return k
    return len(schedule) - 1


def step_of_time(ts: torch.Tensor, t: float) -> int:
    """The sampler step (from 0) of a model call at time `t` on schedule `ts` (falling): the last step whose
    time is at least t; calls between two steps' times belong to the earlier."""
    return max(0, int((ts >= t - 1e-9).sum().item()) - 1)
