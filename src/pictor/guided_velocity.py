"""The velocity that a sampler integrates: the transformer under all of a request's conditioning (prompt,
negative prompt, layout boxes, reference picture) with its guidance folded in.

Classifier-free guidance batches the conditional and unconditional halves in one forward pass. The
layout's residuals and the reference's conditioning depend on neither x nor t, so they are computed once
per sampler run. Under CFG both halves get the layout (as GLIGEN), so guidance amplifies the prompt, not
the layout; the reference goes with the conditional half only (as IP-Adapter), amplified like a prompt.
An IP-Adapter's picture goes with the conditional half and a black picture with the other (diffusers' and
XLabs' default negative picture), its keys and values computed once per run too.
A FLUX.1 Kontext context image goes with both halves (as diffusers' true CFG for Kontext), appended to the
image tokens (`pictor.context_images`).
With denoise windows (`pictor.denoise_tiles`), each call runs the transformer (and the ControlNets) on one
window of the image tokens at a time, with that window's ids, layout residuals, tokens beside the noise and
control tokens, and blends them.
Regional prompts and A1111's AND (`pictor.regional_prompts`, `pictor.composable_prompts`) run every prompt as
a pass of its own in one batch (after them the negative prompt's, under CFG), each with the inputs above
arranged as the passes are, and `compose` makes one velocity of them. With regional attention
(`pictor.regional_attention`) the regions' prompts instead follow the prompt's tokens in one pass, under an
attention bias that lets each reach only its box; a ControlNet then reads the whole prompt alone.
A guidance method other than plain CFG (`pictor.guidance_methods`) combines the prompts' prediction (what
`compose` gives at guidance 1) with the negative prompt's per step, and on steps outside its guidance
interval runs the prompts' passes alone, without the negative pass.
A CFG++ sampler (`pictor.sampling.CFG_PP_SAMPLERS`) also reads each call's unconditional velocity, the
negative prompt's raw prediction (under any guidance method, as ComfyUI's post-CFG hook reads
`uncond_denoised`; its TCFG, a pre-CFG hook, damps it first: README), through the velocity's
`pictor.sampling_steps.UNCOND` attribute. For one the negative pass
runs at guidance 1 too (ComfyUI's disable_cfg1_optimization); a guidance-distilled or unguided model, which
has no negative pass, and a guidance interval, whose steps outside it run none, are refused with a
ValueError that names the sampler; CFG-Zero*'s zeroed steps call no model and give zero for both.
What the velocity reads of a request and a pipeline (`Conditioned`, `Models`) and the conditioning it builds
once per run (the passes' prompts and weights, stacked texts, IP-Adapter keys and values) live in
`pictor.guided_inputs`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pictor.composable_prompts import compose
from pictor.context_images import context_tokens
from pictor.controlnet_runs import ControlNetRun
from pictor.denoise_tiles import TokenWindow, tiled_call
from pictor.guidance_methods import Guider, StepClock
from pictor.guided_inputs import (
    Conditioned,
    Models,
    _check_cfg_pp,
    _parts,
    _stacked,
    ip_attention,
    regional_options,
)
from pictor.layout_files import layout_residuals
from pictor.models.block_cache import FirstBlockCache
from pictor.models.control_residuals import ControlResiduals
from pictor.models.flux import make_img_ids, make_txt_ids
from pictor.models.ip_adapter import IPAttention
from pictor.models.reference import (
    ReferenceConditioning,
    apply_reference,
    conditional_only,
)
from pictor.models.text import TextEmbeddings
from pictor.pass_texts import pass_schedules
from pictor.redux_images import redux_tokens
from pictor.reference_files import reference_context
from pictor.regional_attention import RegionalAttention
from pictor.regional_prompts import region_cover
from pictor.sampling import CFG_PP_SAMPLERS, clock_calls_per_step
from pictor.sampling_steps import UNCOND

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided_velocity(
    m: Models,
    r: Conditioned,
    batch: int,
    lat_h: int,
    lat_w: int,
    caches: list[FirstBlockCache] | None = None,
    fill: torch.Tensor | None = None,
    controlnets: ControlNetRun | None = None,
    windows: list[TokenWindow] | None = None,
    ts: torch.Tensor | None = None,
    first_pass_steps: int | None = None,
) -> Velocity:
    """The velocity callable for one sampler run of `batch` images on a lat_h x lat_w latent grid. With a
    cache threshold, the run's first-block cache is appended to `caches` (when given) for its counts.
    `fill`: tokens read beside the noise [1, N, D], concatenated to every noisy token's channels: a FLUX.1
    Fill model's masked picture and mask, or a Canny / Depth model's control picture. `controlnets`: the
    run's ControlNets, which run on the conditional half's noisy tokens and prompt at each call. `windows`:
    the token windows the transformer runs on one at a time (None: all tokens at once), a ControlNet on the
    same window of its control tokens; request resolution refuses them with the first-block cache, which
    compares each call with the last. `ts`: the run's step times, with which a prompt with prompt editing
    (`pictor.prompt_editing`) picks each call's text and a guidance method finds each call's step;
    `first_pass_steps`: this run is a hires fix's second pass, whose schedule counts on from a first pass of
    that many steps."""
    picture = None
    if r.redux_image is not None:  # FLUX.1 Redux: the picture's tokens follow the prompt's (conditional only)
        assert m.redux is not None and isinstance(r.redux_image, np.ndarray)
        picture = redux_tokens(m.redux, r.redux_image, float(r.redux_strength or 0.0), m.dtype)

    def conditional(text: str) -> TextEmbeddings:
        emb = m.encode_text([text], r.prompt_weights)
        if picture is None:
            return emb
        ones = torch.ones(picture.shape[:2], dtype=emb.mask.dtype, device=emb.mask.device)
        return TextEmbeddings(
            tokens=torch.cat([emb.tokens, picture], dim=1),
            mask=torch.cat([emb.mask, ones], dim=1),
            pooled=emb.pooled,
        )

    img_ids = make_img_ids(batch, lat_h, lat_w).to(m.device, m.dtype)
    guidance = float(r.guidance or 0.0)
    cfg_pp = r.sampler in CFG_PP_SAMPLERS
    if cfg_pp:
        _check_cfg_pp(m, r)
    use_cfg = m.guidance_mode == "cfg" and (guidance != 1.0 or cfg_pp)
    # One cache per sampler run (and per number of rows: a guidance interval's steps without the negative
    # pass keep their own): it compares each call with this run's earlier ones.
    # Regional attention's steps after its window (`RegionalOptions.steps`) run without the regions and keep
    # their own, too.
    row_caches: dict[tuple[int, bool], FirstBlockCache] = {}
    masked = [True]  # whether this call is in regional attention's window (the velocity sets it per call)

    def cache_for(rows: int) -> FirstBlockCache | None:
        if not r.cache_threshold:
            return None
        key = (rows, masked[0])
        if key not in row_caches:
            row_caches[key] = FirstBlockCache(r.cache_threshold)
            if caches is not None:
                caches.append(row_caches[key])
        return row_caches[key]

    def model(
        x: torch.Tensor,
        t: torch.Tensor,
        emb: TextEmbeddings,
        ids: torch.Tensor,
        residuals: list[torch.Tensor] | None,
        context: ReferenceConditioning | None,
        ipa: IPAttention | None,
        prompt_rows: int = batch,
    ) -> torch.Tensor:
        """The transformer on x's rows: the first `prompt_rows` are the prompts' passes (the conditional half,
        or regions' and AND's passes), which a ControlNet runs on; the rest reuse the first pass's."""
        if windows is None:
            return window_model(x, t, emb, ids, residuals, context, ipa, fill, None, prompt_rows)

        def part(index: torch.Tensor) -> torch.Tensor:  # the tokens at `index` alone, where they lie
            return window_model(
                x[:, index],
                t,
                emb,
                ids[:, index],
                [v[:, index] for v in residuals] if residuals is not None else None,
                context,
                ipa,
                fill[:, index] if fill is not None else None,
                index,
                prompt_rows,
            )

        return tiled_call(windows, x, part)

    def window_model(
        x: torch.Tensor,
        t: torch.Tensor,
        emb: TextEmbeddings,
        ids: torch.Tensor,
        residuals: list[torch.Tensor] | None,
        context: ReferenceConditioning | None,
        ipa: IPAttention | None,
        beside: torch.Tensor | None,
        index: torch.Tensor | None,
        prompt_rows: int,
    ) -> torch.Tensor:
        n = x.shape[0]
        txt = emb.tokens.expand(n, -1, -1) if emb.tokens.shape[0] == 1 else emb.tokens
        vec = emb.pooled.expand(n, -1) if emb.pooled.shape[0] == 1 else emb.pooled
        g = None
        if m.guidance_mode == "distilled":
            g = torch.full((n,), guidance, device=m.device, dtype=m.dtype)
        txt_ids = make_txt_ids(n, txt.shape[1]).to(m.device, m.dtype)
        control = None
        if controlnets is not None:  # the prompts' passes' residuals; a CFG negative pass reuses the first's
            k = prompt_rows  # (the transformer broadcasts a conditional half's over both halves)
            tk = t[:k] if t.ndim else t
            c_txt, c_ids = txt[:k], txt_ids[:k]
            if attend is not None:  # regional attention: a ControlNet reads the whole prompt alone
                c_txt, c_ids = c_txt[:, : attend.base_len], c_ids[:, : attend.base_len]
            control = controlnets(x[:k], tk, ids[:k], c_txt, c_ids, vec[:k], guidance, index)
            if control is not None and k > batch and n > k:  # regions' or AND's passes, then the negative's
                control = ControlResiduals(
                    [torch.cat([r, r[:batch]]) for r in control.double],
                    [torch.cat([r, r[:batch]]) for r in control.single],
                    control.repeat,
                )
        if context is not None:
            if attend is not None and not masked[0]:  # past the window: the prompt's tokens alone
                context = ReferenceConditioning(context.tokens[:, : attend.base_len], context.pooled)
            txt, vec = apply_reference(txt, vec, context)
        if beside is not None:  # Fill's masked picture and mask, or a control picture, beside each token
            x = torch.cat([x, beside.expand(n, -1, -1).to(x.dtype)], dim=-1)
        # Kontext: the context tokens ride after the noisy ones and their outputs are dropped.
        x_in, ids_in = kontext.extend(x, ids) if kontext is not None else (x, ids)
        mask = None
        if attend is not None and masked[0]:
            mask = attend.mask(n, index, x_in.shape[1] - x.shape[1], emb.mask, negative=n > prompt_rows)
        v = m.transformer(
            x_in,
            ids_in,
            txt,
            txt_ids,
            t.to(m.dtype),
            vec,
            guidance=g,
            img_residuals=residuals,
            block_cache=cache_for(n),
            controlnet=control,
            ip_adapter=ipa,
            attn_mask=mask,
        )
        return v[:, : x.shape[1]]

    kontext = None
    if r.context_image is not None:  # encoded once per run, like the reference
        assert isinstance(r.context_image, np.ndarray)
        kontext = context_tokens(m.autoencoder, r.context_image, m.dtype, r.vae_tile, r.vae_tile_overlap)
    context = None
    if r.reference is not None:
        assert m.reference_adapter is not None and isinstance(r.reference, np.ndarray)
        context = reference_context(m.reference_adapter, m.autoencoder, r.reference, m.dtype)
    res = None
    if r.layout:
        assert m.layout_adapter is not None
        grid = (lat_h // 2, lat_w // 2)
        res = layout_residuals(m.layout_adapter, m.text_encoder, r.layout, batch, grid, m.dtype)
    ipa = ip_attention(m, r, use_cfg) if r.ip_adapter_image is not None and r.ip_adapter_scale else None
    # one pass per prompt (the prompt alone, or regions' or AND's), in one batch after which, under CFG,
    # the negative prompt's; `compose` makes one velocity of them
    texts_p, weights = _parts(r, lat_h // 2, lat_w // 2)
    parts = len(texts_p)
    weights = weights.to(m.device)
    # each pass's texts (with prompt editing, each its schedule reaches), encoded once per run
    passes = pass_schedules(
        texts_p + ([r.negative_prompt] if use_cfg else []), r.prompt_editing, ts, first_pass_steps
    )
    attend = None
    if r.regions and r.regional_attention:  # regions' prompts ride with the prompt's (no picture tokens)
        encoded = [[conditional(text) for text in passes.texts[0]]]
        encoded += [[m.encode_text([text], r.prompt_weights) for text in texts] for texts in passes.texts[1:]]
        grid = (lat_h // 2, lat_w // 2)
        cover = region_cover(r.regions, *grid)
        strength = torch.tensor([region["strength"] for region in r.regions], dtype=torch.float64)
        attend = RegionalAttention(cover, strength, encoded, use_cfg, m.dtype, m.device, regional_options(r))
        parts, weights = 1, torch.ones(1, cover.shape[1], device=m.device)
    else:
        encoded = [[conditional(text) for text in texts] for texts in passes.texts[:parts]]
        encoded += [
            [m.encode_text([text], r.prompt_weights) for text in texts] for texts in passes.texts[parts:]
        ]
    k = parts + (1 if use_cfg else 0)
    cache_for(k * batch)  # the run's cache, made up front (its counts are recorded even for no call)
    stacks: dict[tuple[int, ...], TextEmbeddings] = {}

    def emb_at(t: torch.Tensor) -> TextEmbeddings:  # the passes' texts at a step, stacked once each
        key = (*passes.at(t), masked[0])
        if key not in stacks:
            rows = [texts[i] for texts, i in zip(encoded, key[:-1], strict=True)]
            if attend is not None and masked[0]:
                rows = attend.rows(rows)
            elif attend is not None:  # past regional attention's window: the prompt's (and negative's) alone
                rows = [rows[0], *rows[1 + len(attend.region_len) :]]
            stacks[key] = _stacked(rows, batch)
        return stacks[key]

    # regional attention's window: which calls are in it (by their step, `StepClock`)
    window = None
    if attend is not None and attend.options.steps is not None:
        if ts is None:
            raise ValueError("regional attention's steps need the run's step times (ts) to know each call's")
        window = attend.options.window(len(ts) - 1)
    evals = clock_calls_per_step(r.sampler) if r.sampler else 1

    ids_k = img_ids.repeat(k, 1, 1)
    res_k = [v.repeat(k, 1, 1) for v in res] if res is not None else None
    if context is not None and attend is not None:  # the reference's residuals go to the prompt's tokens
        if context.tokens.shape[1] != attend.base_len:  # (apply_reference's check, before the padding)
            raise ValueError(
                f"the reference adapter makes {context.tokens.shape[1]} token residuals, but the prompt has "
                f"{attend.base_len} tokens: it was made for a text encoder with another max_length"
            )
        context = ReferenceConditioning(attend.pad_text(context.tokens), context.pooled)
    context_k = context
    if context is not None and use_cfg:  # the picture with the prompts' passes, not the negative's
        halves = conditional_only(context, batch)
        context_k = ReferenceConditioning(
            torch.cat([halves.tokens[:batch]] * parts + [halves.tokens[batch:]]),
            torch.cat([halves.pooled[:batch]] * parts + [halves.pooled[batch:]]),
        )
    ipa_k = ipa
    if ipa is not None and use_cfg:  # the picture with the prompts' passes, the blank with the negative's
        ipa_k = IPAttention(
            keys=[torch.cat([key[:1]] * parts + [key[1:]]) for key in ipa.keys],
            values=[torch.cat([value[:1]] * parts + [value[1:]]) for value in ipa.values],
            scale=ipa.scale,
        )
    g = guidance if use_cfg else None

    regional_clock = StepClock(ts, evals) if window is not None and ts is not None else None

    # the last call's unconditional velocity (the negative pass's), for a CFG++ sampler
    last_uncond: list[torch.Tensor | None] = [None]

    def uncond(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if last_uncond[0] is None:
            raise RuntimeError(
                f"{r.sampler} asked for the unconditional velocity before calling the velocity"
            )
        return last_uncond[0]

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if regional_clock is not None and window is not None:
            masked[0] = regional_clock(float(t.reshape(-1)[0])) < window
        t_k = t.repeat(k) if t.ndim else t
        out = model(x.repeat(k, 1, 1), t_k, emb_at(t), ids_k, res_k, context_k, ipa_k, parts * batch)
        out = out.view(k, *x.shape)
        if use_cfg:
            last_uncond[0] = out[parts]
        return compose(out, weights, g)

    if use_cfg:
        setattr(velocity, UNCOND, uncond)
    method = r.guidance_method
    if not use_cfg or method is None or method.is_default:
        return velocity
    if ts is None:
        raise ValueError("a guidance method needs the run's step times (ts) to know each call's step")
    guider = Guider(method, guidance, len(ts) - 1)
    clock = StepClock(ts, evals)
    plain = parts == 1 and bool((weights == 1).all())  # the prompt's pass is the conditional prediction
    rows = parts * batch  # the prompts' passes, without the negative one
    cond_stacks: dict[int, TextEmbeddings] = {}

    def cond_emb(t: torch.Tensor) -> TextEmbeddings:  # the prompts' rows of a step's stack
        full = emb_at(t)
        if id(full) not in cond_stacks:
            cond_stacks[id(full)] = TextEmbeddings(full.tokens[:rows], full.mask[:rows], full.pooled[:rows])
        return cond_stacks[id(full)]

    ctx_c = None
    if context_k is not None:
        ctx_c = ReferenceConditioning(context_k.tokens[:rows], context_k.pooled[:rows])
    ipa_c = None
    if ipa_k is not None:
        ipa_c = IPAttention([v[:parts] for v in ipa_k.keys], [v[:parts] for v in ipa_k.values], ipa_k.scale)
    res_c = [v[:rows] for v in res_k] if res_k is not None else None
    after_guided = [False]  # whether the last call ran the negative pass

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = clock(float(t.reshape(-1)[0]))
        if window is not None:
            masked[0] = step < window
        if guider.zeroed(step):  # CFG-Zero*'s first steps: zero whatever the model says, so no call
            last_uncond[0] = torch.zeros_like(x)
            return torch.zeros_like(x)
        if guider.guides(step):
            after_guided[0] = True
            t_k = t.repeat(k) if t.ndim else t
            out = model(x.repeat(k, 1, 1), t_k, emb_at(t), ids_k, res_k, context_k, ipa_k, rows)
            out = out.view(k, *x.shape)
            last_uncond[0] = out[parts]
            cond = out[0] if plain else compose(out, weights, 1.0)
            return guider(step, cond, out[parts])
        prompt_cache = cache_for(rows)
        if after_guided[0] and prompt_cache is not None:  # its last call is from before the guided steps
            prompt_cache.forget()
        after_guided[0] = False
        last_uncond[0] = None  # (refused for CFG++ up front: `_check_cfg_pp`)
        t_p = t.repeat(parts) if t.ndim else t
        out = model(x.repeat(parts, 1, 1), t_p, cond_emb(t), ids_k[:rows], res_c, ctx_c, ipa_c, rows)
        return guider(step, compose(out.view(parts, *x.shape), weights, None), None)

    setattr(guided, UNCOND, uncond)
    return guided
