"""Regional attention: regional prompts (`pictor.regional_prompts`) as one transformer pass with a masked
joint attention, instead of one pass per prompt (Regional-Prompting-FLUX's attention mask; for FLUX the
counterpart of ComfyUI's "attention couple").

The conditional pass reads the whole prompt's tokens followed by each region's, and every block's joint
attention gets a bias over the ``[text, image]`` tokens:

- the whole prompt's tokens, and image tokens (every one of them), see each other: the whole prompt holds
  over the whole picture, and the picture stays one picture;
- a region's tokens see themselves and the image tokens that its box covers, and no other text;
- an image token sees a region's tokens only when the region's box covers it, with the bias
  ``log(cover x strength)``: a token half covered by the box gives the region half the weight of one wholly
  inside, and a strength of 2 doubles the region's share against the rest (1 leaves attention as it is).

So each region's prompt reaches only its box, while the tokens attend to one another across the whole
image in the same pass. The cost grows with the text (the regions' tokens), not with a pass per region.

A region's prompt brings only its own tokens, not the encoder's padding after them: a box that also saw a
region's padding (64 tokens for the default model) would spread its attention over them, and on the
shipped model that cut the share of boxes holding their object from 0.34 to 0.13 (60 dev prompts, one
image each; benchmarks/results/regional-attention-padding.json). Padding that a region's shorter
prompt-editing stage leaves within its slot is hidden (seen by nothing, it sees only itself).

Anything else in the sequence is global: tokens after the image (a Kontext context image) are seen and see
as image tokens outside every box. The negative prompt's pass (classifier-free guidance) is padded with
tokens that see only each other and that nothing sees, so the negative pass computes what it would alone.

Regional-Prompting-FLUX's controls (`RegionalOptions`; RPF's pipeline_flux_regional.py and
transformer_flux.py):

- steps (RPF's ``mask_inject_steps``, ``if i < mask_inject_steps``): the mask applies in a sampler run's
  first steps only; after them the call is the prompt's alone, as RPF's (``chosen_prompt_embeds =
  prompt_embeds``): the regions' tokens leave the sequence and no bias is given, so such a step computes
  exactly what the request without regions computes;
- double and single block intervals (RPF's ``index_block % double_inject_blocks_interval == 0``): within the
  window the mask applies in every k-th block; in the others the regions' tokens stay in the sequence (their
  states flow on to the next masked block) but are hidden from the prompt's and the image's tokens, which
  then compute what they would without regions. RPF instead drops the mask there, so that every region's
  words reach the whole picture, the bleed the mask exists to stop; pictor keeps the unmasked attention of
  the prompt alone, which is also RPF's base branch;
- base ratio (RPF's ``hidden_states = hidden_states*(1-base_ratio) + hidden_states_base*base_ratio``): in
  masked blocks the image tokens' attention output is that blend of the masked attention's and the
  unmasked one's (the image and the prompt's tokens alone, RPF's base prompt branch). pictor's prompt
  tokens already see only the prompt and the image, as RPF's separate base text stream does, so one pass
  holds both; the blend is taken before the attention's output projection, which is linear, so it is
  RPF's after it. That holds in the double blocks; in the single blocks RPF carries a second copy of the
  image tokens (its base stream) through each block, where pictor takes the unmasked attention from the one
  blended stream: an approximation without a second pass.

Their defaults (every step, every block, ratio 0) give the one bias of every block, as before them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pictor.models.block_bias import BlockBias
from pictor.models.text_encoder import TextEmbeddings

__all__ = [
    "REGIONAL_OPTION_FIELDS",
    "RegionalAttention",
    "RegionalOptions",
    "check_regional_options",
    "padded_text_bias",
    "regional_bias",
    "regional_record_fields",
]


@dataclass(frozen=True)
class RegionalOptions:
    """Regional-Prompting-FLUX's controls of regional attention (see the module's docstring).

    steps: the run's steps the mask applies in, from the first: a count (a whole number, 1 or more; RPF's
    mask_inject_steps) or a share of the run's steps (0 < steps < 1: the first ceil(share x steps)); None:
    every step. double_interval / single_interval: the mask applies in double (single) block i when
    ``i % interval == 0`` (1: every block). base_ratio: in masked blocks, the share of the image tokens'
    attention output taken from the unmasked attention (0: none, 1: all)."""

    steps: float | None = None
    double_interval: int = 1
    single_interval: int = 1
    base_ratio: float = 0.0

    @property
    def per_block(self) -> bool:
        """Whether the blocks' biases differ (else one bias serves every block)."""
        return self.double_interval != 1 or self.single_interval != 1 or self.base_ratio > 0

    def window(self, steps: int) -> int:
        """How many of a run's `steps` steps, from the first, the mask applies in."""
        if self.steps is None:
            return steps
        if self.steps < 1:
            return min(steps, math.ceil(self.steps * steps - 1e-9))
        return min(steps, int(self.steps))


def regional_bias(
    cover: Tensor,
    strength: Tensor,
    base_len: int,
    region_len: list[int],
    extra: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The attention bias ``[S, S]`` (0: seen, -inf: not, else a log weight) for a sequence of the whole
    prompt's `base_len` tokens, each region's ``region_len[i]`` tokens, N image tokens and `extra` tokens
    after them (S = base_len + sum(region_len) + N + extra).

    cover ``[R, N]``: the share of each image token's cell that each region's box covers (0..1);
    strength ``[R]``: each region's strength (> 0)."""
    regions, n = cover.shape
    if len(region_len) != regions or strength.shape != (regions,):
        raise ValueError(
            f"regional_bias: {regions} regions' cover, {len(region_len)} lengths, {strength.shape}"
        )
    text = base_len + sum(region_len)
    size = text + n + extra
    inf = -math.inf
    bias = torch.full((size, size), inf, dtype=torch.float32)
    bias[:base_len, :base_len] = 0.0
    bias[:base_len, text:] = 0.0
    bias[text:, :base_len] = 0.0
    bias[text:, text:] = 0.0
    start = base_len
    for i, length in enumerate(region_len):
        end = start + length
        inside = cover[i] > 0
        bias[start:end, start:end] = 0.0
        seen = torch.full((n,), inf, dtype=torch.float32)
        seen[inside] = 0.0
        bias[start:end, text : text + n] = seen  # the region's words see its box
        weight = torch.full((n,), inf, dtype=torch.float64)
        weight[inside] = torch.log(cover[i][inside].double() * float(strength[i]))
        bias[text : text + n, start:end] = weight.float()[:, None]  # the box sees the region's words
        start = end
    return bias.to(dtype)


def padded_text_bias(text_len: int, padded_len: int, rest: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The bias ``[S, S]`` for a prompt of `text_len` tokens padded to `padded_len` (S = padded_len + rest,
    `rest` the image and later tokens): the prompt and the rest see each other, as without padding; the
    padding sees only itself and nothing sees it."""
    if not 0 < text_len <= padded_len:
        raise ValueError(f"padded_text_bias: text of {text_len} tokens padded to {padded_len}")
    size = padded_len + rest
    bias = torch.zeros((size, size), dtype=torch.float32)
    bias[:, text_len:padded_len] = -math.inf
    bias[text_len:padded_len, :] = -math.inf
    bias[text_len:padded_len, text_len:padded_len] = 0.0
    return bias.to(dtype)


REGIONAL_OPTION_FIELDS = (
    "regional_steps",
    "regional_double_interval",
    "regional_single_interval",
    "regional_base_ratio",
)


def _whole(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


# Bounds past any real use (FLUX.1 has 19 double and 38 single blocks; generation_settings.MAX_STEPS is
# 1000): a window or interval beyond them means the same as them, and a bound keeps records and the
# page's JSON numbers small (JavaScript writes 1e21 and up in exponent form, which integer fields refuse).
MAX_WINDOW_STEPS = 10_000
MAX_BLOCK_INTERVAL = 1_000


def check_regional_options(r: Any) -> str | None:
    """What is wrong with a request's regional attention options (`RegionalOptions`), naming the field;
    None: nothing. They need regional attention (and regions) to apply to."""
    given = [name for name in REGIONAL_OPTION_FIELDS if getattr(r, name, None) is not None]
    if not given:
        return None
    if not (getattr(r, "regional_attention", False) and getattr(r, "regions", None)):
        them = "it" if len(given) == 1 else "them"
        return (
            f"{', '.join(given)} shape{'s' if len(given) == 1 else ''} regional attention: add regional "
            f"attention (and regions) or drop {them}"
        )
    steps = r.regional_steps
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, (int, float)) or not math.isfinite(steps):
            return f"regional_steps must be a number, got {steps!r}"
        if steps <= 0 or (steps >= 1 and not _whole(steps)) or steps > MAX_WINDOW_STEPS:
            return (
                "regional_steps must be a share of the steps above 0 and below 1, or a whole number of steps "
                f"(1 to {MAX_WINDOW_STEPS}), got {steps!r}"
            )
    for name in ("regional_double_interval", "regional_single_interval"):
        v = getattr(r, name)
        if v is not None and (not _whole(v) or not 1 <= v <= MAX_BLOCK_INTERVAL):
            return (
                f"{name} must be a whole number from 1 to {MAX_BLOCK_INTERVAL} (the mask in every that many "
                f"blocks), got {v!r}"
            )
    ratio = r.regional_base_ratio
    if ratio is not None and (
        isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1
    ):
        return f"regional_base_ratio must be a number from 0 to 1, got {ratio!r}"
    return None


def regional_record_fields(r: Any) -> dict[str, Any]:
    """A request's regional attention options that are not their defaults, for its record (a record
    without them reproduces as before them)."""
    if not (getattr(r, "regions", None) and getattr(r, "regional_attention", False)):
        return {}
    out: dict[str, Any] = {}
    if r.regional_steps is not None:
        out["regional_steps"] = r.regional_steps
    for name in ("regional_double_interval", "regional_single_interval"):
        if getattr(r, name) not in (None, 1):
            out[name] = int(getattr(r, name))
    if r.regional_base_ratio:
        out["regional_base_ratio"] = r.regional_base_ratio
    return out


class RegionalAttention:
    """One sampler run's regional attention: the conditional row's text (the prompt's tokens, then each
    region's), the negative prompt's padded to its length, and each model call's attention bias.

    encoded: each text's embeddings at each of its prompt-editing stages (`pictor.guided_velocity`'s
    passes): the prompt's first, then each region's, then (under CFG) the negative prompt's. The lengths are
    read from the first stage; an encoder pads every text to one length, so every stage has it."""

    def __init__(
        self,
        cover: Tensor,
        strength: Tensor,
        encoded: list[list[TextEmbeddings]],
        negative: bool,
        dtype: torch.dtype,
        device: torch.device,
        options: RegionalOptions | None = None,
    ) -> None:
        regions = cover.shape[0]
        self.options = options or RegionalOptions()
        if len(encoded) != 1 + regions + (1 if negative else 0):
            raise ValueError(f"RegionalAttention: {len(encoded)} texts for {regions} regions")
        self.cover, self.strength = cover.cpu(), strength  # the bias is built on the CPU, then moved
        self.base_len = encoded[0][0].tokens.shape[1]
        # each region's slot: its longest stage's real tokens (the encoder's padding left out)
        self.region_len = [max(int(e.mask[0].sum()) for e in texts) for texts in encoded[1 : 1 + regions]]
        self.text_len = self.base_len + sum(self.region_len)
        self.negative_len = encoded[-1][0].tokens.shape[1] if negative else None
        self.dtype, self.device = dtype, device
        self._masks: dict[tuple[int, ...], tuple[Tensor, Tensor | None, Tensor | None]] = {}
        self._hidden: dict[int, tuple[Tensor, Tensor]] = {}  # a text mask's hidden tokens, by the tensor

    def rows(self, texts: list[TextEmbeddings]) -> list[TextEmbeddings]:
        """The texts of one step (prompt, regions, negative) as the pass's rows: [conditional, negative]."""
        regions = len(self.region_len)
        prompt, slots = texts[0], list(zip(texts[1 : 1 + regions], self.region_len, strict=True))
        out = [
            TextEmbeddings(
                tokens=torch.cat([prompt.tokens] + [e.tokens[:, :n] for e, n in slots], dim=1),
                mask=torch.cat([prompt.mask] + [e.mask[:, :n] for e, n in slots], dim=1),
                pooled=prompt.pooled,  # the whole prompt's pooled vector, as FLUX.1 conditions on one
            )
        ]
        if self.negative_len is not None:
            negative = texts[1 + regions]
            pad = self.text_len - negative.tokens.shape[1]
            out.append(
                TextEmbeddings(
                    tokens=self.pad_text(negative.tokens),
                    mask=torch.cat(
                        [negative.mask, negative.mask.new_zeros(negative.mask.shape[0], pad)], dim=1
                    ),
                    pooled=negative.pooled,
                )
            )
        return out

    def pad_text(self, tokens: Tensor) -> Tensor:
        """Token states ``[B, L, D]`` followed by zeros to the conditional row's text length."""
        pad = tokens.new_zeros(tokens.shape[0], self.text_len - tokens.shape[1], tokens.shape[2])
        return torch.cat([tokens, pad], dim=1)

    def mask(
        self, rows: int, index: Tensor | None, extra: int, text_mask: Tensor, negative: bool = True
    ) -> Tensor:
        """The bias ``[rows or 1, 1, S, S]`` for a call on `rows` rows (conditional rows first, then as many
        negative ones under CFG), on the image tokens at `index` (a denoise window; None: all), with `extra`
        tokens after them (a Kontext context image). text_mask ``[rows, T]``: the call's `TextEmbeddings.mask`
        (the first row the conditional one's real tokens), by which a region's padding is hidden.
        `negative` False: a call on conditional rows only (a step outside a guidance interval,
        `pictor.guidance_methods`). With RPF's block intervals or base ratio (`RegionalOptions.per_block`) a
        `BlockBias` of that bias and the unmasked one, laid out alike.

        Only the two distinct ``[S, S]`` biases are kept (per window and set of hidden tokens); the rows are
        laid out per call and dropped after it: at FLUX.1's 1024x1024 with 4 regions one bias is about 44 MB
        in bf16, and a cache of every call's rows would hold one copy per image and CFG half for the run."""
        cond, negative_bias, base = self._biases(index, extra, text_mask)
        masked = self._rows(rows, cond, negative_bias if negative else None)
        if base is None:
            return masked
        o = self.options
        return BlockBias(
            masked,
            self._rows(rows, base, negative_bias if negative else None),
            o.double_interval,
            o.single_interval,
            o.base_ratio,
            self.text_len,
        )

    @staticmethod
    def _rows(rows: int, cond: Tensor, negative_bias: Tensor | None) -> Tensor:
        if negative_bias is None:
            return cond[None, None]  # one bias for every row: broadcast, not copied
        half = rows // 2
        return torch.cat(
            [cond[None, None].expand(half, -1, -1, -1), negative_bias[None, None].expand(half, -1, -1, -1)]
        )

    def _biases(
        self, index: Tensor | None, extra: int, text_mask: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The conditional row's bias, the negative row's (None without CFG) and, with per-block options,
        the conditional row's unmasked bias (the regions' tokens hidden from the prompt's and the image's;
        else None), on the device, cached."""
        # A run's text masks are a few tensors (one per prompt-editing stage), each given again at every call
        # of its steps: their hidden tokens are found once (held with the tensor, so its id is not reused).
        hidden = self._hidden.get(id(text_mask))
        if hidden is None or hidden[0] is not text_mask:
            found = (text_mask[0, self.base_len :] == 0).nonzero().squeeze(1).cpu() + self.base_len
            hidden = self._hidden[id(text_mask)] = (text_mask, found)
        where = (int(index[0]), int(index[-1]), index.numel()) if index is not None else ()
        key = (extra, *where, *hidden[1].tolist())
        if key not in self._masks:
            cover = self.cover if index is None else self.cover[:, index.cpu()]
            cond = regional_bias(cover, self.strength, self.base_len, self.region_len, extra)
            cond[:, hidden[1]] = -math.inf
            cond[hidden[1]] = -math.inf
            cond[hidden[1], hidden[1]] = 0.0  # (each hidden token sees itself)
            negative = None
            if self.negative_len is not None:
                rest = cover.shape[1] + extra
                negative = padded_text_bias(self.negative_len, self.text_len, rest).to(
                    self.device, self.dtype
                )
            base = None
            if self.options.per_block:  # the image and later tokens see no region's tokens
                base = cond.clone()
                base[self.text_len :, self.base_len : self.text_len] = -math.inf
                base = base.to(self.device, self.dtype)
            self._masks[key] = (cond.to(self.device, self.dtype), negative, base)
        return self._masks[key]
