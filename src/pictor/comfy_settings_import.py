"""A ComfyUI graph's settings as `pictor generate`'s options: the ComfyUI half of `pictor.settings_import`
(`settings_from_comfy`), with its tables of ComfyUI's sampler and scheduler names.

The graph is read by `pictor.comfy_workflow`, in ComfyUI's terms, and mapped here the way A1111's text is:
its sampler and scheduler names onto pictor's (with a notice where ComfyUI's of that name differs in detail),
FLUX guidance (FluxGuidance) where the graph sets it, else a CFG other than 1 (CFG 1 without FluxGuidance
leaves the model's own default, as ComfyUI gives FLUX.1 its default guidance; a CFG++ sampler's CFG 1 is
guidance 1), the negative prompt only where ComfyUI used it (real CFG, not 1, or a CFG++ sampler at CFG
1), and its prompt's weight syntax (ComfyUI's) rewritten in A1111's.
Whatever the graph holds that cannot be read is an error that names the image.

Separate from `pictor.settings_import` (the A1111 text and pictor record side, which calls
`settings_from_comfy` for an image with only a graph) because ComfyUI's names, defaults and graph rules are
its own: the A1111 side never reads them.
"""

from __future__ import annotations

from pictor.comfy_graph import ComfyGraphError, shortened
from pictor.comfy_passes import take_hires
from pictor.comfy_prompt_weights import comfy_prompt_as_a1111
from pictor.comfy_workflow import ComfySettings, read_comfy_graph
from pictor.flow import resolution_mu
from pictor.generation_request import MAX_SEED
from pictor.guidance_methods import GuidanceMethod
from pictor.imported_settings import ImportedSettings, SettingsImportError, take_guidance_method
from pictor.sampling import CFG_PP_SAMPLERS, SCHEDULES

# ComfyUI's sampler names (KSampler's sampler_name) -> pictor's. uni_pc is UniPC's bh1 variant and
# uni_pc_bh2 the bh2 one, which is pictor's unipc: the first is taken too, with a notice. The *_gpu ones
# (dpmpp_2m_sde_gpu, dpmpp_sde_gpu, ...) are the same samplers with their Brownian-tree noise drawn on the
# GPU (pictor draws its own noise from the seed either way, as for every stochastic sampler).
COMFY_SAMPLERS = {
    "euler": "euler",
    "euler_ancestral": "euler_ancestral",
    "heun": "heun",
    "dpmpp_2m": "dpmpp_2m",
    "dpmpp_2m_sde": "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
    "uni_pc": "unipc",
    "uni_pc_bh2": "unipc",
    "deis": "deis",
    "ipndm": "ipndm",
    "res_multistep": "res_multistep",
    "lcm": "lcm",
    "lms": "lms",
    "dpm_2": "dpm_2",
    "dpm_2_ancestral": "dpm_2_ancestral",
    "dpmpp_2s_ancestral": "dpmpp_2s_ancestral",
    "dpmpp_sde": "dpmpp_sde",
    "dpmpp_sde_gpu": "dpmpp_sde",
    "dpmpp_2m_sde_heun": "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu": "dpmpp_2m_sde_heun",
    "dpmpp_3m_sde": "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu": "dpmpp_3m_sde",
    "heunpp2": "heunpp2",
    "gradient_estimation": "gradient_estimation",
    "ipndm_v": "ipndm_v",
    "res_multistep_ancestral": "res_multistep_ancestral",
    "er_sde": "er_sde",
    "euler_cfg_pp": "euler_cfg_pp",
    "euler_ancestral_cfg_pp": "euler_ancestral_cfg_pp",
    "dpmpp_2m_cfg_pp": "dpmpp_2m_cfg_pp",
    "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_ancestral_cfg_pp",
    "res_multistep_cfg_pp": "res_multistep_cfg_pp",
    "res_multistep_ancestral_cfg_pp": "res_multistep_ancestral_cfg_pp",
    "gradient_estimation_cfg_pp": "gradient_estimation_cfg_pp",
    "exp_heun_2_x0": "exp_heun_2_x0",
    "exp_heun_2_x0_sde": "exp_heun_2_x0_sde",
    "seeds_2": "seeds_2",
    "seeds_3": "seeds_3",
    "sa_solver": "sa_solver",
    "sa_solver_pece": "sa_solver_pece",
}
# Those ComfyUI runs otherwise in detail: taken, with a notice. ComfyUI's UniPC (comfy/extra_samplers) runs
# at order 3, and its KSampler drops the second-to-last sigma for uni_pc samplers; its deis is DEIS with
# tabulated coefficients (`pictor.sampling_deis`); its res_multistep_ancestral renoises with the
# variance-exploding ancestral split on a flow model too, pictor's with the rectified-flow one
# (`pictor.sampling_res`); its DPM++ 2M, RES and gradient estimation CFG++ are written for a signal scale
# of 1 (`pictor.sampling_cfg_pp`); its sa_solver(_pece) sets its SDE interval through the model's shift,
# which pictor takes at FLUX.1's 1.15 (`pictor.sampling_sa_solver`): said where the graph's shift differs
# (`_comfy_sa_solver`). No pictor sampler (left as an unknown `sampler_name`): dpm_fast, dpm_adaptive, ddpm
# and ddim.
_UNIPC = (
    "ComfyUI runs UniPC at order 3 (and its KSampler drops the second-to-last step for it), where pictor's "
    "unipc is bh2 at order 2"
)
COMFY_SAMPLER_NOTICES = {
    "uni_pc": (
        f"the graph's sampler uni_pc is UniPC's bh1 variant; pictor's unipc (bh2) is taken for it ({_UNIPC})"
    ),
    "uni_pc_bh2": (
        f"the graph's sampler uni_pc_bh2 is taken as pictor's unipc, which differs in detail: {_UNIPC}"
    ),
    "deis": (
        "the graph's sampler deis is taken as pictor's deis, which differs in detail: ComfyUI's is another "
        "DEIS variant (tabulated coefficients, no lower-order final steps), pictor's is diffusers' "
        "third-order log-rho DEIS"
    ),
    "res_multistep_ancestral": (
        "the graph's sampler res_multistep_ancestral is taken as pictor's, which differs in its renoising: "
        "ComfyUI's splits each step as for a variance-exploding model also on a flow model, which leaves the "
        "sample off the flow path; pictor's renoises with the rectified-flow ancestral step (as its "
        "euler_ancestral), so the images differ"
    ),
    **{
        name: (
            f"the graph's sampler {name} is taken as pictor's, which differs: ComfyUI writes it for a "
            "signal scale of 1, so on a flow model its guidance term enters with weight 1 where the flow "
            "path's data part is 1 - t'; pictor's weighs it by 1 - t' (README: CFG++)"
            + (", and renoises with the rectified-flow ancestral step" if "ancestral" in name else "")
            + ", so the images differ"
        )
        for name in (
            "dpmpp_2m_cfg_pp",
            "res_multistep_cfg_pp",
            "res_multistep_ancestral_cfg_pp",
            "gradient_estimation_cfg_pp",
        )
    },
}
# ComfyUI's schedulers with a pictor schedule. simple and sgm_uniform space the model's own (shifted) times
# evenly, as pictor's own schedule does (its default, None); karras, exponential and beta space ComfyUI's
# table of the model's sigmas, not diffusers' FLUX.1 sigmas as pictor's of those names: taken, with a
# notice. kl_optimal, linear_quadratic and normal are ComfyUI's on a FLUX.1 model
# (pictor.sampling_schedules): taken as they are.
COMFY_SCHEDULERS = {
    "simple": None,
    "normal": "normal",
    "sgm_uniform": None,
    "karras": "karras",
    "exponential": "exponential",
    "beta": "beta",
    "kl_optimal": "kl_optimal",
    "linear_quadratic": "linear_quadratic",
}
COMFY_SCHEDULER_NOTICES = {
    name: (
        f"the graph's scheduler {name} is taken as pictor's {name} schedule, which differs: ComfyUI's "
        f"{name} spaces its table of the model's sigmas{to}, pictor's spaces diffusers' FLUX.1 sigmas "
        "(the last before 0 at the shifted 1/N): the steps differ"
    )
    for name, to in (
        ("karras", " (down to about 0.0003)"),
        ("exponential", " (down to about 0.0003)"),
        ("beta", ""),
    )
}
# ComfyUI's FLUX.1 [dev] without a ModelSamplingFlux node: this shift (mu) at every size; pictor's own
# schedule shifts by the image's size, and agrees where its shift is this close (about 4096 patches).
COMFY_FLUX_SHIFT = 1.15
SHIFT_CLOSE = 0.02
COMFY_MAX_SEED = 2**64 - 1  # ComfyUI's seeds (torch.manual_seed takes no more)


def settings_from_comfy(text: str, path: str = "the image") -> ImportedSettings:
    """A ComfyUI graph's settings (`pictor.comfy_workflow`), mapped as A1111's text is (module docstring);
    `path` names the image in errors."""
    where = f"{path}: its ComfyUI graph (the 'prompt' chunk)"
    try:
        return _comfy_settings(text)
    except ComfyGraphError as exc:
        raise SettingsImportError(f"{where}: {exc}") from None
    except Exception as exc:  # a graph no rule here foresaw; the cause is kept, so a bug still shows
        raise SettingsImportError(
            f"{where} could not be read ({type(exc).__name__}: {str(exc)[:200]})"
        ) from exc


def _comfy_settings(text: str) -> ImportedSettings:
    graph = read_comfy_graph(text)
    out = ImportedSettings(notices=list(graph.notices), source="comfyui")
    v = out.values
    if graph.prompt is not None:
        v["prompt"] = comfy_prompt_as_a1111(graph.prompt, out.notices)
    v["negative"] = comfy_prompt_as_a1111(_comfy_negative(graph, out), out.notices, "negative prompt")
    v["prompt_weights"] = True  # ComfyUI, like A1111, always reads its brackets as weights
    for dest, value in (("steps", graph.steps), ("size", graph.size)):
        if value is not None:
            v[dest] = value
    _comfy_seed(graph.seed, out)
    _comfy_guidance(graph, out)
    _comfy_tcfg(graph, out)
    if graph.sampler_name is not None:
        _comfy_sampler(graph.sampler_name, out)
    if graph.scheduler is not None:
        _comfy_schedule(graph.scheduler, out)
    _comfy_shift(graph, out)
    _comfy_sa_solver(graph, out)
    take_hires(graph.hires, out)  # a two-pass graph's second pass (pictor.comfy_passes)
    if graph.batch_size is not None and graph.batch_size > 1:
        # ComfyUI draws a batch's noise from one seed, so the graph does not say which of its pictures this
        # file is (A1111's text gives each picture its own seed, so its Batch size goes unsaid).
        out.notices.append(
            f"the graph drew a batch of {graph.batch_size} from one seed: this run draws -n images (one by "
            "default), each from its own seed"
        )
    return out


def _cfg_pp_at_1(graph: ComfySettings) -> bool:
    """A CFG++ sampler at CFG 1 without FLUX guidance: ComfyUI's CFG++ samplers turn off its skipping of
    the negative pass at CFG 1 (disable_cfg1_optimization) and renoise with it, as pictor's do."""
    sampler = COMFY_SAMPLERS.get(graph.sampler_name or "")
    return sampler in CFG_PP_SAMPLERS and graph.cfg == 1 and graph.guidance is None


def _comfy_negative(graph: ComfySettings, out: ImportedSettings) -> str:
    """The negative prompt where ComfyUI used it: at CFG 1 it never evaluates one (comfy/samplers.py's
    sampling_function) but for a CFG++ sampler, and with FLUX guidance taken the real CFG it acts through
    is not."""
    negative = graph.negative or ""
    if (
        not negative
        or graph.cfg is None
        or (graph.cfg != 1 and graph.guidance is None)
        or _cfg_pp_at_1(graph)
    ):
        return negative
    why = (
        "ComfyUI does not use it at CFG 1"
        if graph.cfg == 1
        else f"it acts through the sampler's CFG {graph.cfg:g}, which is not taken"
    )
    out.notices.append(f"the graph's negative prompt '{shortened(negative)}' is not taken: {why}")
    return ""


def _comfy_seed(seed: int | None, out: ImportedSettings) -> None:
    if seed is None:
        return
    if not 0 <= seed <= COMFY_MAX_SEED:
        raise ComfyGraphError(f"its seed {seed} is outside ComfyUI's seeds (0 to 2**64 - 1)")
    if seed <= MAX_SEED:
        out.values["seed"] = seed
        return
    # ComfyUI's seeds run to 2**64 - 1; torch's CPU generator (both seed it) keeps the low 32 bits
    low = seed % 2**32
    out.values["seed"] = low
    out.notices.append(
        f"the graph's seed {seed} is beyond pictor's; {low}, its low 32 bits, draws the same noise in "
        "torch's generator and is taken"
    )


def _comfy_guidance(graph: ComfySettings, out: ImportedSettings) -> None:
    """FLUX guidance where the graph sets it (as Forge's Distilled CFG Scale is taken); else a CFG other
    than 1, as real CFG (A1111's CFG scale); else nothing: without FluxGuidance, ComfyUI's FLUX.1 [dev]
    takes its default guidance 3.5 (comfy/model_base.py), and the model's own default is used here."""
    if graph.guidance is not None:
        out.values["guidance"] = graph.guidance
        if graph.cfg is not None and graph.cfg != 1:
            out.notices.append(
                f"the graph's FLUX guidance {graph.guidance:g} is taken as --guidance; its sampler's CFG "
                f"{graph.cfg:g} (real CFG on top, which pictor does not run beside distilled guidance) is not"
            )
        return
    if graph.cfg is None:
        return
    if graph.cfg != 1 or _cfg_pp_at_1(graph):  # a CFG++ sampler's CFG 1 runs the negative pass too
        out.values["guidance"] = graph.cfg
        return
    out.notices.append(
        "the graph sets no FLUX guidance (no FluxGuidance node) and samples at CFG 1: ComfyUI then gives a "
        "FLUX.1 [dev] model its default guidance 3.5 (FLUX.1 [schnell] takes none), so no guidance is taken "
        "and the model's own default is used (--guidance 3.5 for a FLUX.1 [dev] model)"
    )


def _comfy_tcfg(graph: ComfySettings, out: ImportedSettings) -> None:
    """ComfyUI's TCFG node is pictor's tcfg (`comfy_workflow.GUIDANCE_NODES`) where the graph's real CFG is
    taken; it does nothing at CFG 1, and acts through a CFG that is not taken beside FLUX guidance."""
    if not graph.tcfg:
        return
    if graph.guidance is None and graph.cfg is not None and graph.cfg != 1:
        take_guidance_method(GuidanceMethod("tcfg"), out)
        if COMFY_SAMPLERS.get(graph.sampler_name or "") in CFG_PP_SAMPLERS:
            out.notices.append(
                "the graph's TCFG with a CFG++ sampler is taken as pictor's tcfg, which differs in the "
                "renoise: ComfyUI's TCFG damps the unconditional prediction before CFG, so its CFG++ sampler "
                "renoises with the damped one; pictor's renoises with the negative pass's own"
            )
        return
    why = (
        f"it acts through the sampler's CFG {graph.cfg:g}, which is not taken beside the FLUX guidance"
        if graph.guidance is not None and graph.cfg is not None and graph.cfg != 1
        else "pictor's guidance methods act above guidance 1 only (ComfyUI's CFG++ sampler runs the negative "
        "pass at CFG 1, where TCFG damps what it renoises with)"
        if _cfg_pp_at_1(graph)
        else "ComfyUI runs no negative pass at CFG 1, so it did nothing"
    )
    out.notices.append(f"the graph's TCFG (pictor's --guidance-method tcfg) is not taken: {why}")


def _comfy_sampler(name: str, out: ImportedSettings) -> None:
    if name in COMFY_SAMPLERS:
        out.values["sampler"] = COMFY_SAMPLERS[name]
        if name in COMFY_SAMPLER_NOTICES:
            out.notices.append(COMFY_SAMPLER_NOTICES[name])
    else:
        out.sampler_name = name


def _comfy_sa_solver(graph: ComfySettings, out: ImportedSettings) -> None:
    """ComfyUI's sa_solver(_pece) adds noise where the step lands between its model's percent_to_sigma of
    0.2 and 0.8 (and starts from t = 1 at that of 1e-4): on a FLUX.1 model a time shift by the model's mu,
    1.15 without a ModelSamplingFlux node, as pictor's; a ModelSamplingFlux node shifts by the size's mu."""
    if COMFY_SAMPLERS.get(graph.sampler_name or "") not in ("sa_solver", "sa_solver_pece"):
        return
    if not graph.model_sampling or graph.size is None:
        return
    width, height = graph.size
    mu = resolution_mu((width // 16) * (height // 16))
    if abs(mu - COMFY_FLUX_SHIFT) <= SHIFT_CLOSE:
        return
    out.notices.append(
        f"the graph's sampler {graph.sampler_name} adds noise on the steps landing in its SDE interval (20% "
        "to 80% of the model's times), which ComfyUI places by the model's shift: its ModelSamplingFlux "
        f"shifts by {mu:.2f} at {width}x{height}, where pictor's {graph.sampler_name} places it at FLUX.1's "
        f"{COMFY_FLUX_SHIFT:g} (t = 0.93 to 0.44): which steps add noise can differ"
    )


def _comfy_schedule(name: str, out: ImportedSettings) -> None:
    if name in COMFY_SCHEDULERS:
        if COMFY_SCHEDULERS[name] is not None:
            out.values["schedule"] = COMFY_SCHEDULERS[name]
        if name in COMFY_SCHEDULER_NOTICES:
            out.notices.append(COMFY_SCHEDULER_NOTICES[name])
    else:
        out.notices.append(
            f"the graph's scheduler '{name}' has no pictor equivalent: the model's own is used "
            f"(--schedule {', '.join(SCHEDULES)})"
        )


def _comfy_shift(graph: ComfySettings, out: ImportedSettings) -> None:
    """Without a ModelSampling node ComfyUI's FLUX.1 [dev] shifts its schedule by a constant 1.15, where
    pictor's own shifts by the image's size (`pictor.flow.resolution_mu`): said where they differ."""
    if graph.model_sampling or graph.size is None:
        return
    width, height = graph.size
    mu = resolution_mu((width // 16) * (height // 16))
    if abs(mu - COMFY_FLUX_SHIFT) <= SHIFT_CLOSE:
        return
    out.notices.append(
        f"the graph has no ModelSamplingFlux node: ComfyUI then shifts a FLUX.1 [dev] model's schedule by a "
        f"constant {COMFY_FLUX_SHIFT:g} at every size, where pictor's schedules shift by the image's size "
        f"({mu:.2f} at {width}x{height}; {COMFY_FLUX_SHIFT:g} at 1024x1024): the steps differ"
    )
