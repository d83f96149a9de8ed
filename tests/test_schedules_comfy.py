"""ComfyUI's kl_optimal, linear_quadratic and normal schedulers as pictor schedules: against transcriptions of
their published formulas written here, against the sigmas ComfyUI computes for a FLUX.1 model (its
ModelSamplingFlux table, worked out below), their img2img rule, and through the pipeline: recorded,
reproduced, and read back from A1111's text and ComfyUI's graph."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import pictor
from pictor import sampling as S
from pictor.cli import main
from pictor.flow import resolution_mu, time_shift
from pictor.grid_axes import GridError, parse_axis
from pictor.pipeline import GenerationRequest, Pipeline
from pictor.provenance import parameters_text, read_record, save_png
from pictor.reproduce import reproduce
from pictor.serve.a1111_names import schedule_of, scheduler_list
from pictor.settings_import import settings_from_parameters
from tests.test_comfy_workflow_import import comfy, flux_custom_graph

NEW = ("kl_optimal", "linear_quadratic", "normal")


def comfy_flux_sigma_range(width: int, height: int, node: bool = True) -> tuple[float, float, float]:
    """(mu, sigma_min, sigma_max) of ComfyUI's FLUX.1 [dev] model sampling, in float32 as ComfyUI holds them.

    ComfyUI tabulates sigma(t) = e^mu / (e^mu + 1/t - 1) at t = 1/10000, 2/10000, ..., 1 (float32) and reads
    its ends. mu is 1.15 (the model's own) without a ModelSamplingFlux node; the node at its defaults
    (max_shift 1.15, base_shift 0.5) makes it linear in the latent patches, width * height / 256: 0.5 at 256
    and 1.15 at 4096.
    """
    if node:
        slope = (1.15 - 0.5) / (4096 - 256)
        mu = width * height / 256 * slope + (0.5 - slope * 256)
    else:
        mu = 1.15
    t = torch.arange(1, 10_001, dtype=torch.int64) / 10_000  # float32, as ComfyUI divides
    table = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    assert table.dtype == torch.float32
    return mu, float(table[0]), float(table[-1])


def kl_optimal_float32(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The KL-optimal sigmas as ComfyUI evaluates them, in float32: fraction f_i = i / (n - 1), angle
    (1 - f_i) atan(sigma_max) + f_i atan(sigma_min), sigma_i = tan(angle), then a 0."""
    f = torch.tensor([i for i in range(n)], dtype=torch.float32) / (n - 1)
    angle = f * math.atan(sigma_min) + (1 - f) * math.atan(sigma_max)
    return torch.cat([torch.tan(angle), torch.zeros(1)])


def kl_optimal_exact(n: int, sigma_min: float, sigma_max: float) -> list[float]:
    """The same from the paper ("Align Your Steps", Sabour et al. 2024: the KL-optimal schedule), element by
    element in float64: sigma_i = tan(atan(sigma_max) + i / (n - 1) (atan(sigma_min) - atan(sigma_max)))."""
    hi, lo = math.atan(sigma_max), math.atan(sigma_min)
    return [math.tan(hi + (i / (n - 1) if n > 1 else 0.0) * (lo - hi)) for i in range(n)] + [0.0]


def normal_float32(n: int, mu: float, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """ComfyUI's normal scheduler on FLUX.1, in float32: n timesteps evenly from timestep(sigma_max) to
    timestep(sigma_min), where FLUX.1's model sampling takes a sigma as its timestep, each turned into a sigma
    by its shift e^mu / (e^mu + 1/t - 1); then 0 (its sigma at sigma_min is far from 0)."""
    times = torch.linspace(torch.tensor(sigma_max), torch.tensor(sigma_min), n)
    assert times.dtype == torch.float32
    sigmas = [float(math.exp(mu) / (math.exp(mu) + (1 / t - 1))) for t in times]
    return torch.tensor([*sigmas, 0.0])


def linear_quadratic_published(
    steps: int, threshold: float = 0.025, linear: int | None = None
) -> list[float]:
    """genmoai's Mochi `linear_quadratic_schedule` (src/mochi_preview/infer.py), as ComfyUI runs it, written
    out: the noise removed after step i is i * threshold / L for i < L (L = steps // 2 by default), then a
    quadratic in i through (L, threshold) with that slope and (steps, 1); sigma = 1 - removed."""
    if steps == 1:
        return [1.0, 0.0]
    big_l = steps // 2 if linear is None else linear
    quad_steps = steps - big_l
    step_diff = big_l - threshold * steps
    q_coef = step_diff / (big_l * quad_steps**2)
    l_coef = threshold / big_l - 2 * step_diff / (quad_steps**2)
    const = q_coef * (big_l**2)
    removed = [i * threshold / big_l for i in range(big_l)]
    removed += [q_coef * (i**2) + l_coef * i + const for i in range(big_l, steps)]
    return [1.0 - x for x in [*removed, 1.0]]


# kl_optimal


@pytest.mark.parametrize("size", [(1024, 1024), (512, 512), (768, 1344), (64, 48), (2048, 2048)])
@pytest.mark.parametrize("steps", [2, 3, 4, 10, 20, 50])
def test_kl_optimal_is_comfyui_on_flux_with_model_sampling_flux(size: tuple[int, int], steps: int) -> None:
    # ComfyUI's FLUX.1 with a ModelSamplingFlux node at its defaults for the image's size: pictor's
    # resolution shift. Measured max |difference| 2.4e-7 over 2 to 100 steps at these sizes, a few float32
    # steps near 1 (ComfyUI works in float32, tan and atan included; pictor in float64).
    width, height = size
    seq = (width // 16) * (height // 16)
    mu, smin, smax = comfy_flux_sigma_range(width, height)
    assert mu == pytest.approx(resolution_mu(seq), abs=1e-12)
    assert 1.0 - smax <= 6e-8  # 1, or float32's next below for some shifts (64x48's): see below
    ts = S.get_schedule("kl_optimal", steps, image_seq_len=seq)
    assert ts.dtype == torch.float32 and ts.shape == (steps + 1,)
    torch.testing.assert_close(ts, kl_optimal_float32(steps, smin, smax), atol=3e-7, rtol=0)
    exact = torch.tensor(kl_optimal_exact(steps, smin, smax), dtype=torch.float64)
    torch.testing.assert_close(ts.double(), exact, atol=1e-7, rtol=1e-6)
    assert ts[0].item() == 1.0 and ts[-1].item() == 0.0 and bool((ts.diff() < 0).all())


@pytest.mark.parametrize("steps", [2, 4, 20])
def test_kl_optimal_is_comfyui_without_the_node_at_1024(steps: int) -> None:
    # Without ModelSamplingFlux ComfyUI shifts FLUX.1 [dev] by 1.15 at every size: pictor's mu at 4096 tokens.
    _, smin, smax = comfy_flux_sigma_range(1024, 1024, node=False)
    ours, theirs = S.schedule_kl_optimal(steps, 4096), kl_optimal_float32(steps, smin, smax)
    torch.testing.assert_close(ours, theirs, atol=3e-7, rtol=0)
    _, other, _ = comfy_flux_sigma_range(512, 512, node=False)  # elsewhere only sigma_min differs
    assert S.schedule_kl_optimal(steps, 1024)[-2].item() != pytest.approx(other, rel=1e-3)


def test_kl_optimal_shape_steps_1_and_2() -> None:
    seq = 1024
    mu = resolution_mu(seq)
    sigma_min = time_shift(mu, 1.0, 1e-4)
    ts = S.schedule_kl_optimal(12, seq).double()
    angles = ts[:-1].atan()  # evenly spaced in arctan(sigma), from atan(1) to atan(sigma_min)
    torch.testing.assert_close(angles.diff(), angles.diff().mean().expand(11), atol=1e-7, rtol=0)
    assert ts[-2].item() == pytest.approx(sigma_min, rel=1e-6)
    # One step: [1, 0] (ComfyUI's formula divides by n - 1 = 0 and gives NaN); two: [1, sigma_min, 0].
    assert S.schedule_kl_optimal(1, seq).tolist() == [1.0, 0.0]
    assert bool(kl_optimal_float32(1, sigma_min, 1.0)[0].isnan())
    two = S.schedule_kl_optimal(2, seq)
    assert two[0].item() == 1.0 and two[1].item() == pytest.approx(sigma_min, rel=1e-6) and two[2] == 0
    # Larger images: a larger shift, a larger sigma_min; kl_optimal is otherwise not shifted.
    assert S.schedule_kl_optimal(12, 4096)[-2] > S.schedule_kl_optimal(12, 256)[-2]


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 20])
@pytest.mark.parametrize("start", [0.9, 0.5, 0.05])
def test_kl_optimal_img2img_scales_the_table_onto_the_strength(steps: int, start: float) -> None:
    # As karras / exponential / beta: the table's unshifted times scaled onto [0, u_start], u_start shifting
    # onto start, so sigma_max = start and sigma_min = time_shift(mu, u_start / 10000).
    seq = 1024
    mu = resolution_mu(seq)
    u_start = time_shift(-mu, 1.0, start)
    assert time_shift(mu, 1.0, u_start) == pytest.approx(start, rel=1e-12)
    sigma_min = time_shift(mu, 1.0, u_start / 10_000)
    ts = S.get_schedule("kl_optimal", steps, image_seq_len=seq, start=start)
    exact = torch.tensor(kl_optimal_exact(steps, sigma_min, start), dtype=torch.float64)
    torch.testing.assert_close(ts.double(), exact, atol=1e-7, rtol=1e-6)
    assert ts.shape == (steps + 1,) and ts[0].item() == torch.tensor(start).item() and ts[-1].item() == 0.0
    assert bool((ts.diff() < 0).all())


# linear_quadratic


@pytest.mark.parametrize("steps", [*range(1, 61), 100, 333])
def test_linear_quadratic_is_comfyuis_bit_for_bit(steps: int) -> None:
    # ComfyUI computes Mochi's list in float64, rounds it to float32 and multiplies it by the model's
    # sigma_max. That is 1.0 in FLUX.1's table at most shifts, and there its sigmas are pictor's bit for bit;
    # at some (64x48's mu 0.459) its float32 e^mu / e^mu rounds to 0.99999994, one float32 step below.
    ref = torch.tensor(linear_quadratic_published(steps), dtype=torch.float64).float()
    for width, height, node in [(1024, 1024, False), (512, 768, True), (2048, 2048, True), (64, 48, True)]:
        sigma_max = comfy_flux_sigma_range(width, height, node)[2]
        seq = (width // 16) * (height // 16)
        ts = S.get_schedule("linear_quadratic", steps, image_seq_len=seq)
        assert ts.dtype == torch.float32 and torch.equal(ts, ref)
        comfy = ref * torch.tensor(sigma_max, dtype=torch.float32)
        if (width, height) == (64, 48):
            assert sigma_max < 1.0 and (ts - comfy).abs().max().item() <= 6e-8
        else:
            assert sigma_max == 1.0 and torch.equal(ts, comfy)
    assert bool((ref.diff() < 0).all()) and ref[0].item() == 1.0 and ref[-1].item() == 0.0


def test_linear_quadratic_is_linear_then_the_quadratic_that_continues_it() -> None:
    # An independent check of the shape: solve for the quadratic from its three conditions.
    for steps, threshold, linear in [(20, 0.025, None), (9, 0.025, None), (30, 0.1, 5), (12, 0.05, 11)]:
        big_l = steps // 2 if linear is None else linear
        ts = S.schedule_linear_quadratic(steps, threshold_noise=threshold, linear_steps=linear)
        removed = 1.0 - ts.double().numpy()
        np.testing.assert_allclose(removed[:big_l], np.arange(big_l) * threshold / big_l, atol=1e-7)
        # a L^2 + b L + c = threshold, 2 a L + b = threshold / L, a N^2 + b N + c = 1
        system = np.array([[big_l**2, big_l, 1], [2 * big_l, 1, 0], [steps**2, steps, 1]], dtype=np.float64)
        a, b, c = np.linalg.solve(system, [threshold, threshold / big_l, 1.0])
        i = np.arange(big_l, steps + 1)
        np.testing.assert_allclose(removed[big_l:], a * i**2 + b * i + c, atol=1e-7)
        ref = linear_quadratic_published(steps, threshold, linear)
        assert torch.equal(
            S.schedule_linear_quadratic(steps, threshold_noise=threshold, linear_steps=linear),
            torch.tensor(ref, dtype=torch.float64).float(),
        )


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 20])
@pytest.mark.parametrize("start", [0.9, 0.5, 0.05])
def test_linear_quadratic_img2img_is_scaled_by_the_strength(steps: int, start: float) -> None:
    # Unshifted, so sigma_max = start scales it: all N steps in [0, start], the same shape.
    ts = S.get_schedule("linear_quadratic", steps, image_seq_len=1024, start=start)
    ref = torch.tensor([start * x for x in linear_quadratic_published(steps)], dtype=torch.float64).float()
    assert torch.equal(ts, ref)
    assert ts[0].item() == torch.tensor(start).item() and ts[-1].item() == 0.0
    assert bool((ts.diff() < 0).all())


def test_linear_quadratic_steps_1_and_2_and_bad_settings() -> None:
    assert S.schedule_linear_quadratic(1).tolist() == [1.0, 0.0]
    # 2 steps: L = 1, so the first step takes threshold_noise (0.025) off and the second the rest.
    torch.testing.assert_close(S.schedule_linear_quadratic(2), torch.tensor([1.0, 0.975, 0.0]))
    with pytest.raises(ValueError, match="threshold_noise"):
        S.schedule_linear_quadratic(8, threshold_noise=1.0)
    with pytest.raises(ValueError, match="linear_steps"):
        S.schedule_linear_quadratic(8, linear_steps=8)
    with pytest.raises(ValueError, match="linear_steps"):
        S.schedule_linear_quadratic(8, linear_steps=0)
    with pytest.raises(ValueError, match="keeps falling"):  # a steep linear part: the quadratic turns back
        S.schedule_linear_quadratic(10, threshold_noise=0.9, linear_steps=1)


# normal


@pytest.mark.parametrize("size", [(1024, 1024), (512, 512), (768, 1344), (64, 48), (2048, 2048)])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 20, 50])
def test_normal_is_comfyui_on_flux(size: tuple[int, int], steps: int) -> None:
    # With ModelSamplingFlux at its defaults for the size (and without it at 1024x1024: mu 1.15 either way).
    width, height = size
    seq = (width // 16) * (height // 16)
    for node in (True, False) if size == (1024, 1024) else (True,):
        mu, smin, smax = comfy_flux_sigma_range(width, height, node)
        ts = S.get_schedule("normal", steps, image_seq_len=seq)
        assert ts.dtype == torch.float32 and ts.shape == (steps + 1,)
        torch.testing.assert_close(ts, normal_float32(steps, mu, smin, smax), atol=3e-7, rtol=0)
        # from the description, in float64: evenly in unshifted time from 1 to sigma_min, shifted, then 0
        end = time_shift(mu, 1.0, 1e-4)
        exact = [time_shift(mu, 1.0, float(u)) for u in np.linspace(1.0, end, steps)] + [0.0]
        torch.testing.assert_close(ts.double(), torch.tensor(exact, dtype=torch.float64), atol=1e-7, rtol=0)
        assert ts[0].item() == 1.0 and ts[-1].item() == 0.0 and bool((ts.diff() < 0).all())


def test_normal_differs_from_flux_by_its_last_step() -> None:
    # ComfyUI's simple is pictor's flux (N + 1 times evenly down to 0); normal's N times end near 0, at the
    # shifted sigma_min (1e-3 at mu 1.15), and one more step goes to 0: 0.51 apart at 4 steps.
    normal, flux = S.schedule_normal(4, 4096), S.schedule_flux(4, 4096)
    assert (normal - flux).abs().max().item() == pytest.approx(0.51, abs=0.01)
    assert normal[-2].item() == pytest.approx(time_shift(1.15, 1.0, time_shift(1.15, 1.0, 1e-4)), rel=1e-5)
    assert S.schedule_normal(1, 4096).tolist() == [1.0, 0.0]
    assert S.schedule_normal(2, 4096)[1].item() == pytest.approx(9.97e-4, rel=1e-3)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 20])
@pytest.mark.parametrize("start", [0.9, 0.5, 0.05])
def test_normal_img2img_scales_the_unshifted_span_onto_the_strength(steps: int, start: float) -> None:
    # As flux: the unshifted span [sigma_min, 1] scaled onto [0, u_start], u_start shifting onto start.
    seq = 1024
    mu = resolution_mu(seq)
    u_start = time_shift(-mu, 1.0, start)
    span = np.linspace(u_start, u_start * time_shift(mu, 1.0, 1e-4), steps)
    exact = [time_shift(mu, 1.0, float(u)) for u in span] + [0.0]
    ts = S.get_schedule("normal", steps, image_seq_len=seq, start=start)
    torch.testing.assert_close(ts.double(), torch.tensor(exact, dtype=torch.float64), atol=1e-7, rtol=0)
    assert ts[0].item() == torch.tensor(start).item() and ts[-1].item() == 0.0
    assert bool((ts.diff() < 0).all())


# all three


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 300])
@pytest.mark.parametrize("seq", [1, 256, 4096, 16384])
@pytest.mark.parametrize("start", [1.0, 0.3, 1e-3])
def test_new_schedules_decrease_from_start_to_zero(name: str, steps: int, seq: int, start: float) -> None:
    ts = S.get_schedule(name, steps, image_seq_len=seq, start=start)
    assert ts.dtype == torch.float32 and ts.shape == (steps + 1,)
    assert ts[0].item() == torch.tensor(start).item() and ts[-1].item() == 0.0
    assert bool((ts.diff() < 0).all())


def test_new_schedules_are_known_and_refuse_bad_input() -> None:
    assert set(NEW) <= set(S.SCHEDULES)
    for name in NEW:
        with pytest.raises(ValueError, match="steps"):
            S.get_schedule(name, 0, 256)
        with pytest.raises(ValueError, match="start"):
            S.get_schedule(name, 4, 256, start=1.5)


# through the pipeline


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    with pytest.warns(UserWarning, match="UNTRAINED"):
        return pictor.load("tiny", device="cpu")


@pytest.mark.parametrize("schedule", NEW)
def test_images_with_the_new_schedules_are_recorded_and_reproduce(
    pipe: Pipeline, schedule: str, tmp_path: Path
) -> None:
    (image,) = pipe.generate(GenerationRequest("two yellow stars", seed=5, steps=4, schedule=schedule))
    (plain,) = pipe.generate(GenerationRequest("two yellow stars", seed=5, steps=4))  # the model's flux
    assert np.abs(np.asarray(image.image, np.int16) - np.asarray(plain.image, np.int16)).mean() > 0.5
    record = image.record
    assert record["schedule"] == schedule
    assert f"Schedule type: {schedule}," in parameters_text(record)  # A1111 reads its own names there too
    saved = save_png(image.image, record, tmp_path / "x.png")
    again = reproduce(pipe, read_record(saved))
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(image.image))
    # A1111's text alone (no pictor record) gives the same schedule, and the same pixels.
    taken = settings_from_parameters(parameters_text(record)).values
    assert taken["schedule"] == schedule
    width, height = taken["size"]
    from_text = pipe.generate(
        GenerationRequest(
            taken["prompt"],
            negative_prompt=taken["negative"],
            width=width,
            height=height,
            steps=taken["steps"],
            seed=taken["seed"],
            guidance=taken["guidance"],
            sampler=taken["sampler"],
            schedule=taken["schedule"],
            prompt_weights=taken["prompt_weights"],
        )
    )
    np.testing.assert_array_equal(np.asarray(from_text[0].image), np.asarray(image.image))


@pytest.mark.parametrize(
    ("shown", "schedule"),
    [
        ("KL Optimal", "kl_optimal"),  # A1111 1.9's label
        ("kl_optimal", "kl_optimal"),  # its name, which its own reader takes too
        ("Linear Quadratic", "linear_quadratic"),  # no A1111 schedule: the label other tools write
        ("linear_quadratic", "linear_quadratic"),
        ("Normal", "normal"),
        ("normal", "normal"),
    ],
)
def test_a1111_schedule_types_of_the_new_schedules(shown: str, schedule: str) -> None:
    text = f"a red circle\nSteps: 9, Sampler: Euler, Schedule type: {shown}, CFG scale: 4, Size: 64x64"
    got = settings_from_parameters(text)
    assert got.values["schedule"] == schedule and got.values["sampler"] == "euler"
    said = [n for n in got.notices if "schedule" in n]
    if shown == "KL Optimal":  # A1111's own KL Optimal ends at sigma_min without a step to 0: said
        assert said == [
            "the image's schedule type KL Optimal is taken as pictor's kl_optimal (ComfyUI's), which "
            "differs: A1111's spaces all its steps evenly in arctan(sigma) down to the model's smallest "
            "sigma and ends there, ComfyUI's and pictor's all but the last, which steps to 0 (most different "
            "at few steps)"
        ]
    else:  # pictor's own names (what pictor writes), and the others'
        assert said == []
    # The A1111-compatible server takes the same in its scheduler field and lists them.
    assert schedule_of(shown) == schedule
    assert (schedule, shown) in {(s["name"], s["label"]) for s in scheduler_list()} or shown == schedule


@pytest.mark.parametrize("scheduler", NEW)
def test_a_comfyui_graph_with_the_new_schedulers_runs_comfyuis_sigmas(scheduler: str) -> None:
    """ComfyUI's FLUX.1 [dev] example (SamplerCustomAdvanced, BasicScheduler, ModelSamplingFlux at its
    defaults for 1024x768) with kl_optimal, linear_quadratic or normal: taken without a notice, and the
    schedule pictor then runs is the one ComfyUI worked out for the graph."""
    graph = flux_custom_graph()
    graph["17"]["inputs"]["scheduler"] = scheduler
    got = comfy(graph)
    assert got.values["schedule"] == scheduler
    assert not [n for n in got.notices if "schedul" in n or "shift" in n]
    steps, (width, height) = got.values["steps"], got.values["size"]
    ours = S.get_schedule(scheduler, steps, image_seq_len=(width // 16) * (height // 16))
    _, smin, smax = comfy_flux_sigma_range(width, height)
    if scheduler == "kl_optimal":
        theirs = kl_optimal_float32(steps, smin, smax)
    elif scheduler == "normal":
        theirs = normal_float32(steps, resolution_mu((width // 16) * (height // 16)), smin, smax)
    else:
        theirs = torch.tensor(linear_quadratic_published(steps), dtype=torch.float64).float() * smax
    torch.testing.assert_close(ours, theirs, atol=3e-7, rtol=0)


def test_the_command_line_and_grid_axis_take_the_new_schedules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_axis("schedule=kl_optimal, linear_quadratic, normal").values == NEW
    with pytest.raises(GridError, match=r"choose one of .*kl_optimal, linear_quadratic"):
        parse_axis("schedule=kl_optimal,kl")
    args = ["generate", "a green star", "--model", "tiny", "--steps", "3", "--size", "32x32"]
    assert main([*args, "--schedule", "linear_quadratic", "-o", str(tmp_path)]) == 0
    assert read_record(Path(capsys.readouterr().out.split()[0]))["schedule"] == "linear_quadratic"
