"""First-block cache: diffusers' First Block Cache's rule at batch 1, per-row decisions in a batch, and
threshold 0 is FLUX.1's forward bit for bit.

The tiny random models' first-block residual moves by 40-100% between sampler steps (random time
embeddings), so the thresholds here are high; a trained model moves by a few percent (see the README)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from pictor.models.block_cache import FirstBlockCache, cache_threshold_problem
from pictor.models.flux import Flux
from pictor.sampling import get_schedule, sample_euler

import tiny_flux
from tiny_flux import load_reference, make_inputs, random_flux

STEPS = 12


def model_inputs(params: Any, rows: slice = slice(None)) -> tuple[torch.Tensor, dict[str, Any]]:
    """Noise and the conditioning of `rows` of tiny_flux's batch of two (timesteps come from the sampler)."""
    inputs = {k: v[rows] if v is not None else None for k, v in make_inputs(params).items()}
    inputs.pop("timesteps")
    return inputs.pop("img"), inputs


def euler(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    ts = get_schedule("linear", STEPS, image_seq_len=x.shape[1])
    with torch.inference_mode():
        return sample_euler(fn, x, ts)


class RecordingCache(FirstBlockCache):
    """Keeps each call's per-row decisions."""

    def __init__(self, threshold: float) -> None:
        super().__init__(threshold)
        self.decisions: list[list[bool]] = []

    def update(self, full: torch.Tensor, head: torch.Tensor, tail: torch.Tensor | None) -> None:
        self.decisions.append(full.tolist())
        super().update(full, head, tail)


def cached_run(
    model: Flux, threshold: float, x: torch.Tensor, kw: dict[str, Any]
) -> tuple[torch.Tensor, RecordingCache]:
    cache = RecordingCache(threshold)
    return euler(lambda x, t: model(x, timesteps=t, block_cache=cache, **kw), x), cache


@pytest.mark.parametrize(("threshold", "full"), [(0.6, 11), (0.7, 7), (0.8, 3)])
def test_batch_of_one_matches_diffusers_first_block_cache(threshold: float, full: int) -> None:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    ref_mod = load_reference()
    params = tiny_flux.tiny_params(depth=2, guidance_embed=True)
    model = random_flux(params)
    ref = ref_mod.build_reference(params, {k: v.clone() for k, v in model.state_dict().items()})
    apply_first_block_cache(ref, FirstBlockCacheConfig(threshold=threshold))
    ref_full = []  # diffusers runs its second block only on a full pass
    ref.transformer_blocks[1].attn.register_forward_pre_hook(lambda *_: ref_full.append(1))
    x, kw = model_inputs(params, slice(0, 1))

    ours, cache = cached_run(model, threshold, x, kw)
    with ref.cache_context("cond"):
        theirs = euler(lambda x, t: ref_mod.reference_forward(ref, x, timesteps=t, **kw), x)
    uncached = euler(lambda x, t: model(x, timesteps=t, **kw), x)

    assert cache.stats() == {"threshold": threshold, "full_passes": full, "passes": STEPS}
    assert len(ref_full) == full
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - uncached).abs().max().item() > 0.01  # the skipped passes did change the result


def test_rows_decide_alone_and_match_runs_of_one() -> None:
    """In a batch, each row skips or runs on its own evidence: the batch gives each row's result alone."""
    params = tiny_flux.tiny_params(depth=2)
    model = random_flux(params, seed=2)
    x, kw = model_inputs(params)
    res_gen = torch.Generator().manual_seed(5)
    residuals = [0.3 * torch.randn(x.shape[0], x.shape[1], params.hidden_size, generator=res_gen)] * 4
    threshold = 0.8

    both, cache = cached_run(model, threshold, x, {**kw, "img_residuals": residuals})
    alone, decisions = [], []
    for row in range(2):
        one = {k: v[row : row + 1] for k, v in kw.items() if v is not None}
        one["img_residuals"] = [r[row : row + 1] for r in residuals]
        out, row_cache = cached_run(model, threshold, x[row : row + 1], one)
        alone.append(out)
        decisions.append([d[0] for d in row_cache.decisions])

    # the batch made each row's own decisions, and they differed at some steps: the mixed path ran
    assert [list(d) for d in zip(*decisions, strict=True)] == cache.decisions
    assert any(a != b for a, b in zip(*decisions, strict=True)), decisions
    assert not all(all(d) for d in cache.decisions)
    assert (both - torch.cat(alone)).abs().max().item() <= 1e-5


def test_threshold_zero_is_the_plain_forward_bit_for_bit() -> None:
    params = tiny_flux.tiny_params(depth=2)
    model = random_flux(params)
    x, kw = model_inputs(params)
    cached, cache = cached_run(model, 0.0, x, kw)
    plain = euler(lambda x, t: model(x, timesteps=t, **kw), x)
    assert cache.full == cache.calls == 2 * STEPS
    assert torch.equal(cached, plain)


def test_needs_inference_mode_and_a_double_block() -> None:
    params = tiny_flux.tiny_params(depth=1)
    model = random_flux(params)
    inputs = make_inputs(params)
    with pytest.raises(RuntimeError, match="inference_mode"):
        model(**inputs, block_cache=FirstBlockCache(0.1))
    no_double = Flux(tiny_flux.tiny_params(depth=1).__class__(**{**params.to_dict(), "depth": 0}))
    with torch.inference_mode(), pytest.raises(ValueError, match="at least one double block"):
        no_double(**inputs, block_cache=FirstBlockCache(0.1))


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), "0.1", True])
def test_bad_thresholds_are_refused_with_the_range(bad: Any) -> None:
    problem = cache_threshold_problem(bad)
    assert problem is not None and "between 0" in problem
    with pytest.raises(ValueError, match="cache threshold"):
        FirstBlockCache(bad)
    for fine in (None, 0.1, 1, np.float32(0.1)):
        assert cache_threshold_problem(fine) is None
