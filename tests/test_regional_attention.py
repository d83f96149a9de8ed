"""Regional attention (`pictor.regional_attention`): the attention bias against its rules written out token by
token, the transformer under a bias against diffusers' under the same mask, the velocity against one masked
pass built here from the prompts' own encodings, records, reproduce, refusals and the command line."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pictor.context_images import context_tokens
from pictor.denoise_tiles import plan_windows, tiled_call
from pictor.editing import EditRequest
from pictor.generation_request import GenerationError, GenerationRequest
from pictor.guided_velocity import guided_velocity
from pictor.loading import load, pipeline_from_preset
from pictor.models.block_cache import FirstBlockCache
from pictor.models.flux import make_img_ids, make_txt_ids
from pictor.pipeline import Pipeline
from pictor.provenance import read_record
from pictor.reference_files import reference_context
from pictor.regional_attention import RegionalAttention, padded_text_bias, regional_bias
from pictor.regional_prompts import parse_regions, region_cover
from pictor.reproduce import reproduce
from tests.test_cli_prompt_variants import cli

from tiny_bundle import saved_tiny_bundle
from tiny_bundle import velocity_32 as _velocity
from tiny_flux import load_reference, make_inputs, random_flux, tiny_params

LEFT = {"box": [0.0, 0.0, 0.5, 1.0], "prompt": "a red circle"}
RIGHT = {"box": [0.5, 0.25, 1.0, 0.75], "prompt": "a blue square", "strength": 3}
INF = -math.inf


def _rules(
    cover: torch.Tensor, strength: list[float], base: int, lengths: list[int], extra: int
) -> torch.Tensor:
    """The bias by its rules, one query and key at a time (what `regional_bias` vectorises)."""
    n = cover.shape[1]
    text = base + sum(lengths)
    owner = [-1] * base + [i for i, length in enumerate(lengths) for _ in range(length)]
    size = text + n + extra
    out = torch.empty(size, size)
    for q in range(size):
        for k in range(size):
            q_text, k_text = q < text, k < text
            if q_text and k_text:  # text sees text of its own prompt only
                out[q, k] = 0.0 if owner[q] == owner[k] else INF
            elif q_text:  # the prompt's words see every image token, a region's words its box
                covered = k < text + n and cover[owner[q], k - text] > 0
                out[q, k] = 0.0 if owner[q] == -1 or covered else INF
            elif k_text:  # image tokens see the prompt, and a region where its box covers them
                if owner[k] == -1:
                    out[q, k] = 0.0
                elif q < text + n and cover[owner[k], q - text] > 0:
                    out[q, k] = math.log(float(cover[owner[k], q - text]) * strength[owner[k]])
                else:
                    out[q, k] = INF
            else:
                out[q, k] = 0.0
    return out


def test_the_bias_follows_its_rules() -> None:
    cover = torch.tensor([[1.0, 0.5, 0.0, 0.25], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    strength = [1.0, 2.0]
    got = regional_bias(cover, torch.tensor(strength), 3, [2, 1], extra=2)
    want = _rules(cover, strength, 3, [2, 1], 2)
    assert got.shape == (3 + 3 + 4 + 2,) * 2
    assert torch.equal(got.isinf(), want.isinf())
    assert torch.allclose(got[~got.isinf()], want[~want.isinf()])
    assert bool((~got.isinf()).any(1).all())  # every token sees something (no row of SDPA is empty)
    assert got[6 + 1, 3] == pytest.approx(math.log(0.5)) and got[6 + 2, 5] == pytest.approx(math.log(2.0))


def test_the_padded_negative_prompt_is_the_negative_alone() -> None:
    """Padding that sees only itself and that nothing sees changes nothing of the other tokens."""
    params = tiny_params(depth=2)
    model = random_flux(params)
    inputs = make_inputs(params)
    txt = inputs["txt"]
    assert isinstance(txt, torch.Tensor)
    padded = torch.cat([txt, torch.randn(txt.shape[0], 5, txt.shape[2])], dim=1)
    n_img = inputs["img"].shape[1]  # type: ignore[union-attr]
    bias = padded_text_bias(txt.shape[1], txt.shape[1] + 5, n_img)[None, None]
    with torch.no_grad():
        alone = model(**inputs)
        masked = model(
            **{**inputs, "txt": padded, "txt_ids": make_txt_ids(2, padded.shape[1])}, attn_mask=bias
        )
        unmasked = model(**{**inputs, "txt": padded, "txt_ids": make_txt_ids(2, padded.shape[1])})
        zeros = model(**inputs, attn_mask=torch.zeros(1, 1, 7 + n_img, 7 + n_img))
    assert torch.allclose(masked, alone, atol=1e-5), (masked - alone).abs().max()
    assert (unmasked - alone).abs().max() > 1e-3  # the padding would count without the bias
    assert torch.allclose(zeros, alone, atol=1e-5)  # a bias of zeros is FLUX.1's attention


def test_a_biased_transformer_matches_diffusers_under_the_same_mask() -> None:
    ref_mod = load_reference()
    params = tiny_params(depth=2)
    model = random_flux(params)
    ref = ref_mod.build_reference(params, {k: v.clone() for k, v in model.state_dict().items()})
    inputs = make_inputs(params)
    gen = torch.Generator().manual_seed(3)
    cover = torch.rand(2, 15, generator=gen, dtype=torch.float64)
    cover[cover < 0.4] = 0.0
    bias = regional_bias(cover, torch.tensor([1.0, 3.0]), 3, [2, 2])  # 7 text tokens, 3x5 image tokens
    mask = bias[None, None].expand(2, -1, -1, -1)
    with torch.no_grad():
        got = model(**inputs, attn_mask=mask)
        ids = inputs["img_ids"][0], inputs["txt_ids"][0]  # type: ignore[index]
        want = ref(
            hidden_states=inputs["img"],
            encoder_hidden_states=inputs["txt"],
            pooled_projections=inputs["y"],
            timestep=inputs["timesteps"],
            img_ids=ids[0],
            txt_ids=ids[1],
            joint_attention_kwargs={"attention_mask": mask},
            return_dict=False,
        )[0]
        plain = model(**inputs)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert (got - plain).abs().max() > 1e-2  # the mask changes the output
    with pytest.raises(ValueError, match="attn_mask must be"):
        model(**inputs, attn_mask=bias)  # [S, S]: no batch and head axes


# ------------------------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return saved_tiny_bundle(tmp_path_factory.mktemp("regional-attention"), "tiny-regional-attention")


@pytest.fixture(scope="module")
def pipe(bundle: Path) -> Pipeline:
    return load(str(bundle), device="cpu")


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_the_velocity_is_one_masked_pass(pipe: Pipeline, guidance: float) -> None:
    """The conditional pass reads the prompt's tokens and each region's real tokens under the bias; CFG then
    guides it away from the negative prompt's own pass."""
    regions = parse_regions([LEFT, RIGHT])
    torch.manual_seed(0)
    x, t = torch.randn(2, 16, 16), torch.tensor([0.7, 0.4])
    negative = "blurry" if guidance != 1.0 else ""
    with torch.inference_mode():
        v = _velocity(
            pipe,
            "two shapes",
            guidance=guidance,
            negative_prompt=negative,
            regions=regions,
            regional_attention=True,
        )(x, t)
        blend = _velocity(pipe, "two shapes", guidance=guidance, negative_prompt=negative, regions=regions)(
            x, t
        )
        prompt = pipe.encode_text(["two shapes"])
        words = [pipe.encode_text([region["prompt"]]) for region in regions]
        real = [int(e.mask[0].sum()) for e in words]
        assert all(n < e.mask.shape[1] for n, e in zip(real, words, strict=True))  # (padding is left out)
        txt = torch.cat([prompt.tokens] + [e.tokens[:, :n] for e, n in zip(words, real, strict=True)], dim=1)
        cover = region_cover(regions, 4, 4)
        bias = _rules(cover, [1.0, 3.0], prompt.tokens.shape[1], real, 0)
        v_cond = pipe.transformer(
            x,
            make_img_ids(2, 8, 8),
            txt.expand(2, -1, -1),
            make_txt_ids(2, txt.shape[1]),
            t,
            prompt.pooled.expand(2, -1),
            attn_mask=bias[None, None],
        )
        want = v_cond
        if guidance != 1.0:
            v_neg = _velocity(pipe, negative, guidance=1.0)(x, t)
            want = v_neg + guidance * (v_cond - v_neg)
    assert torch.allclose(v, want, atol=1e-5), (v - want).abs().max()
    assert (v - blend).abs().max() > 1e-3  # not the blend of passes


def test_a_controlnet_reads_the_whole_prompt_alone(pipe: Pipeline) -> None:
    seen: list[int] = []

    def controlnets(x: Any, t: Any, ids: Any, txt: torch.Tensor, txt_ids: torch.Tensor, *rest: Any) -> None:
        assert txt.shape[1] == txt_ids.shape[1]
        seen.append(txt.shape[1])

    with torch.inference_mode():
        r = pipe.resolve_request(
            GenerationRequest(
                "two shapes", width=32, height=32, steps=4, regions=[LEFT], regional_attention=True
            )
        )
        guided_velocity(pipe, r, 1, 8, 8, controlnets=controlnets)(
            torch.randn(1, 16, 16), torch.tensor([0.5])
        )
    assert seen == [pipe.text_encoder.max_length]


def test_padding_of_a_shorter_prompt_editing_stage_is_hidden() -> None:
    """A region whose stages differ in length: the shorter stage's padding in its slot sees only itself."""
    from pictor.models.text_encoder import TextEmbeddings

    def emb(real: int) -> TextEmbeddings:
        mask = torch.zeros(1, 6, dtype=torch.bool)
        mask[0, :real] = True
        return TextEmbeddings(torch.randn(1, 6, 4), mask, torch.randn(1, 3))

    cover = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    attend = RegionalAttention(
        cover, torch.tensor([1.0]), [[emb(6)], [emb(4), emb(2)]], False, torch.float32, "cpu"
    )
    assert attend.region_len == [4]
    long_row, short_row = attend.rows([emb(6), emb(4)]), attend.rows([emb(6), emb(2)])
    assert long_row[0].tokens.shape[1] == short_row[0].tokens.shape[1] == 10
    full = attend.mask(1, None, 0, long_row[0].mask)[0, 0]
    short = attend.mask(1, None, 0, short_row[0].mask)[0, 0]
    assert torch.equal(full, regional_bias(cover, torch.tensor([1.0]), 6, [4]))
    hidden = [8, 9]  # the short stage's padding in the region's slot
    assert bool(short[:, hidden].isinf().sum(0).eq(short.shape[0] - 1).all())  # only itself sees it
    assert short[8, 8] == 0 and short[9, 9] == 0 and bool(short[8, :8].isinf().all())
    keep = [i for i in range(12) if i not in hidden]
    assert torch.equal(short[keep][:, keep], full[keep][:, keep])


def test_images_records_reproduce_and_edits(pipe: Pipeline) -> None:
    def generate(**kw: Any) -> list[Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tiny encoder's notices about its vocabulary
            return pipe.generate(GenerationRequest("two shapes", seed=5, steps=4, num_images=2, **kw))

    blend = generate(regions=[LEFT, RIGHT])
    attend = generate(regions=[LEFT, RIGHT], regional_attention=True)
    assert attend[0].record["regional_attention"] is True and "regional_attention" not in blend[0].record
    for b, a in zip(blend, attend, strict=True):
        assert np.abs(np.asarray(a.image).astype(np.int16) - np.asarray(b.image)).max() > 1
        assert np.array_equal(np.asarray(reproduce(pipe, a.record).image), np.asarray(a.image))
    source = Image.new("RGB", (32, 32), (128, 128, 128))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (g,) = pipe.edit(
            EditRequest(
                source, "two shapes", strength=0.8, steps=4, seed=2, regions=[LEFT], regional_attention=True
            )
        )
    assert g.record["regional_attention"] is True
    assert np.array_equal(np.asarray(reproduce(pipe, g.record, source=source).image), np.asarray(g.image))


@pytest.mark.parametrize(
    "kw",
    [
        {"steps": 6, "cache_threshold": 0.5},
        {"steps": 3, "denoise_tile": 16, "denoise_tile_overlap": 8},
        {"steps": 3, "hires_scale": 1.5, "hires_steps": 2},
    ],
    ids=["first-block cache", "denoise tiles", "hires fix"],
)
def test_cache_tiles_and_hires_run_and_reproduce(pipe: Pipeline, kw: dict[str, Any]) -> None:
    request = GenerationRequest("two shapes", seed=5, regions=[LEFT, RIGHT], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (blend,) = pipe.generate(request)
        (g,) = pipe.generate(replace(request, regional_attention=True))
    assert g.record["regional_attention"] is True
    assert np.abs(np.asarray(g.image).astype(np.int16) - np.asarray(blend.image)).max() > 1
    assert np.array_equal(np.asarray(reproduce(pipe, g.record).image), np.asarray(g.image))
    if "cache_threshold" in kw:  # one row for the prompt and its regions, one for the negative prompt
        assert g.record["cache_passes"]["total"] == 2 * 6 < blend.record["cache_passes"]["total"]


def test_regional_attention_needs_regions(pipe: Pipeline) -> None:
    with pytest.raises(GenerationError, match="give regions"):
        pipe.generate(GenerationRequest("x", steps=2, regional_attention=True))


def test_the_command_line(capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = cli(
        capsys, "generate", "two shapes", "--regions", '[{"box": [0, 0, 0.5, 1], "prompt": "a red circle"}]',
        "--regional-attention", "--model", str(bundle), "--steps", "2", "--device", "cpu", "--seed", "3",
        "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    (png,) = out.glob("*.png")
    record = read_record(png)
    assert record["regional_attention"] is True and record["regions"][0]["prompt"] == "a red circle"
    again = tmp_path / "again"
    code, _, err = cli(
        capsys, "generate", "--settings-from", str(png), "--model", str(bundle), "--device", "cpu",
        "-o", str(again),
    )  # fmt: skip
    assert code == 0, err
    (copy,) = again.glob("*.png")
    assert read_record(copy)["regional_attention"] is True
    assert np.array_equal(np.asarray(Image.open(copy)), np.asarray(Image.open(png)))
    code, _, err = cli(
        capsys, "generate", "x", "--regional-attention", "--model", str(bundle), "--steps", "2",
        "--device", "cpu", "-o", str(tmp_path / "bad"),
    )  # fmt: skip
    assert code != 0 and "give regions" in err and "Traceback" not in err


def test_the_command_line_takes_the_rpf_controls(
    capsys: pytest.CaptureFixture[str], bundle: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code, _, err = cli(
        capsys, "generate", "two shapes", "--regions", '[{"box": [0, 0, 0.5, 1], "prompt": "a red circle"}]',
        "--regional-attention", "--regional-steps", "0.5", "--regional-single-interval", "2",
        "--regional-base-ratio", "0.2", "--model", str(bundle), "--steps", "4", "--device", "cpu",
        "--seed", "3", "-o", str(out),
    )  # fmt: skip
    assert code == 0, err
    (png,) = out.glob("*.png")
    record = read_record(png)
    assert (record["regional_steps"], record["regional_single_interval"], record["regional_base_ratio"]) == (
        0.5,
        2,
        0.2,
    )
    assert "regional_double_interval" not in record
    again = tmp_path / "again"
    code, _, err = cli(
        capsys, "generate", "--settings-from", str(png), "--model", str(bundle), "--device", "cpu",
        "-o", str(again),
    )  # fmt: skip
    assert code == 0, err
    (copy,) = again.glob("*.png")
    assert read_record(copy)["regional_base_ratio"] == 0.2
    assert np.array_equal(np.asarray(Image.open(copy)), np.asarray(Image.open(png)))


def test_a_grid_compares_the_two_ways(pipe: Pipeline, bundle: Path, tmp_path: Path, capsys: Any) -> None:
    from pictor.grid_axes import GridError, parse_axis
    from pictor.grid_runs import run_grid

    request = GenerationRequest("two shapes", seed=4, steps=3, regions=[LEFT, RIGHT])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_grid(pipe, request, "regions-mode=blend,attention")
        (blend,) = pipe.generate(request)
        (attend,) = pipe.generate(replace(request, regional_attention=True))
    cells = [c.image for c in result.cells]
    assert [c is not None and c.record.get("regional_attention", False) for c in cells] == [False, True]
    for cell, want in zip(cells, (blend, attend), strict=True):
        assert cell is not None and np.array_equal(np.asarray(cell.image), np.asarray(want.image))
    with pytest.raises(GridError, match=r"blend .* or attention"):
        parse_axis("regions-mode=blend,masked")
    code, _, err = cli(
        capsys, "grid", "two shapes", "--regions", '[{"box": [0, 0, 0.5, 1], "prompt": "a red circle"}]',
        "--regional-attention", "--x", "regions-mode=blend,attention", "--model", str(bundle), "--steps", "2",
        "--device", "cpu", "-o", str(tmp_path / "grid"),
    )  # fmt: skip
    assert code != 0 and "--regional-attention" in err and "Traceback" not in err


# ------------------------------------------- windows, Kontext, a reference and the cache (review, helper-110)
# Each against a masked pass built here from `_rules`.

REGIONS = parse_regions([LEFT, RIGHT])


def _texts(pipe: Pipeline) -> tuple[Any, list[int], torch.Tensor]:
    prompt = pipe.encode_text(["two shapes"])
    words = [pipe.encode_text([r["prompt"]]) for r in REGIONS]
    real = [int(e.mask[0].sum()) for e in words]
    txt = torch.cat([prompt.tokens] + [e.tokens[:, :n] for e, n in zip(words, real, strict=True)], dim=1)
    return prompt, real, txt


def _open(pipe: Pipeline) -> Pipeline:
    torch.manual_seed(0)
    for m in pipe.transformer.modules():
        if isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    return pipe


@pytest.mark.filterwarnings("ignore:model 'tiny:UserWarning")
def test_windows_index_the_cover() -> None:
    pipe = _open(pipeline_from_preset("tiny", device="cpu"))
    r = pipe.resolve_request(
        GenerationRequest(
            "two shapes",
            width=32,
            height=32,
            steps=4,
            seed=1,
            guidance=1.0,
            regions=REGIONS,
            regional_attention=True,
        )
    )
    windows = plan_windows(4, 4, 2, 1)
    torch.manual_seed(0)
    x, t = torch.randn(1, 16, 16), torch.tensor([0.6])
    prompt, real, txt = _texts(pipe)
    cover = region_cover(REGIONS, 4, 4)
    ids = make_img_ids(1, 8, 8)
    with torch.inference_mode():
        got = guided_velocity(pipe, r, 1, 8, 8, windows=windows)(x, t)

        def part(index: torch.Tensor) -> torch.Tensor:
            bias = _rules(cover[:, index], [1.0, 3.0], prompt.tokens.shape[1], real, 0)
            return pipe.transformer(
                x[:, index],
                ids[:, index],
                txt,
                make_txt_ids(1, txt.shape[1]),
                t,
                prompt.pooled,
                attn_mask=bias[None, None],
            )

        want = tiled_call(windows, x, part)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_kontext_tokens_are_global() -> None:
    import test_kontext as tk

    pipe = _open(tk._pipe(kontext=True))
    r = pipe.resolve_request(
        GenerationRequest(
            "two shapes",
            width=32,
            height=32,
            steps=4,
            seed=1,
            context_image=tk._picture(0, (32, 32)),
            regions=REGIONS,
            regional_attention=True,
        )
    )
    ctx = context_tokens(pipe.autoencoder, r.context_image, pipe.dtype)
    torch.manual_seed(0)
    x, t = torch.randn(1, 16, 16), torch.tensor([0.6])
    prompt, real, txt = _texts(pipe)
    bias = _rules(region_cover(REGIONS, 4, 4), [1.0, 3.0], prompt.tokens.shape[1], real, ctx.tokens.shape[1])
    with torch.inference_mode():
        got = guided_velocity(pipe, r, 1, 8, 8)(x, t)
        x_in, ids_in = ctx.extend(x, make_img_ids(1, 8, 8))
        want = pipe.transformer(
            x_in,
            ids_in,
            txt,
            make_txt_ids(1, txt.shape[1]),
            t,
            prompt.pooled,
            guidance=torch.full((1,), float(r.guidance)),
            attn_mask=bias[None, None],
        )[:, :16]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.filterwarnings("ignore:model 'tiny:UserWarning")
def test_a_reference_goes_to_the_whole_prompt_under_cfg(tmp_path: Path) -> None:
    import test_reference_generation as trg

    pipe = _open(pipeline_from_preset("tiny", device="cpu"))
    pipe.set_reference_adapter(trg._save(trg._adapter(pipe), tmp_path / "r.safetensors", pipe.hash))
    r = pipe.resolve_request(
        GenerationRequest(
            "two shapes",
            width=32,
            height=32,
            steps=4,
            seed=1,
            guidance=4.0,
            negative_prompt="blurry",
            reference=trg._picture(),
            regions=REGIONS,
            regional_attention=True,
        )
    )
    ref = reference_context(pipe.reference_adapter, pipe.autoencoder, r.reference, pipe.dtype)
    torch.manual_seed(0)
    x, t = torch.randn(1, 16, 16), torch.tensor([0.6])
    prompt, real, txt = _texts(pipe)
    base = prompt.tokens.shape[1]
    bias = _rules(region_cover(REGIONS, 4, 4), [1.0, 3.0], base, real, 0)
    ids = make_img_ids(1, 8, 8)
    with torch.inference_mode():
        got = guided_velocity(pipe, r, 1, 8, 8)(x, t)
        txt_r = txt.clone()
        txt_r[:, :base] += ref.tokens
        cond = pipe.transformer(
            x,
            ids,
            txt_r,
            make_txt_ids(1, txt.shape[1]),
            t,
            prompt.pooled + ref.pooled,
            attn_mask=bias[None, None],
        )
        neg_e = pipe.encode_text(["blurry"])
        neg = pipe.transformer(x, ids, neg_e.tokens, make_txt_ids(1, base), t, neg_e.pooled)
        want = neg + 4.0 * (cond - neg)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("per_block", [False, True], ids=["one bias", "RPF's per block"])
def test_the_cache_recomputes_a_row_under_its_own_mask(per_block: bool) -> None:
    from pictor.models.block_bias import BlockBias

    params = tiny_params(depth=2)
    model = random_flux(params)
    inp = make_inputs(params)
    n, length = inp["img"].shape[1], inp["txt"].shape[1]
    cover = torch.rand(1, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cover[cover < 0.5] = 0
    mask = torch.stack(
        [regional_bias(cover, torch.tensor([2.0]), length - 2, [2]), padded_text_bias(length - 3, length, n)]
    )[:, None]
    if per_block:  # the second row's bias differs from the first's in both (so each row must get its own)
        base = mask.clone()
        base[0, 0, length:, length - 2 : length] = INF
        mask = BlockBias(mask, base, 2, 1, 0.3, length)  # type: ignore[assignment]
    with torch.no_grad():
        cache = FirstBlockCache(0.05)
        model(**inp, attn_mask=mask, block_cache=cache)
        x = inp["img"].clone()
        x[1] += 0.5  # only row 1 moves: it alone runs the rest of the blocks
        out = model(**{**inp, "img": x}, attn_mask=mask, block_cache=cache)
        assert cache.skipped == 1
        want = model(**{**inp, "img": x}, attn_mask=mask)
    assert torch.allclose(out[1], want[1], atol=1e-5), (out[1] - want[1]).abs().max()


# ------------------------------------ Regional-Prompting-FLUX's controls: steps, block intervals, base ratio


def _biases(n_img: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """A regional bias over 3 prompt tokens, two regions of 2 tokens and n_img image tokens, and its
    unmasked one (the regions' tokens hidden from the image's), as `RegionalAttention` makes them."""
    gen = torch.Generator().manual_seed(3)
    cover = torch.rand(2, n_img, generator=gen, dtype=torch.float64)
    cover[cover < 0.4] = 0.0
    masked = regional_bias(cover, torch.tensor([1.0, 3.0]), 3, [2, 2])
    base = masked.clone()
    base[7:, 3:7] = INF
    return masked[None, None], base[None, None]


def test_the_base_ratio_blends_by_rpf_formula() -> None:
    """RPF: hidden_states = hidden_states*(1-base_ratio) + hidden_states_base*base_ratio (image rows)."""
    from pictor.models.block_bias import BlendedBias
    from pictor.models.layers import attention

    masked, base = _biases()
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 22, 8, generator=gen) for _ in range(3))
    pe = torch.zeros(1, 1, 22, 4, 2)
    pe[..., 0] = 1.0  # RoPE by angles of 0 (cos 1, sin 0): q and k as they are
    got = attention(q, k, v, pe, BlendedBias(masked, base, 0.3, 7))
    a = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=masked)
    b = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=base)
    want = a.clone()
    want[:, :, 7:] = a[:, :, 7:] * (1 - 0.3) + b[:, :, 7:] * 0.3
    assert torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    assert torch.equal(got[:, :, :7], a[:, :, :7])  # the text rows are the masked attention's
    assert (got - a).abs().max() > 1e-3


def test_each_block_gets_its_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    """Masked in blocks i % interval == 0 (RPF's rule), unmasked in the others, blended where a ratio is."""
    from pictor.models import layers
    from pictor.models.block_bias import BlendedBias, BlockBias

    params = tiny_params(depth=3)
    params = type(params).from_dict({**params.to_dict(), "depth_single_blocks": 3})
    model = random_flux(params)
    inputs = make_inputs(params)
    masked, base = _biases()
    seen: list[str] = []
    real = layers.attention

    def spy(q: Any, k: Any, v: Any, pe: Any, mask: Any = None) -> Any:
        if isinstance(mask, BlendedBias):
            seen.append(f"blend {mask.ratio}")
        else:
            seen.append("masked" if torch.equal(mask, masked) else "base" if torch.equal(mask, base) else "?")
        return real(q, k, v, pe, mask)

    monkeypatch.setattr(layers, "attention", spy)
    with torch.no_grad():
        plain = model(**inputs, attn_mask=masked)
        assert seen == ["masked"] * 6
        seen.clear()
        same = model(**inputs, attn_mask=BlockBias(masked, base))  # the defaults: the one bias everywhere
        assert torch.equal(same, plain) and seen == ["masked"] * 6
        seen.clear()
        model(**inputs, attn_mask=BlockBias(masked, base, double_interval=2, single_interval=3))
        assert seen == ["masked", "base", "masked", "masked", "base", "base"]
        seen.clear()
        model(**inputs, attn_mask=BlockBias(masked, base, 1, 2, base_ratio=0.25, start=7))
        assert seen == ["blend 0.25"] * 3 + ["blend 0.25", "base", "blend 0.25"]


def test_the_unmasked_bias_is_the_prompt_alone() -> None:
    """In a block without the mask the regions' tokens are hidden: the image tokens compute what they would
    with the prompt's tokens alone and no bias."""
    params = tiny_params(depth=2)
    model = random_flux(params)
    inputs = make_inputs(params)  # 7 text tokens: 3 the prompt's, then two regions' 2
    _, base = _biases()
    alone = {**inputs, "txt": inputs["txt"][:, :3], "txt_ids": inputs["txt_ids"][:, :3]}
    with torch.no_grad():
        got = model(**inputs, attn_mask=base)
        want = model(**alone)
        masked = model(**inputs)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (masked - want).abs().max() > 1e-3


def _run_velocity(pipe: Pipeline, guidance: float, **kw: Any) -> Any:
    r = pipe.resolve_request(
        GenerationRequest("two shapes", width=32, height=32, steps=4, seed=1, guidance=guidance, **kw)
    )
    ts = torch.linspace(1.0, 0.0, 5)
    fn = guided_velocity(pipe, r, 2, 8, 8, ts=ts)
    torch.manual_seed(0)
    x = torch.randn(2, 16, 16)
    return [fn(x, ts[i].expand(2)) for i in range(4)]


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_steps_past_the_window_are_the_prompt_alone(pipe: Pipeline, guidance: float) -> None:
    """RPF's mask_inject_steps: the mask's steps are regional attention's, the steps after them exactly the
    request without regions (RPF runs the prompt's embeddings alone there)."""
    regions = [LEFT, RIGHT]
    neg = {"negative_prompt": "blurry"} if guidance != 1.0 else {}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        window = _run_velocity(
            pipe, guidance, regions=regions, regional_attention=True, regional_steps=0.5, **neg
        )
        every = _run_velocity(pipe, guidance, regions=regions, regional_attention=True, **neg)
        alone = _run_velocity(pipe, guidance, **neg)
        counted = _run_velocity(
            pipe, guidance, regions=regions, regional_attention=True, regional_steps=2, **neg
        )
    for i in range(4):
        assert torch.equal(counted[i], window[i])  # 2 steps of 4: a share of 0.5
        if i < 2:
            assert torch.equal(window[i], every[i])
            assert (window[i] - alone[i]).abs().max() > 1e-3
        else:
            assert torch.equal(window[i], alone[i])


def _generate(pipe: Pipeline, **kw: Any) -> list[Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe.generate(
            GenerationRequest("two shapes", seed=5, **{"steps": 4, **kw}, regions=[LEFT, RIGHT])
        )


RPF = {"regional_steps": 0.5, "regional_double_interval": 2, "regional_base_ratio": 0.3}


def test_rpf_options_record_reproduce_and_default(pipe: Pipeline) -> None:
    (plain,) = _generate(pipe, regional_attention=True)
    assert not any(name.startswith("regional_") and name != "regional_attention" for name in plain.record)
    (same,) = _generate(
        pipe,
        regional_attention=True,
        regional_steps=4,
        regional_double_interval=1,
        regional_single_interval=1,
        regional_base_ratio=0.0,
    )  # the defaults written out: the same pixels
    assert np.array_equal(np.asarray(same.image), np.asarray(plain.image))
    assert same.record["regional_steps"] == 4 and "regional_base_ratio" not in same.record
    options_list = (RPF, {"regional_base_ratio": 0.5}, {"regional_steps": 1}, {"regional_single_interval": 2})
    for options in options_list:
        (g,) = _generate(pipe, regional_attention=True, **options)
        for name, value in options.items():
            assert g.record[name] == value
        if "regional_single_interval" not in options:  # (the tiny model has one single block: block 0's)
            assert np.abs(np.asarray(g.image).astype(np.int16) - np.asarray(plain.image)).max() > 1
        assert np.array_equal(np.asarray(reproduce(pipe, g.record).image), np.asarray(g.image))
    source = Image.new("RGB", (32, 32), (128, 128, 128))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (e,) = pipe.edit(
            EditRequest(
                source,
                "two shapes",
                strength=0.8,
                steps=4,
                seed=2,
                regions=[LEFT],
                regional_attention=True,
                **RPF,
            )
        )
    assert e.record["regional_base_ratio"] == 0.3
    assert np.array_equal(np.asarray(reproduce(pipe, e.record, source=source).image), np.asarray(e.image))


@pytest.mark.parametrize(
    "kw",
    [
        {"steps": 6, "cache_threshold": 0.5},
        {"denoise_tile": 16, "denoise_tile_overlap": 8},
        {"guidance": 4.0, "negative_prompt": "blurry", "guidance_method": "apg"},
        {"guidance": 4.0, "negative_prompt": "blurry", "guidance_method": "interval"},
    ],
    ids=["first-block cache", "denoise tiles", "apg", "guidance interval"],
)
def test_rpf_options_with_cache_tiles_and_guidance_methods(pipe: Pipeline, kw: dict[str, Any]) -> None:
    from pictor.guidance_methods import GuidanceMethod

    kw = dict(kw)
    if kw.get("guidance_method") == "apg":
        kw["guidance_method"] = GuidanceMethod(method="apg")
    elif kw.get("guidance_method") == "interval":
        kw["guidance_method"] = GuidanceMethod(start=0.0, stop=0.5)
    (plain,) = _generate(pipe, regional_attention=True, **kw)
    (g,) = _generate(pipe, regional_attention=True, **RPF, **kw)
    assert np.abs(np.asarray(g.image).astype(np.int16) - np.asarray(plain.image)).max() > 1
    assert np.array_equal(np.asarray(reproduce(pipe, g.record).image), np.asarray(g.image))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"regional_steps": 0}, "regional_steps must be"),
        ({"regional_steps": 1.5}, "regional_steps must be"),
        ({"regional_double_interval": 0}, "regional_double_interval must be"),
        ({"regional_single_interval": 1.5}, "regional_single_interval must be"),
        ({"regional_steps": 10_001}, r"regional_steps must be .* \(1 to 10000\), got 10001"),
        ({"regional_steps": 1e300}, "regional_steps must be"),  # a record's number stays small
        ({"regional_double_interval": 10**21}, "regional_double_interval must be .* from 1 to 1000"),
        ({"regional_single_interval": 1001}, "regional_single_interval must be .* from 1 to 1000"),
        ({"regional_base_ratio": 1.5}, "regional_base_ratio must be"),
        ({"regional_base_ratio": -0.1}, "regional_base_ratio must be"),
    ],
)
def test_rpf_options_are_checked(pipe: Pipeline, options: dict[str, Any], match: str) -> None:
    with pytest.raises(GenerationError, match=match):
        _generate(pipe, regional_attention=True, **options)


def test_rpf_options_need_regional_attention(pipe: Pipeline) -> None:
    with pytest.raises(GenerationError, match="regional_base_ratio shapes regional attention"):
        _generate(pipe, regional_base_ratio=0.2)


def test_the_attention_gives_the_unmasked_bias_per_block() -> None:
    """With RPF's options `RegionalAttention.mask` gives a `BlockBias`: the regional bias, and the same with
    the regions' tokens hidden from the image's (the prompt's never see them)."""
    from pictor.models.block_bias import BlockBias
    from pictor.models.text_encoder import TextEmbeddings
    from pictor.regional_attention import RegionalOptions

    def emb(real: int) -> TextEmbeddings:
        mask = torch.zeros(1, 6, dtype=torch.bool)
        mask[0, :real] = True
        return TextEmbeddings(torch.randn(1, 6, 4), mask, torch.randn(1, 3))

    cover = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64)
    texts = [[emb(6)], [emb(3)]]
    options = RegionalOptions(double_interval=2, base_ratio=0.2)
    attend = RegionalAttention(cover, torch.tensor([2.0]), texts, False, torch.float32, "cpu", options)
    row = attend.rows([texts[0][0], texts[1][0]])[0]
    got = attend.mask(1, None, 1, row.mask)
    assert isinstance(got, BlockBias) and (got.double_interval, got.base_ratio, got.start) == (2, 0.2, 9)
    want = regional_bias(cover, torch.tensor([2.0]), 6, [3], extra=1)
    assert torch.equal(got.masked[0, 0], want)
    base = want.clone()
    base[9:, 6:9] = INF
    assert torch.equal(got.base[0, 0], base)
    plain = RegionalAttention(cover, torch.tensor([2.0]), texts, False, torch.float32, "cpu")
    assert torch.equal(plain.mask(1, None, 1, row.mask)[0, 0], want)  # the defaults: one tensor, as before


def test_the_window_rounds_a_share_up_and_blend_cells_drop_the_rpf_options(pipe: Pipeline) -> None:
    from pictor.grid_axes import plan_grid
    from pictor.regional_attention import RegionalOptions
    from pictor.serve.settings_from import body_settings
    from pictor.settings_import import settings_from_record

    assert [RegionalOptions(steps=s).window(4) for s in (0.3, 0.5, 0.26, 0.99)] == [2, 2, 2, 4]
    assert RegionalOptions(steps=3).window(10) == 3 and RegionalOptions(steps=30).window(10) == 10
    request = GenerationRequest(
        "two shapes", seed=4, steps=3, regions=[LEFT, RIGHT], regional_attention=True, regional_steps=0.5,
        regional_base_ratio=0.2,
    )  # fmt: skip
    blend, attend = (c.request for c in plan_grid(request, "regions-mode=blend,attention").cells)
    assert (blend.regional_attention, blend.regional_steps, blend.regional_base_ratio) == (False, None, None)
    assert (attend.regional_steps, attend.regional_base_ratio) == (0.5, 0.2)
    pipe.resolve_request(blend)  # a blend cell is a valid request
    record = {"prompt": "two shapes", "regions": [LEFT], "regional_attention": True, "regional_steps": 0.4}
    body, notices = body_settings(settings_from_record(record))
    assert body["regional_steps"] == 0.4 and not any("regional_steps" in n for n in notices)
