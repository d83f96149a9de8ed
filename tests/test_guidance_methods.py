"""Guidance methods (`pictor.guidance_methods`): each gives diffusers' guider's prediction over whole runs
(float64, its state driven per step as its pipelines drive it), per image; the step clock; plain CFG
unchanged; the guidance interval skips the negative pass; requests, records, reproduce, --settings-from,
the A1111 text, grid axes, the CLI and the refusals."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pictor.composable_prompts import compose
from pictor.generation_request import GenerationError, GenerationRequest
from pictor.grid_axes import GridError, plan_grid
from pictor.grid_runs import run_plan
from pictor.guidance_methods import (
    GuidanceMethod,
    GuidanceMethodError,
    Guider,
    StepClock,
    rescale_noise_cfg,
)
from pictor.guided_velocity import guided_velocity
from pictor.loading import load
from pictor.models.block_cache import FirstBlockCache
from pictor.pipeline import Pipeline
from pictor.provenance import parameters_text, read_record
from pictor.reproduce import reproduce
from pictor.sampling import (
    MODEL_EVALS_PER_STEP,
    SAMPLERS,
    STOCHASTIC_SAMPLERS,
    clock_calls_per_step,
    get_schedule,
)
from tests.test_cli_prompt_variants import cli

from cfg_pp_velocity import own_uncond
from tiny_bundle import saved_tiny_bundle, velocity_32

diffusers_guiders = pytest.importorskip("diffusers.guiders")

STEPS = 8


def _diffusers_guider(method: GuidanceMethod, scale: float) -> Any:
    common = {"guidance_scale": scale, "guidance_rescale": method.rescale, "start": method.start}
    common["stop"] = method.stop
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method.method == "cfg":
            return diffusers_guiders.ClassifierFreeGuidance(**common)
        if method.method == "apg":
            return diffusers_guiders.AdaptiveProjectedGuidance(
                **common,
                eta=method.eta,
                adaptive_projected_guidance_rescale=method.norm_threshold,
                adaptive_projected_guidance_momentum=method.momentum or None,
            )
        if method.method == "cfg-zero-star":
            return diffusers_guiders.ClassifierFreeZeroStarGuidance(
                **common, zero_init_steps=method.zero_init_steps
            )
        return diffusers_guiders.TangentialClassifierFreeGuidance(**common)


def _predictions(steps: int, batch: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A run's (cond, uncond) per step [B, N, C] in float64: related, as a model's two predictions are."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        cond = torch.randn(batch, 16, 8, generator=g, dtype=torch.float64)
        out.append((cond, 0.8 * cond + 0.5 * torch.randn(batch, 16, 8, generator=g, dtype=torch.float64)))
    return out


METHODS = [
    GuidanceMethod(),
    GuidanceMethod(rescale=0.7),
    GuidanceMethod(start=0.25, stop=0.7, rescale=0.3),
    GuidanceMethod("apg"),
    GuidanceMethod("apg", eta=0.4, norm_threshold=4.0, momentum=-0.5, stop=0.75),
    GuidanceMethod("apg", eta=1.0, norm_threshold=0.0, momentum=0.3, rescale=0.5, start=0.2),
    GuidanceMethod("cfg-zero-star"),
    GuidanceMethod("cfg-zero-star", zero_init_steps=2, start=0.4, stop=0.9),
    GuidanceMethod("cfg-zero-star", zero_init_steps=0, rescale=0.6),
    GuidanceMethod("tcfg"),
    GuidanceMethod("tcfg", rescale=0.5, start=0.1, stop=0.6),
]


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_each_method_is_diffusers_guider_over_a_run(method: GuidanceMethod) -> None:
    scale = 5.0
    theirs, ours = _diffusers_guider(method, scale), Guider(method, scale, STEPS)
    for step, (cond, uncond) in enumerate(_predictions(STEPS)):
        theirs.set_state(step=step, num_inference_steps=STEPS, timestep=torch.tensor(1000.0 - step))
        theirs.prepare_inputs({})  # (APG's momentum buffer starts at step 0, as in its pipelines)
        two = theirs.num_conditions == 2
        # the negative pass runs exactly where diffusers' guider asks for it (CFG-Zero*'s zeroed steps need
        # no pass at all here)
        assert ours.guides(step) == two or ours.zeroed(step), step
        want = theirs.forward(cond, uncond if two else None).pred
        got = ours(step, cond, uncond if ours.guides(step) else None)
        assert got.dtype == torch.float64
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (step, (got - want).abs().max())


def test_the_tests_see_each_formula() -> None:
    """The methods' predictions differ from plain CFG's (so the parity above is about something)."""
    cond, uncond = _predictions(1)[0]
    plain = Guider(GuidanceMethod(), 5.0, 4)(1, cond, uncond)
    for method in METHODS[1:]:
        if method.method == "cfg-zero-star" and method.zero_init_steps > 1:
            continue
        got = Guider(method, 5.0, 4)(1, cond, uncond if Guider(method, 5.0, 4).guides(1) else None)
        assert (got - plain).abs().max() > 1e-3, method


def test_zero_init_with_a_rescale_is_zero_where_diffusers_is_nan() -> None:
    method = GuidanceMethod("cfg-zero-star", rescale=0.5)
    cond, uncond = _predictions(1)[0]
    theirs = _diffusers_guider(method, 4.0)
    theirs.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(1000.0))
    assert torch.isnan(theirs.forward(cond, uncond).pred).all()
    assert torch.equal(Guider(method, 4.0, 4)(0, cond, None), torch.zeros_like(cond))


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_each_image_is_guided_alone(method: GuidanceMethod) -> None:
    """Norms, projections, scales and momentum are per image: a batch of 3 gives each image's own run."""
    run = _predictions(STEPS, batch=3, seed=1)
    together = Guider(method, 4.0, STEPS)
    alone = [Guider(method, 4.0, STEPS) for _ in range(3)]
    for step, (cond, uncond) in enumerate(run):
        u = uncond if together.guides(step) else None
        got = together(step, cond, u)
        for i, guider in enumerate(alone):
            one = guider(step, cond[i : i + 1], u[i : i + 1] if u is not None else None)
            assert torch.allclose(got[i : i + 1], one, rtol=1e-12, atol=1e-13), (step, i)


def test_plain_cfg_is_composes_formula_bit_for_bit() -> None:
    torch.manual_seed(0)
    out = torch.randn(2, 2, 16, 8)  # the prompt's pass and the negative's, float32 as the model's
    got = Guider(GuidanceMethod(), 4.5, 4)(0, out[0], out[1])
    assert torch.equal(got, compose(out, torch.ones(1, 16), 4.5))
    assert torch.equal(Guider(GuidanceMethod(stop=0.5), 4.5, 4)(3, out[0], None), out[0])


def test_rescale_is_lins() -> None:
    torch.manual_seed(0)
    cond, guided = torch.randn(2, 5, 3, dtype=torch.float64), 3 * torch.randn(2, 5, 3, dtype=torch.float64)
    got = rescale_noise_cfg(guided, cond, 0.7)
    for i in range(2):
        fitted = guided[i] * cond[i].std() / guided[i].std()
        assert torch.allclose(got[i], 0.7 * fitted + 0.3 * guided[i])


def test_the_step_clock() -> None:
    ts = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    euler = StepClock(ts, 1)
    assert [euler(t) for t in (1.0, 0.8, 0.5, 0.2)] == [0, 1, 2, 3]
    heun = StepClock(ts, 2)  # predictor at t_i, corrector at t_{i+1}; the step to 0 has no corrector
    assert [heun(t) for t in (1.0, 0.8, 0.8, 0.5, 0.5, 0.2, 0.2)] == [0, 0, 1, 1, 2, 2, 3]
    midpoint = StepClock(ts, 2)  # a second call between two step times
    assert [midpoint(t) for t in (1.0, 0.85, 0.8, 0.55, 0.5)] == [0, 0, 1, 1, 2]
    again = StepClock(ts, 1)  # a new run of the same clock's times starts over
    assert [again(t) for t in (1.0, 0.8, 1.0)] == [0, 1, 0]
    heunpp = StepClock(ts, 3)  # t_i, t_{i+1}, t_{i+2}; the last steps have fewer calls
    assert [heunpp(t) for t in (1.0, 0.8, 0.5, 0.8, 0.5, 0.2, 0.5, 0.2, 0.2)] == [0, 0, 0, 1, 1, 1, 2, 2, 3]
    at_start = StepClock(ts, 2)  # a midpoint call at the step's own time (DPM++ SDE from t = 1)
    assert [at_start(t) for t in (1.0, 1.0, 0.8, 0.6)] == [0, 0, 1, 1]
    back_up = StepClock(ts, 3)  # a step of fewer calls than the most: a time going up starts the next
    assert [back_up(t) for t in (1.0, 0.5, 0.8, 0.5)] == [0, 0, 1, 1]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_samplers_calls_find_their_steps(name: str) -> None:
    """Each sampler's calls map to its steps in order, each step's first call at its own time, at most
    MODEL_EVALS_PER_STEP calls a step."""
    ts = get_schedule("flux", 6, image_seq_len=16)
    times: list[float] = []

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        times.append(float(t.reshape(-1)[0]))
        return -0.5 * x

    noise = {"noise": lambda i: torch.randn(1, 4, 3)} if name in STOCHASTIC_SAMPLERS else {}
    torch.manual_seed(0)
    SAMPLERS[name](own_uncond(velocity), torch.randn(1, 4, 3), ts, **noise)
    clock = StepClock(ts, clock_calls_per_step(name))  # as guided_velocity makes it
    steps = [clock(t) for t in times]
    assert sorted(set(steps)) == list(range(6)) and steps == sorted(steps), steps
    if name == "sa_solver_pece":  # both calls of a step at its own time (ComfyUI's loop iteration there)
        assert steps == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5], steps
        assert all(abs(t - float(ts[s])) < 1e-6 for t, s in zip(times, steps, strict=True))
    for step in range(6):
        first = steps.index(step)
        assert abs(times[first] - float(ts[step])) < 1e-6
        assert steps.count(step) <= MODEL_EVALS_PER_STEP[name]


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"method": "pag"}, "guidance method must be one of cfg, apg, cfg-zero-star, tcfg"),
        ({"rescale": 1.5}, r"guidance rescale \(rescale\) must be a number between 0 and 1, got 1.5"),
        ({"start": 1.0}, r"interval start \(start\) must be a number at least 0 and below 1"),
        ({"stop": 0.0}, r"interval stop \(stop\) must be a number above 0 and at most 1"),
        ({"start": 0.6, "stop": 0.5}, "start 0.6 must be below its stop 0.5"),
        ({"method": "apg", "eta": -0.1}, r"APG eta \(eta\) must be a number between 0 and 1"),
        ({"method": "apg", "norm_threshold": float("nan")}, r"APG norm threshold \(norm_threshold\)"),
        ({"method": "apg", "momentum": 1.0}, r"APG momentum \(momentum\) must be a number above -1 and"),
        ({"zero_init_steps": 1.5}, r"zero init steps \(zero_init_steps\) must be a whole number from 0"),
        ({"rescale": True}, "rescale"),
    ],
)
def test_bad_settings_name_the_field_and_range(values: dict[str, Any], words: str) -> None:
    with pytest.raises(GuidanceMethodError, match=words) as caught:
        GuidanceMethod(**values)
    assert caught.value.field in {*values, "method"}


def test_records_read_back_and_other_methods_settings_do_nothing() -> None:
    apg = GuidanceMethod("apg", eta=0.5, momentum=-0.5, stop=0.8)
    assert apg.record() == {
        "method": "apg", "rescale": 0.0, "start": 0.0, "stop": 0.8, "eta": 0.5, "norm_threshold": 15.0,
        "momentum": -0.5,
    }  # fmt: skip
    assert GuidanceMethod.from_record(apg.record()) == apg
    assert GuidanceMethod.from_record({"method": "cfg", "start": 0, "stop": 1}).is_default
    assert GuidanceMethod(eta=0.5, zero_init_steps=3).is_default  # (neither is plain CFG's)
    assert "zero_init_steps" in GuidanceMethod("cfg-zero-star").record()
    with pytest.raises(ValueError, match="unknown fields: scale"):
        GuidanceMethod.from_record({"method": "cfg", "scale": 2})


# ------------------------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_bundle(tmp_path_factory.mktemp("guidance"), "tiny-guidance")


@pytest.fixture(scope="module")
def pipe(bundle: Path) -> Pipeline:
    return load(str(bundle), device="cpu")


def _generate(pipe: Pipeline, method: GuidanceMethod | None = None, **kw: Any) -> list[Any]:
    prompt = kw.pop("prompt_override", "a red circle")
    settings = {"seed": 4, "steps": 4, "num_images": 2, "negative_prompt": "blue", **kw}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny encoder's notices about its vocabulary
        return pipe.generate(GenerationRequest(prompt, guidance_method=method, **settings))


def _px(image: Any) -> np.ndarray:
    return np.asarray(image.image).astype(np.int16)


def test_plain_cfg_as_a_method_is_no_method(pipe: Pipeline) -> None:
    """GuidanceMethod() resolves to none: the same pixels and the same record as a request without one."""
    without, plain = _generate(pipe), _generate(pipe, GuidanceMethod(eta=0.3))
    for a, b in zip(without, plain, strict=True):
        assert np.array_equal(_px(a), _px(b)) and a.record == b.record
        assert "guidance_method" not in a.record and "Guidance method" not in parameters_text(a.record)
    r = pipe.resolve_request(GenerationRequest("a red circle", width=32, height=32, steps=4, seed=1))
    torch.manual_seed(0)
    x, t = torch.randn(2, 16, 16), torch.tensor([0.6, 0.6])
    ts = torch.linspace(1, 0, 5)
    with torch.inference_mode():
        base = guided_velocity(pipe, r, 2, 8, 8, ts=ts)(x, t)
        unresolved = guided_velocity(pipe, replace(r, guidance_method=GuidanceMethod()), 2, 8, 8, ts=ts)(x, t)
    assert torch.equal(base, unresolved)


class _Rows:
    """Counts the rows of each transformer call (2 per image with the negative pass, 1 without)."""

    def __init__(self, pipe: Pipeline) -> None:
        self.rows: list[int] = []
        self.forward = pipe.transformer.forward

    def __call__(self, img: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        self.rows.append(img.shape[0])
        return self.forward(img, *args, **kw)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_outside_the_interval_the_negative_pass_is_not_run(
    pipe: Pipeline, sampler: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = _Rows(pipe)
    monkeypatch.setattr(pipe.transformer, "forward", spy)
    _generate(pipe, GuidanceMethod(start=0.25, stop=0.75), steps=4, sampler=sampler, num_images=3)
    per_step = {"euler": [3, 6, 6, 3], "heun": [3, 3, 6, 6, 6, 6, 3]}[sampler]  # (heun: 2 calls a step)
    assert spy.rows == per_step
    spy.rows.clear()
    _generate(pipe, GuidanceMethod("cfg-zero-star", zero_init_steps=2), steps=4, num_images=3)
    assert spy.rows == [6, 6]  # the zeroed steps call nothing


def test_unguided_steps_are_the_prompts_own_prediction(pipe: Pipeline) -> None:
    """Outside the interval: the velocity of guidance 1 (the prompt's pass alone), bit for bit; also with
    regional attention and with AND (their weighted mean, compose's rule without CFG)."""
    ts = torch.linspace(1, 0, 5)
    torch.manual_seed(1)
    x = torch.randn(2, 16, 16)
    regions = [{"box": [0, 0, 0.5, 1], "prompt": "a blue square", "strength": 2.0}]
    for kw in ({}, {"regions": regions, "regional_attention": True}, {"composable": True}):
        prompt = "a red circle:0.5 AND two shapes:0.5" if kw.get("composable") else "a red circle"
        method = GuidanceMethod(stop=0.5)
        r = pipe.resolve_request(
            GenerationRequest(prompt, width=32, height=32, steps=4, seed=1, guidance_method=method, **kw)
        )
        one = pipe.resolve_request(
            GenerationRequest(prompt, width=32, height=32, steps=4, guidance=1.0, **kw)
        )
        with torch.inference_mode():
            v = guided_velocity(pipe, r, 2, 8, 8, ts=ts)
            guided = v(x, ts[0].expand(2))
            v(x, ts[1].expand(2))
            late = v(x, ts[2].expand(2))  # step 2: unguided
            want = guided_velocity(pipe, one, 2, 8, 8, ts=ts)(x, ts[2].expand(2))
        assert torch.equal(late, want), kw
        assert (guided - guided_velocity(pipe, one, 2, 8, 8, ts=ts)(x, ts[0].expand(2))).abs().max() > 1e-4


def test_with_and_the_conditional_prediction_is_composes_at_guidance_1(pipe: Pipeline) -> None:
    prompt = "a red circle AND a blue square:0.5"
    torch.manual_seed(0)
    x, t = torch.randn(2, 16, 16), torch.tensor([1.0, 1.0])
    method = GuidanceMethod(rescale=0.6)
    with torch.inference_mode():
        r = pipe.resolve_request(
            GenerationRequest(prompt, width=32, height=32, steps=4, seed=1, guidance=5.0,
                              negative_prompt="dark", composable=True, guidance_method=method)
        )  # fmt: skip
        v = guided_velocity(pipe, r, 2, 8, 8, ts=torch.linspace(1, 0, 5))(x, t)
        c = [velocity_32(pipe, p, guidance=1.0)(x, t) for p in ("a red circle", " a blue square")]
        u = velocity_32(pipe, "dark", guidance=1.0)(x, t)
    cond = u + (c[0] - u) + 0.5 * (c[1] - u)
    want = rescale_noise_cfg(u + 5.0 * (cond - u), cond, 0.6)
    assert torch.allclose(v, want, atol=1e-5), (v - want).abs().max()


SAMPLES = [
    GuidanceMethod(rescale=0.7),
    GuidanceMethod(stop=0.5),
    GuidanceMethod("apg", eta=0.5, norm_threshold=2.0, momentum=-0.5, start=0.25),
    GuidanceMethod("cfg-zero-star", rescale=0.2),
    GuidanceMethod("tcfg", stop=0.75),
]


@pytest.mark.parametrize("method", SAMPLES, ids=lambda m: m.method)
def test_records_reproduce_and_batch_independence(pipe: Pipeline, method: GuidanceMethod) -> None:
    images = _generate(pipe, method, sampler="heun")
    plain = _generate(pipe, sampler="heun")
    (second,) = _generate(pipe, method, sampler="heun", seed=5, num_images=1)
    assert np.abs(_px(images[0]) - _px(plain[0])).max() > 0  # (the method does something)
    assert images[0].record["guidance_method"] == method.record()
    diff = np.abs(_px(images[1]) - _px(second))  # image 1 of the batch = seed 5 alone, up to BLAS rounding
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.995
    for g in images:
        assert np.array_equal(_px(reproduce(pipe, g.record)), _px(g))
    assert f"Guidance method: {method.method}" in parameters_text(images[0].record)


def test_edits_and_the_hires_fix_take_a_method(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    from pictor.editing import EditRequest

    method = GuidanceMethod("apg", stop=0.5)
    from PIL import Image

    picture = Image.fromarray(np.full((32, 32, 3), 90, np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edit = pipe.edit(
            EditRequest(picture, "a red circle", strength=0.6, steps=4, seed=2, guidance_method=method)
        )
    assert edit[0].record["guidance_method"] == method.record()
    assert np.array_equal(_px(reproduce(pipe, edit[0].record, source=picture)), _px(edit[0]))
    spy = _Rows(pipe)
    monkeypatch.setattr(pipe.transformer, "forward", spy)
    (hires,) = _generate(pipe, method, steps=4, hires_scale=1.5, hires_steps=2, num_images=1)
    assert spy.rows == [2, 2, 1, 1, 2, 1]  # the second pass counts its own 2 steps
    monkeypatch.undo()
    assert np.array_equal(_px(reproduce(pipe, hires.record)), _px(hires))


def test_an_interval_with_and_weights_that_do_not_add_up_to_1_is_refused(pipe: Pipeline) -> None:
    """Outside the interval there is no negative pass, and A1111's AND guidance needs one unless the
    weights add up to 1; a method without an interval takes any weights (its guided steps have the pass)."""
    with pytest.raises(GenerationError, match=r"AND weights that add up to 1\.5: .* scale the weights"):
        _generate(pipe, GuidanceMethod(stop=0.5), composable=True, prompt_override="a red circle AND a b:0.5")
    _generate(pipe, GuidanceMethod(stop=0.5), composable=True, prompt_override="a red circle:0.5 AND b:0.5")
    _generate(pipe, GuidanceMethod("apg"), composable=True, prompt_override="a red circle AND a b:0.5")


def test_after_a_guided_stretch_the_prompt_only_cache_runs_in_full(pipe: Pipeline) -> None:
    """Steps without the negative pass keep a cache of their own; its last call before a guided stretch is
    many steps old by the next such step, so that one runs every block, even at the loosest threshold."""
    method = GuidanceMethod(start=0.34, stop=0.67)
    settings = {"width": 32, "height": 32, "steps": 6, "seed": 1, "negative_prompt": "blue"}
    r = pipe.resolve_request(
        GenerationRequest("a red circle", guidance_method=method, cache_threshold=1.0, **settings)
    )
    ts = torch.linspace(1, 0, 7)
    torch.manual_seed(2)
    x = torch.randn(2, 16, 16)
    caches: list[FirstBlockCache] = []
    with torch.inference_mode():
        v = guided_velocity(pipe, r, 2, 8, 8, caches=caches, ts=ts)
        for t in ts[:-1]:  # steps 0, 1 alone, 2, 3 guided, 4, 5 alone
            v(x, t.expand(2))
    alone = next(c for c in caches if c.row_full is not None and c.row_full.shape == (2,))
    assert alone.row_calls == 4
    assert alone.row_full.tolist() == [2, 2]  # steps 0 and 4 in full; 1 and 5 reuse (threshold 1)


def test_the_first_block_cache_counts_the_passes_that_ran(pipe: Pipeline) -> None:
    """Steps without the negative pass keep a cache of their own; each image counts the passes it made."""
    images = _generate(pipe, GuidanceMethod(stop=0.5), cache_threshold=0.2, steps=4)
    assert [g.record["cache_passes"]["total"] for g in images] == [6, 6]  # 2 guided steps x 2 + 2 x 1
    for g in images:
        assert np.array_equal(_px(reproduce(pipe, g.record)), _px(g))


@pytest.mark.parametrize(
    ("method", "kw", "words"),
    [
        (GuidanceMethod("apg"), {"guidance": 1.0, "negative_prompt": ""}, "off at guidance 1"),
        (GuidanceMethod(start=0.5, stop=0.6), {"steps": 4}, "holds none of the 4 steps of the sampler run"),
        (GuidanceMethod("cfg-zero-star", zero_init_steps=4), {"steps": 4}, "zero every one of the 4 steps"),
        (GuidanceMethod(stop=0.3), {"steps": 8, "hires_scale": 1.5, "hires_steps": 3}, "hires fix's second"),
    ],
)
def test_refusals_say_what_to_do(
    pipe: Pipeline, method: GuidanceMethod, kw: dict[str, Any], words: str
) -> None:
    with pytest.raises(GenerationError, match=words):
        _generate(pipe, method, **kw)


def test_a_distilled_model_refuses_a_method(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipe, "guidance_mode", "distilled")
    with pytest.raises(GenerationError, match=r"guidance-distilled .* drop the guidance method"):
        _generate(pipe, GuidanceMethod(rescale=0.5), negative_prompt="")
    _generate(pipe, GuidanceMethod(), negative_prompt="", num_images=1)  # plain CFG is no method


# -------------------------------------------------------------------------- command line, grid, settings


def test_the_command_line_settings_from_and_errors(
    capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path
) -> None:
    base = ["--model", str(bundle), "--steps", "4", "--device", "cpu", "--seed", "3", "--negative", "blue"]
    code, _, err = cli(
        capsys, "generate", "a red circle", *base, "--guidance-method", "apg", "--apg-eta", "0.5",
        "--apg-momentum", "-0.5", "--guidance-interval", "0", "0.75", "--sampler", "heun", "-o",
        str(tmp_path / "a"),
    )  # fmt: skip
    assert code == 0, err
    (png,) = (tmp_path / "a").glob("*.png")
    want = GuidanceMethod("apg", eta=0.5, momentum=-0.5, stop=0.75).record()
    assert read_record(png)["guidance_method"] == want
    code, _, err = cli(capsys, "generate", "--settings-from", str(png), "--model", str(bundle), "--device",
                       "cpu", "-o", str(tmp_path / "b"))  # fmt: skip
    assert code == 0, err
    (again,) = (tmp_path / "b").glob("*.png")
    assert read_record(again)["guidance_method"] == want
    assert np.array_equal(np.asarray(_open(again)), np.asarray(_open(png)))
    for args, words in (
        (["--apg-eta", "0.5"], "--apg-eta is a setting of --guidance-method apg"),
        (["--guidance-method", "cfg-zero-star", "--apg-momentum", "0.1"], "--apg-momentum is a setting"),
        (["--guidance-rescale", "2"], "--guidance-rescale: guidance rescale (rescale) must be"),
        (["--guidance-interval", "0.5", "0.2"], "--guidance-interval: guidance interval start 0.5"),
        (["--guidance-method", "tcfg", "--guidance", "1", "--negative", ""], "off at guidance 1"),
    ):
        code, _, err = cli(capsys, "generate", "x", *base, *args, "-o", str(tmp_path / "c"))
        assert code != 0 and words in err, (args, err)
    code, _, err = cli(capsys, "edit", str(png), "a red circle", "--strength", "0.5", *base,
                       "--guidance-method", "tcfg", "-o", str(tmp_path / "d"))  # fmt: skip
    assert code == 0, err
    (edited,) = (tmp_path / "d").glob("*.png")
    assert read_record(edited)["guidance_method"]["method"] == "tcfg"


def _open(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB").copy()


def test_a_grid_cell_sets_its_interval_whole() -> None:
    """A cell's start and stop axes apply together: a start below the cell's stop is fine even where it is
    not below the request's stop, in either axis order."""
    request = GenerationRequest("x", guidance=4.0, guidance_method=GuidanceMethod(start=0.8))
    for x, y in (
        ("guidance-stop=0.5,1", "guidance-start=0.1,0.2"),
        ("guidance-start=0.1,0.2", "guidance-stop=0.5,1"),
    ):
        cells = plan_grid(request, x, y).cells
        got = sorted((c.request.guidance_method.start, c.request.guidance_method.stop) for c in cells)  # type: ignore[union-attr]
        assert got == [(0.1, 0.5), (0.1, 1.0), (0.2, 0.5), (0.2, 1.0)]
    with pytest.raises(GridError, match=r"start 0\.6 must be below its stop 0\.5"):
        plan_grid(request, "guidance-stop=0.5,1", "guidance-start=0.1,0.6")


def test_grid_axes(pipe: Pipeline, capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path) -> None:
    request = GenerationRequest("a red circle", negative_prompt="blue", steps=4, seed=3)
    plan = plan_grid(request, "guidance-method=cfg,apg", "guidance-rescale=0,0.7")
    methods = [c.request.guidance_method for c in plan.cells]
    assert methods[0] == GuidanceMethod() and methods[3] == GuidanceMethod("apg", rescale=0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_plan(pipe, plan)
    cell = plan.cell(1, 1)
    assert cell.image is not None and cell.image.record["guidance_method"]["method"] == "apg"
    (alone,) = _generate(pipe, GuidanceMethod("apg", rescale=0.7), seed=3, num_images=1)
    assert np.array_equal(_px(cell.image), _px(alone))
    assert "guidance_method" not in plan.cell(0, 0).image.record  # type: ignore[union-attr]
    assert result.plan is plan
    with pytest.raises(GridError, match="no cell uses APG"):
        plan_grid(request, "apg-eta=0,1")
    with pytest.raises(GridError, match=r"start 0\.5 must be below its stop 0\.5"):
        plan_grid(replace(request, guidance_method=GuidanceMethod(start=0.5)), "guidance-stop=1,0.5")
    out = tmp_path / "grid"
    code, _, err = cli(
        capsys, "grid", "a red circle", "--x", "guidance-method=cfg,apg", "--apg-eta", "0.5", "--model",
        str(bundle), "--steps", "2", "--device", "cpu", "--negative", "blue", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    cells = json.loads((out / "grid.json").read_text())["cells"]
    assert "guidance_method" not in cells[0]["generation"]
    assert cells[1]["generation"]["guidance_method"]["eta"] == 0.5
