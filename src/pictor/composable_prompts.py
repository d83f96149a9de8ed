"""A1111's composable diffusion: a prompt of parts joined by ``AND``, each with an optional weight
(``a red circle AND a blue square:0.8``), each part one transformer pass per step, and how the passes of
several prompts (these parts, or `pictor.regional_prompts`' regions) make one velocity.

`split_and` is A1111's ``get_multicond_prompt_list`` for one prompt: the prompt split at every whole word
``AND`` (upper case), each part's trailing ``:number`` its weight (1 without), the part's text as A1111
keeps it (trailing spaces dropped, leading ones kept; a tokenizer reads neither). The negative prompt is
never split (A1111 reads it as one text).

`compose` combines the passes of P prompts with per-token weights W_i: under classifier-free guidance
A1111's rule, ``v_neg + g * sum_i W_i (v_i - v_neg)`` (the weights need not sum to 1: ``a AND b`` guides
twice as hard as ``a``, as in A1111, and a negative weight guides away from its part); without it (a
guidance-distilled model, or guidance 1) the weighted mean ``sum_i W_i v_i / sum_i W_i``, ComfyUI's rule
for combined conditions, so the weights must not sum to 0 or less there.
"""

from __future__ import annotations

import re

import torch

__all__ = ["MAX_PARTS", "compose", "split_and", "uses_and"]

MAX_PARTS = 8  # each part is one more transformer pass per step
_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")  # A1111's re_weight


def split_and(prompt: str) -> list[tuple[str, float]]:
    """The prompt's parts and their weights (A1111's ``get_multicond_prompt_list``)."""
    parts = []
    for part in _AND.split(prompt):
        match = _WEIGHT.search(part)
        text, weight = match.groups() if match is not None else (part, None)
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


def uses_and(prompt: str) -> bool:
    """Whether composable diffusion reads the prompt otherwise than as one text of weight 1."""
    # ("x:1" reads as "x"; trailing white space, which A1111 drops from every part, changes nothing)
    return split_and(prompt) != [(prompt.rstrip(), 1.0)]


def compose(out: torch.Tensor, weights: torch.Tensor, guidance: float | None) -> torch.Tensor:
    """One model call's velocity from its passes ``out [P (+ 1), B, N, C]``, the prompts' first and, under
    classifier-free guidance (`guidance` not None), the negative prompt's last; ``weights [P, N]`` each
    prompt's weight at each image token (module docstring)."""
    parts = weights.shape[0]
    w = weights.to(out.dtype)[:, None, :, None]
    if guidance is None:
        return (w * out[:parts]).sum(0) / w.sum(0)
    negative = out[parts]
    return negative + guidance * (w * (out[:parts] - negative)).sum(0)
