"""Weights stored narrower than they compute: FP8 or GGML-quantized linear layers, widened layer by layer.

FLUX.1's transformer is 11.9B parameters, 23.8 GB in bf16; its blocks' linear layers hold all but about
1% of them. Stored as float8 (e4m3fn, the layout of the ``flux1-dev-fp8`` files ComfyUI and others
share), they take half that, and each layer's weight is cast to the compute dtype only while the layer
runs, so at most one layer's wide copy exists at a time (diffusers calls this layerwise casting,
ComfyUI "weight dtype fp8"). Everything else (embedders, norms, biases, the final layer) stays in the
compute dtype: they are small and the most sensitive to rounding.

GGML's block formats (Q8_0, Q4_0, Q4_K, ... as in the GGUF files that ComfyUI-GGUF loads, e.g. city96's
FLUX.1 conversions) go further: Q8_0 takes 8.5 bits a weight, Q4_K 4.5. A :class:`QuantizedLinear` keeps the
blocks' bytes as a uint8 ``weight`` ([out, bytes per row]) beside a ``ggml_type`` buffer (the GGML type id),
so a bundle's safetensors file says by itself which layers are quantized and how; the weight tensor carries
its format as attributes (``ggml_format``, ``ggml_shape``) so that the code that only sees a layer's weight
(LoRA and DoRA wrappers) can widen it.

bitsandbytes' 4-bit weights (Forge's and diffusers' NF4 / FP4 files) are kept the same way, as formats
``NF4`` and ``FP4`` in pictor's own row layout (:mod:`pictor.models.bnb_quants`, 4.5 bits a weight); their
``ggml_type`` holds a pictor id outside GGML's range (:data:`FOUR_BIT_TYPE_IDS`), so the same buffer says
which layers are 4-bit and a GGML reader never mistakes them for one of its types.

``store_fp8`` turns a model's block linears into :class:`StoredLinear`; ``quantize_structure`` turns named
linears into :class:`QuantizedLinear` before a quantized state dict is loaded; ``place`` moves a model to a
device and compute dtype while leaving stored weights in their storage dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pictor.models import bnb_quants
from pictor.models.ggml_quants import FORMATS, GGMLError, dequantize, format_by_id, row_bytes

FP8_DTYPES: frozenset[torch.dtype] = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})
FP8_STORAGE = torch.float8_e4m3fn  # what `pictor convert dtype --dtype fp8` writes
FP8_MAX = float(torch.finfo(FP8_STORAGE).max)  # 448: torch saturates larger values silently
STORED_PREFIXES = ("double_blocks.", "single_blocks.")
GGML_TYPE_KEY = "ggml_type"  # the buffer beside a quantized layer's weight: its GGML type id
DENSE_FORMATS = frozenset({"F32", "F16", "BF16"})  # GGML types that are plain floats, not blocks
# bitsandbytes' 4-bit formats in pictor's rows: ids far past GGML's (about 40 types), never reused by it.
FOUR_BIT_TYPE_IDS = {"NF4": 1004, "FP4": 1005}
_FOUR_BIT_BY_ID = {v: k for k, v in FOUR_BIT_TYPE_IDS.items()}


def type_id_of(fmt: str) -> int:
    """The ``ggml_type`` value of a stored format: GGML's id, or pictor's for NF4 / FP4."""
    return FOUR_BIT_TYPE_IDS[fmt] if fmt in FOUR_BIT_TYPE_IDS else FORMATS[fmt].type_id


def format_of_type_id(type_id: int) -> str:
    """The stored format a ``ggml_type`` value names (raises GGMLError for an unknown id)."""
    return _FOUR_BIT_BY_ID.get(type_id) or format_by_id(type_id).name


def stored_row_bytes(fmt: str, cols: int) -> int:
    """Bytes a row of ``cols`` values takes in a stored block format."""
    return bnb_quants.row_bytes(cols) if fmt in FOUR_BIT_TYPE_IDS else row_bytes(fmt, cols)


def stored_columns(fmt: str, nbytes: int) -> int:
    """How many values a stored row of ``nbytes`` bytes holds (the inverse of :func:`stored_row_bytes`)."""
    if fmt in FOUR_BIT_TYPE_IDS:
        return nbytes // bnb_quants.ROW_BLOCK_BYTES * bnb_quants.ROW_BLOCK
    return nbytes // FORMATS[fmt].type_size * FORMATS[fmt].block_size


def dequantize_stored(blocks: Tensor, fmt: str, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """A stored layer's blocks (GGML or pictor's NF4 / FP4 rows) as a ``dtype`` matrix."""
    if fmt in FOUR_BIT_TYPE_IDS:
        return bnb_quants.dequantize_rows(blocks, fmt, shape, dtype)
    return dequantize(blocks, fmt, shape, dtype)


class _NarrowWeightLinear(torch.autograd.Function):
    """``x W^T + b`` with a frozen narrow (FP8) ``W``, widened for the product only.

    Plain autograd would keep each layer's widened copy for the backward pass (the input gradient needs
    ``W``), so a LoRA trained on an FP8 base would hold the whole base in the wide dtype again. Here the
    backward pass keeps the FP8 parameter itself (no extra memory) and widens it once more.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        dtype = _compute_dtype(x)
        out = F.linear(x, widen(weight, dtype), None if bias is None else bias.to(dtype))
        ctx.save_for_backward(weight)
        # Saved tensors come back as new Python objects: a quantized weight's format travels beside it.
        ctx.ggml = (ggml_format(weight), getattr(weight, "ggml_shape", None))
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        (weight,) = ctx.saved_tensors
        fmt, shape = ctx.ggml
        wide = weight.to(grad.dtype) if fmt is None else dequantize_stored(weight, fmt, shape, grad.dtype)
        grad_x = (grad @ wide).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b


def _compute_dtype(x: Tensor) -> torch.dtype:
    """What the product runs in: autocast's dtype under autocast (no wide float32 detour), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def narrow_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear``, with an FP8-stored or quantized weight widened per call (and kept narrow for the backward
    pass)."""
    if not is_stored(weight):
        return F.linear(x, weight, bias)  # autocast handles mixed dtypes, as for any nn.Linear
    if torch.is_grad_enabled():
        if weight.requires_grad:
            raise RuntimeError(
                "weights stored in FP8 are frozen: train a LoRA on them, or widen the model first"
            )
        return _NarrowWeightLinear.apply(x, weight, bias)
    dtype = _compute_dtype(x)
    return F.linear(x, widen(weight, dtype), None if bias is None else bias.to(dtype))


def ggml_format(t: Tensor) -> str | None:
    """The GGML block format a quantized weight is stored in ("Q4_K"), or None for any other tensor."""
    return getattr(t, "ggml_format", None)


def is_quantized(t: Tensor) -> bool:
    return ggml_format(t) is not None


def is_stored(t: Tensor) -> bool:
    """Stored narrower than it computes (FP8 or a GGML block format): widened per call, never trained."""
    return is_fp8(t) or is_quantized(t)


def widen(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The weight as a ``dtype`` matrix: FP8 cast, GGML blocks dequantized, anything else cast."""
    fmt = ggml_format(weight)
    if fmt is None:
        return weight.to(dtype)
    return dequantize_stored(weight.detach(), fmt, weight.ggml_shape, dtype)  # type: ignore[attr-defined]


def dense(weight: Tensor) -> Tensor:
    """The weight's values as a tensor that arithmetic works on: a quantized one dequantized to float32,
    anything else as it is (FP8 converts itself when it meets a wider dtype)."""
    return widen(weight, torch.float32) if is_quantized(weight) else weight


def tag_weight(weight: Tensor, fmt: str, shape: tuple[int, int]) -> None:
    """Attach a quantized weight's format (what :func:`widen` reads)."""
    weight.ggml_format = fmt  # type: ignore[attr-defined]
    weight.ggml_shape = shape  # type: ignore[attr-defined]


class StoredLinear(nn.Linear):
    """An ``nn.Linear`` (same keys) whose weight may be stored in FP8 and is cast per call."""

    casts_weight = True  # `place` keeps this module's `weight` in its storage dtype

    def forward(self, x: Tensor) -> Tensor:
        return narrow_linear(x, self.weight, self.bias)


def is_fp8(t: Tensor) -> bool:
    return t.dtype in FP8_DTYPES


class QuantizedLinear(StoredLinear):
    """A linear layer whose weight is GGML blocks (uint8, [out, bytes per row]), dequantized per call; or
    bitsandbytes' NF4 / FP4 values in pictor's rows (``fmt`` "NF4" / "FP4"), the same way.

    Same keys as ``nn.Linear`` plus ``ggml_type``. A load (``assign=True`` puts the file's tensor in place of
    the Parameter) tags the new weight with its format again, and refuses a file whose type disagrees.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str) -> None:
        nn.Module.__init__(self)
        if (fmt not in FORMATS or fmt in DENSE_FORMATS) and fmt not in FOUR_BIT_TYPE_IDS:
            choices = ", ".join([*block_formats(), *FOUR_BIT_TYPE_IDS])
            raise GGMLError(f"{fmt!r} is not a GGML block format or NF4 / FP4; choose one of {choices}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        size = (out_features, stored_row_bytes(fmt, in_features))
        self.weight = nn.Parameter(torch.empty(size, dtype=torch.uint8), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.register_buffer(GGML_TYPE_KEY, torch.tensor(type_id_of(fmt), dtype=torch.int32))
        self.register_load_state_dict_post_hook(_retag_after_load)
        self.tag()

    def tag(self) -> None:
        tag_weight(self.weight, self.fmt, (self.out_features, self.in_features))

    def forward(self, x: Tensor) -> Tensor:
        # A copy (deepcopy, or a move that puts a new Parameter in place) drops Python attributes: the
        # layer knows its format, so a weight without it is tagged again rather than read as numbers.
        if not is_quantized(self.weight):
            self.tag()
        return narrow_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.fmt}"


def _retag_after_load(module: nn.Module, incompatible: Any) -> None:
    assert isinstance(module, QuantizedLinear)
    stored = getattr(module, GGML_TYPE_KEY)
    if not stored.is_meta and int(stored) != type_id_of(module.fmt):
        raise GGMLError(
            f"a {module.fmt} layer was given weights of GGML type {int(stored)} "
            f"({format_of_type_id(int(stored))}); build the layers from the state dict's own ggml_type"
        )
    module.tag()


def block_formats() -> list[str]:
    """The GGML block formats a layer can be stored in (dequantized per call)."""
    return [name for name in FORMATS if name not in DENSE_FORMATS]


def quantized_formats(state_dict: Mapping[str, Tensor]) -> dict[str, str]:
    """{layer path: GGML format, or NF4 / FP4} for every quantized layer of a state dict (read off its
    ggml_type keys)."""
    suffix = "." + GGML_TYPE_KEY
    return {
        key[: -len(suffix)]: format_of_type_id(int(value))
        for key, value in state_dict.items()
        if key.endswith(suffix)
    }


def format_names(formats: Mapping[str, str]) -> str:
    """The GGML formats of {layer: format} for messages and records: "Q4_K+Q6_K"."""
    return "+".join(sorted(set(formats.values())))


def quantized_kind(formats: Mapping[str, str]) -> str:
    """What a message calls layers of these formats: "GGML-quantized", or "bitsandbytes 4-bit (NF4)"."""
    names = format_names(formats)
    if not set(formats.values()) & FOUR_BIT_TYPE_IDS.keys():
        return "GGML-quantized"
    return (
        f"bitsandbytes 4-bit ({names})"
        if set(formats.values()) <= FOUR_BIT_TYPE_IDS.keys()
        else f"quantized ({names})"
    )


def quantize_structure(model: nn.Module, formats: Mapping[str, str]) -> None:
    """Turn the named linear layers into :class:`QuantizedLinear` (on the model's device, usually meta),
    so that a state dict holding their blocks loads strictly."""
    for path, fmt in formats.items():
        module = model.get_submodule(path)
        if not isinstance(module, nn.Linear):
            raise GGMLError(f"{path} is quantized in the weights but is no linear layer in the model")
        with torch.device(module.weight.device):
            layer = QuantizedLinear(module.in_features, module.out_features, module.bias is not None, fmt)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)


def storage_name(model: nn.Module) -> str | None:
    """How the model's narrow weights are stored, for records: an FP8 dtype name, the GGML formats
    ("Q4_K+Q6_K"), both, or None when every weight is in the compute dtype."""
    fp8 = stored_dtype(model)
    formats = sorted({fmt for m in model.modules() if (fmt := ggml_format(getattr(m, "weight", None)))})
    names = ([str(fp8).removeprefix("torch.")] if fp8 else []) + (["+".join(formats)] if formats else [])
    return " ".join(names) or None


def stored_linear_paths(model: nn.Module) -> list[str]:
    """The linear layers that FP8 storage covers: those inside the double and single blocks."""
    return [
        path
        for path, module in model.named_modules()
        if path.startswith(STORED_PREFIXES) and isinstance(module, nn.Linear)
    ]


def fp8_problem(name: str, t: Tensor) -> str | None:
    """Why ``t`` cannot be stored in FP8 (e4m3fn), or None: torch clips values past 448 without a word."""
    t = t.float()  # one tensor at a time; FP8 itself has few operators
    finite = t[torch.isfinite(t)]
    biggest = float(finite.abs().max()) if finite.numel() else 0.0
    if finite.numel() != t.numel():
        return f"{name} holds non-finite values"
    if biggest > FP8_MAX:
        return f"{name} holds {biggest:.4g}, beyond FP8's range ({FP8_MAX:g})"
    return None


def store_fp8(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Make the block linears :class:`StoredLinear`; with ``dtype`` (an FP8 dtype) also cast their weights.

    Without ``dtype`` only layers whose weights already are FP8 (an FP8 file, loaded with ``assign=True``)
    are turned, so a model loaded from an fp32/bf16 file is left as it is. Returns how many were turned.
    """
    if dtype is not None and dtype not in FP8_DTYPES:
        raise ValueError(f"{dtype} is not an FP8 dtype")
    turned = 0
    for path in stored_linear_paths(model):
        module = model.get_submodule(path)
        assert isinstance(module, nn.Linear)
        if is_quantized(module.weight) or (dtype is None and not is_fp8(module.weight)):
            continue  # GGML blocks are narrower than FP8 already
        weight = module.weight.requires_grad_(False)  # FP8 weights are never trained
        if dtype is not None and weight.dtype != dtype:
            problem = fp8_problem(path + ".weight", weight.detach())
            if problem:
                raise ValueError(f"{problem}; keep this model in bf16")
            weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        with torch.device("meta"):
            stored = StoredLinear(module.in_features, module.out_features, bias=module.bias is not None)
        stored.weight = weight
        stored.bias = module.bias
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, stored)
        turned += 1
    return turned


def stored_dtype(model: nn.Module) -> torch.dtype | None:
    """The FP8 dtype the model's stored weights are in, or None when nothing is stored narrow."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(module, "casts_weight", False) and isinstance(weight, Tensor) and is_fp8(weight):
            return weight.dtype
    return None


def place(model: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> nn.Module:
    """``model.to(device, dtype)``, except that the FP8 weights of layers that cast per call stay FP8
    (``Module.to`` would widen them: FP8 counts as floating point). Any other FP8 tensor is widened.
    Without ``dtype`` only the device changes, every tensor keeping its dtype (what CPU offload's moves
    need: a model moved out and back must compute exactly as before)."""
    keep = {
        id(module.weight)
        for module in model.modules()
        if getattr(module, "casts_weight", False) and is_fp8(module.weight)
    }
    # A quantized weight is uint8, so it is never cast; its format is re-attached after the move, since a
    # move may put a new Parameter in place of the old (torch's swap-on-conversion setting).
    tagged = [
        (module, ggml_format(module.weight), module.weight.ggml_shape)
        for module in model.modules()
        if isinstance(getattr(module, "weight", None), Tensor) and is_quantized(module.weight)
    ]

    def move(t: Tensor) -> Tensor:
        if id(t) in keep or dtype is None:
            return t.to(device)
        return t.to(device, dtype) if t.is_floating_point() else t.to(device)

    model = model._apply(move)
    for module, fmt, shape in tagged:
        tag_weight(module.weight, fmt, shape)
    return model
