"""The CFG++ samplers through Pipeline (tiny random weights): generation, inpainting, reproduction from PNG
metadata; the unconditional prediction they read (the negative pass's raw one, under any guidance method);
the negative pass at guidance 1; and the requests that have none, refused."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.editing import EditRequest
from pictor.generation_request import GenerationRequest
from pictor.guidance_methods import GuidanceMethod
from pictor.guided_velocity import guided_velocity
from pictor.loading import load
from pictor.pipeline import Pipeline
from pictor.provenance import parameters_text, read_record, save_png
from pictor.reproduce import reproduce
from pictor.sampling import CFG_PP_SAMPLERS, get_schedule
from pictor.sampling_steps import UNCOND

from tiny_bundle import saved_tiny_bundle

CFG_PP = sorted(CFG_PP_SAMPLERS)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return load(str(saved_tiny_bundle(tmp_path_factory.mktemp("cfgpp"), "tiny-cfg-pp")), device="cpu")


def _px(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _generate(pipe: Pipeline, **kw: Any) -> list[Any]:
    settings = {"seed": 5, "steps": 4, "width": 32, "height": 32, "negative_prompt": "blue", "guidance": 4.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny encoder's notices about its vocabulary
        return pipe.generate(GenerationRequest("a red circle", **{**settings, **kw}))


def _reproduces(pipe: Pipeline, image: Image.Image, record: dict, path: Path, **sources: object) -> None:
    saved = save_png(image, record, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = reproduce(pipe, read_record(saved), **sources)  # type: ignore[arg-type]
    np.testing.assert_array_equal(np.asarray(Image.open(saved)), np.asarray(again.image))


@pytest.mark.parametrize("sampler", CFG_PP)
def test_generates_and_reproduces(pipe: Pipeline, sampler: str, tmp_path: Path) -> None:
    out = _generate(pipe, sampler=sampler)[0]
    assert out.record["sampler"] == sampler
    plain = {"euler_ancestral_cfg_pp": "euler_ancestral"}.get(sampler, sampler.removesuffix("_cfg_pp"))
    other = _generate(pipe, sampler=plain)[0]
    assert not np.array_equal(_px(out.image), _px(other.image))  # CFG++ is not the plain sampler
    _reproduces(pipe, out.image, out.record, tmp_path / "a.png")
    assert "Sampler: " + {"euler_cfg_pp": "Euler CFG++"}.get(sampler, "") in parameters_text(out.record) or (
        sampler != "euler_cfg_pp"
    )


@pytest.mark.parametrize("sampler", ["euler_cfg_pp", "euler_ancestral_cfg_pp"])
def test_inpainting_keeps_the_outside_and_reproduces(pipe: Pipeline, sampler: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    src = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask_px = np.zeros((32, 32), np.uint8)
    mask_px[4:20, 6:26] = 255
    mask = Image.fromarray(mask_px)
    src.save(tmp_path / "src.png")
    mask.save(tmp_path / "mask.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe.edit(
            EditRequest(
                src, "a red circle", negative_prompt="blue", guidance=4.0, mask=mask, strength=0.8, seed=3,
                steps=4, sampler=sampler,
            )
        )  # fmt: skip
    keep = mask_px == 0
    np.testing.assert_array_equal(_px(out[0].image)[keep], _px(src)[keep])
    assert np.abs(_px(out[0].image)[~keep] - _px(src)[~keep]).mean() > 5
    _reproduces(
        pipe, out[0].image, out[0].record, tmp_path / "edit.png", source=tmp_path / "src.png",
        mask=tmp_path / "mask.png",
    )  # fmt: skip


def test_the_edit_blends_the_unconditional_velocity_too(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the sampler's unconditional velocity is the edit's blended one: in the known region it is the guided
    # one's (the path's), so CFG++ takes the plain step there
    import pictor.sampling as S

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = S.SAMPLERS["euler_cfg_pp"]

    def spy(fn: Any, x: torch.Tensor, ts: torch.Tensor, callback: Any = None, **kw: Any) -> torch.Tensor:
        tb = torch.full((x.shape[0],), float(ts[0]), dtype=torch.float32)
        v = fn(x, tb)
        seen.append((v, getattr(fn, UNCOND)(x, tb)))
        return real(fn, x, ts, callback, **kw)

    monkeypatch.setitem(S.SAMPLERS, "euler_cfg_pp", spy)
    src = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask_px = np.zeros((32, 32), np.uint8)
    mask_px[0:16, :] = 255
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.edit(
            EditRequest(
                src, "a red circle", negative_prompt="blue", guidance=4.0, mask=Image.fromarray(mask_px),
                strength=0.8, seed=3, steps=3, sampler="euler_cfg_pp",
            )
        )  # fmt: skip
    v, u = seen[0]
    same = (v == u).all(dim=-1)  # [B, N]: tokens where the two agree
    assert same.any() and not same.all()  # the known half agrees, the generated half does not


def test_guidance_1_still_runs_the_negative_pass(pipe: Pipeline, tmp_path: Path) -> None:
    # as ComfyUI's disable_cfg1_optimization: at guidance 1 the step is the prompt's and the renoise the
    # empty negative prompt's, so it is not plain Euler (which runs the prompt's pass alone)
    a = _generate(pipe, sampler="euler_cfg_pp", guidance=1.0, negative_prompt="")[0]
    c = _generate(pipe, sampler="euler", guidance=1.0, negative_prompt="")[0]
    assert not np.array_equal(_px(a.image), _px(c.image))
    _reproduces(pipe, a.image, a.record, tmp_path / "g1.png")
    ts = get_schedule("flux", 4, image_seq_len=16)
    fn = _velocity(pipe, ts, sampler="euler_cfg_pp", guidance=1.0, negative_prompt="")
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = _velocity(pipe, ts, sampler="euler", guidance=1.0, negative_prompt="")
    empty = _velocity(pipe, ts, sampler="euler", prompt="", negative_prompt="", guidance=1.0)
    t = torch.full((2,), 0.8)
    with torch.inference_mode():
        torch.testing.assert_close(fn(x, t), cond(x, t), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(getattr(fn, UNCOND)(x, t), empty(x, t), rtol=1e-4, atol=1e-5)
    assert not hasattr(cond, UNCOND)  # plain Euler at guidance 1: no negative pass


def _velocity(pipe: Pipeline, ts: torch.Tensor, **kw: Any) -> Any:
    settings = {"width": 32, "height": 32, "steps": 4, "seed": 1, "negative_prompt": "blue", "guidance": 4.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prompt = kw.pop("prompt", "a red circle")
        r = pipe.resolve_request(GenerationRequest(prompt, **{**settings, **kw}))
        return guided_velocity(pipe, r, 2, 8, 8, ts=ts)


@pytest.mark.parametrize(
    "method",
    [
        GuidanceMethod("apg", eta=0.3, norm_threshold=2.0),
        GuidanceMethod("cfg-zero-star", zero_init_steps=1),
        GuidanceMethod("tcfg"),
        GuidanceMethod(rescale=0.7),
    ],
)
def test_guidance_methods_guide_and_the_renoise_is_the_raw_negative_prediction(
    pipe: Pipeline, method: GuidanceMethod
) -> None:
    # ComfyUI's CFG++ samplers read the hook's uncond_denoised: the model's own, whatever made the guided one
    ts = get_schedule("flux", 4, image_seq_len=16).to(pipe.device)
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0)).to(pipe.dtype)
    fn = _velocity(pipe, ts, sampler="euler_cfg_pp", guidance_method=method)
    plain = _velocity(pipe, ts, sampler="euler_cfg_pp")
    negative = _velocity(pipe, ts, sampler="euler", prompt="blue", negative_prompt="", guidance=1.0)
    with torch.inference_mode():
        for i in range(2):
            t = torch.full((2,), float(ts[i]))
            v, u = fn(x, t), getattr(fn, UNCOND)(x, t)
            v_plain, u_plain = plain(x, t), getattr(plain, UNCOND)(x, t)
            if method.method == "cfg-zero-star" and i == 0:  # zeroed: no call, both zero
                assert not v.any() and not u.any()
                continue
            torch.testing.assert_close(u, u_plain)
            torch.testing.assert_close(u, negative(x, t), rtol=1e-4, atol=1e-5)
            assert (v - v_plain).abs().max() > 1e-4  # the method made the guided one


def test_refusals(pipe: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"euler_cfg_pp is a CFG\+\+ sampler.*guidance interval 0.25-1"):
        _generate(pipe, sampler="euler_cfg_pp", guidance_method=GuidanceMethod(start=0.25))
    monkeypatch.setattr(pipe, "guidance_mode", "distilled")
    with pytest.raises(ValueError, match=r"dpmpp_2m_cfg_pp is a CFG\+\+ sampler.*guidance-distilled"):
        _generate(pipe, sampler="dpmpp_2m_cfg_pp", negative_prompt="", guidance=3.5)


def test_refused_when_the_request_is_resolved_and_named_for_the_server(
    pipe: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused by request resolution, before anything runs or a server queues the job, and the server's
    error names the `sampler` field."""
    from pictor.generation_request import GenerationError
    from pictor.serve.pipeline_errors import field_of

    settings = {"width": 32, "height": 32, "steps": 4, "sampler": "euler_cfg_pp"}
    with pytest.raises(GenerationError, match=r"guidance interval 0\.25-1") as refused:
        pipe.resolve_request(GenerationRequest("a", **settings, guidance_method=GuidanceMethod(start=0.25)))
    assert field_of(str(refused.value)) == "sampler"
    monkeypatch.setattr(pipe, "guidance_mode", "distilled")
    with pytest.raises(GenerationError, match="guidance-distilled"):
        pipe.resolve_request(GenerationRequest("a", **settings))


def test_a_negative_prompt_at_guidance_1_is_what_the_renoise_reads(pipe: Pipeline) -> None:
    """Plain samplers refuse a negative prompt at guidance 1 (no negative pass runs); a CFG++ sampler runs
    that pass and renoises with it, so it takes the negative prompt there."""
    from pictor.generation_request import GenerationError

    with pytest.raises(GenerationError, match="off at guidance 1"):
        _generate(pipe, sampler="euler", guidance=1.0, negative_prompt="blue")
    ts = get_schedule("flux", 4, image_seq_len=16)
    fn = _velocity(pipe, ts, sampler="euler_cfg_pp", guidance=1.0, negative_prompt="blue")
    negative = _velocity(pipe, ts, sampler="euler", prompt="blue", negative_prompt="", guidance=1.0)
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 0.8)
    with torch.inference_mode():
        fn(x, t)  # the call whose negative pass the renoise reads
        torch.testing.assert_close(getattr(fn, UNCOND)(x, t), negative(x, t), rtol=1e-4, atol=1e-5)
    a = _generate(pipe, sampler="euler_cfg_pp", guidance=1.0, negative_prompt="blue")[0]
    b = _generate(pipe, sampler="euler_cfg_pp", guidance=1.0, negative_prompt="")[0]
    assert a.record["negative_prompt"] == "blue" and not np.array_equal(_px(a.image), _px(b.image))
