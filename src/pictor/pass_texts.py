"""Which text each transformer pass reads at each sampler step (`pictor.guided_velocity`'s passes: the
prompt and the negative prompt, or the passes of regions or AND and the negative prompt): one text each, or
with A1111's prompt editing (`pictor.prompt_editing`) each pass's schedule, its distinct texts encoded once
per run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pictor.prompt_editing import PromptSchedule, prompt_schedule, step_of_time, text_at

__all__ = ["PassTexts", "distinct_texts", "pass_schedules"]


@dataclass
class PassTexts:
    """Each pass's distinct texts over a run (one each without prompt editing; the passes: the prompt and
    the negative prompt, or the passes of regions or AND and the negative prompt), each encoded once, and
    which of them each step reads, worked out once per run: a model call finds its step by its time. Keyed
    by distinct texts, so stacks are built per combination of texts (an alternation builds two, not one
    per step)."""

    texts: list[list[str]]
    ts: torch.Tensor | None
    by_step: list[tuple[int, ...]]  # step (from 0) -> each pass's place among its texts

    def at(self, t: torch.Tensor) -> tuple[int, ...]:
        if self.ts is None:
            return self.by_step[0]
        return self.by_step[step_of_time(self.ts, float(t.reshape(-1)[0]))]


def pass_schedules(
    texts: list[str], editing: bool, ts: torch.Tensor | None, first_pass_steps: int | None
) -> PassTexts:
    """The passes' texts over a run of `ts` (with prompt editing, each text's A1111 schedule; a hires fix's
    second pass counts on from `first_pass_steps`)."""
    if not editing:
        return PassTexts([[text] for text in texts], None, [(0,) * len(texts)])
    if ts is None:
        raise ValueError("prompt editing needs the run's step times (ts) to know each call's step")
    steps = len(ts) - 1
    schedules = [distinct_texts(prompt_schedule(text, steps, first_pass_steps), steps) for text in texts]
    by_step = list(zip(*(places for _, places in schedules), strict=True))
    return PassTexts([distinct for distinct, _ in schedules], ts.detach().float().cpu(), by_step)


def distinct_texts(schedule: PromptSchedule, steps: int) -> tuple[list[str], list[int]]:
    """A schedule's distinct texts in order of first use, and each step's place among them."""
    texts = list(dict.fromkeys(text for _, text in schedule))
    return texts, [texts.index(schedule[text_at(schedule, i)][1]) for i in range(steps + 1)]
