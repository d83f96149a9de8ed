"""First-block cache: skip most of the transformer on sampler steps where its first block barely changed.

The idea is ParaAttention's First Block Cache (also in diffusers as ``apply_first_block_cache`` and in
ComfyUI through WaveSpeed; TeaCache is its predecessor): consecutive sampler steps change the transformer's
output slowly, and how much the first block's residual changed predicts how much the rest would. So every
call runs the first double block; when its image-stream residual moved, relative to the last full pass, by
no more than ``threshold`` (mean absolute change / mean absolute value), the remaining blocks are not run and
the residual they added on that last full pass is added instead.

The decision is made per sample (per row of the batch), where diffusers makes one for the whole batch and
keeps the conditional and unconditional passes of classifier-free guidance apart with cache contexts:
pictor batches both halves in one forward, and a row's pictures must not depend on its batch-mates. Rows
that need the full pass run the remaining blocks together; the others reuse their own cached residual. For a
batch of one this is diffusers' rule exactly (tested against it).

One `FirstBlockCache` serves one sampler run: it holds the previous step's tensors and must not be shared
between runs or used where autograd records (it keeps tensors between calls).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

__all__ = ["FirstBlockCache", "cache_passes", "cache_threshold_problem"]

MAX_THRESHOLD = 1.0


def cache_threshold_problem(threshold: float | None) -> str | None:
    """What is wrong with a first-block-cache threshold (None: fine or not given)."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not (isinstance(threshold, numbers.Real) and math.isfinite(threshold)):
        return f"cache threshold must be a number between 0 and {MAX_THRESHOLD:g}, got {threshold!r}"
    if not 0 <= threshold <= MAX_THRESHOLD:
        return (
            f"cache threshold must be between 0 (off) and {MAX_THRESHOLD:g}, got {float(threshold):g}; 0.05 "
            "to 0.2 trades a little fidelity for fewer full passes"
        )
    return None


class FirstBlockCache:
    """The state of one sampler run: per row, the first block's residual and the remaining blocks' residual
    from that row's last full pass, and counts of passes made and skipped."""

    def __init__(self, threshold: float) -> None:
        problem = cache_threshold_problem(threshold)
        if problem:
            raise ValueError(problem)
        self.threshold = float(threshold)
        self.head_residual: Tensor | None = None  # [B, N, hidden]: first block's image residual
        self.tail_residual: Tensor | None = None  # [B, N, hidden]: what the other blocks added to it
        self.calls = 0  # rows seen (one per sample per transformer call)
        self.full = 0  # rows that ran every block
        self.row_full: Tensor | None = None  # [B] long, per row: calls that ran every block
        self.row_calls = 0  # calls made (each row takes part in each)

    @property
    def skipped(self) -> int:
        return self.calls - self.full

    def forget(self) -> None:
        """Drop the kept residuals (the counts stay): the next call runs every block. For calls that resume
        after others this cache did not see (a guidance interval's steps without the negative pass)."""
        self.head_residual = self.tail_residual = None

    def needs_full(self, head_residual: Tensor) -> Tensor:
        """bool ``[B]`` on the CPU: which rows must run the remaining blocks this call."""
        if torch.is_grad_enabled():
            raise RuntimeError("FirstBlockCache is for sampling: run it under torch.inference_mode()")
        batch = head_residual.shape[0]
        prev = self.head_residual
        if prev is None or prev.shape != head_residual.shape:
            return torch.ones(batch, dtype=torch.bool)
        dims = tuple(range(1, head_residual.ndim))
        change = (head_residual - prev).abs().mean(dims) / prev.abs().mean(dims)
        # Not "<= threshold": a change of NaN (a zero residual) must run the blocks, never reuse them.
        return ~(change <= self.threshold).cpu()

    def update(self, full: Tensor, head_residual: Tensor, tail_residual: Tensor | None) -> None:
        """Keep the residuals of the rows that ran in full (`full`, from :meth:`needs_full`); with no row
        run in full there is nothing to keep (and no tail residual was computed)."""
        self.calls += int(full.numel())
        self.full += int(full.sum())
        if self.row_full is None or self.row_full.shape != full.shape:
            self.row_full, self.row_calls = torch.zeros(full.shape, dtype=torch.long), 0
        self.row_full += full.long()
        self.row_calls += 1
        if tail_residual is None:
            return
        if self.head_residual is None or self.head_residual.shape != head_residual.shape:
            self.head_residual, self.tail_residual = head_residual, tail_residual
            return
        assert self.tail_residual is not None
        rows = full.nonzero().squeeze(1).to(head_residual.device)
        self.head_residual[rows] = head_residual[rows]
        self.tail_residual[rows] = tail_residual[rows]

    def image_passes(self, index: int, batch: int) -> tuple[int, int]:
        """(passes that ran every block, passes) for image `index` of a run of `batch` images: its row, and
        its row of every other pass in the batch (under classifier-free guidance the unconditional one; with
        regions or AND each prompt's, `pictor.composable_prompts`)."""
        if self.row_full is None:
            return 0, 0
        rows = list(range(index, self.row_full.shape[0], batch))
        return int(self.row_full[rows].sum()), self.row_calls * len(rows)

    def stats(self) -> dict[str, int | float]:
        """For records and logs: threshold, rows run in full and rows seen."""
        return {"threshold": self.threshold, "full_passes": self.full, "passes": self.calls}


def cache_passes(caches: list[FirstBlockCache], index: int, batch: int) -> dict[str, dict[str, int]]:
    """A record's ``cache_passes`` for image `index` of its run (summed over the run's sampler passes, two
    for the hires fix): how many transformer passes ran every block, out of how many. {} without a cache."""
    if not caches:
        return {}
    counts = [cache.image_passes(index, batch) for cache in caches]
    return {"cache_passes": {"full": sum(c[0] for c in counts), "total": sum(c[1] for c in counts)}}
