"""CPU offload: keep models in CPU memory and move each onto the execution device only while it runs.

What diffusers calls ``enable_model_cpu_offload()`` (here mode ``"model"``) and group offload at block level
/ kohya's and ComfyUI's "block swap" (mode ``"blocks"``), so that a FLUX.1-size model runs on a GPU smaller
than the whole model.

The models are sorted into *groups*: what runs as one piece (the text encoder; the transformer with the
ControlNets that run beside it on every step; the autoencoder; an adapter). At most one group is on the
execution device at a time: when a module of another group runs, a forward pre-hook moves the resident
group back to the offload device and the new one in (diffusers moves the previous model out when the next
one comes in, the same rule). The hooks sit on every submodule, not only on each group's root, because
pictor calls methods such as ``AutoEncoder.decode`` or a text encoder's ``encode``, which are not
``forward`` but do call their submodules' forwards.

In ``"blocks"`` mode the group that holds the swapped model (the transformer) brings in only that model's
small top-level layers (embedders, final layer) and its first ``blocks_on_device`` blocks; each other double
and single block is moved in by a pre-hook just before it runs and out by a post-hook right after. Peak
memory is then the top layers, the kept blocks, one swapped block, and the activations.

Code that runs a model other than through its ``forward`` often first reads where the model is, to put
its inputs (token ids, masks, position ids, a blend of tiles) on that device: ``next(model.parameters())``
while the model waits in CPU memory says CPU, and those tensors then meet the model's results on the
execution device. Such code asks `bring_in(model)` instead: under offload it makes the model's group the
resident one first and answers the execution device; without offload it answers the parameters' device.
The forward hooks stay as the safety net for everything that goes through a forward.

Moving goes through an injectable ``mover(module, device, inward)``; the default, `KeepingMover`, moves in
with ``weight_storage.place`` without a dtype, which moves tensors as they are, so FP8-stored and
GGML-quantized weights stay narrow, and keeps each weight's CPU tensor while its copy is in: moving out
points the weight back at it instead of copying device-to-host.
``inward`` says whether ``device`` is the execution device: on a CPU-only machine both devices are the CPU,
and a mover that records moves (the tests') tells in from out by it.

Not done here: prefetching the next block on a side CUDA stream with pinned memory (diffusers' group
offload ``use_stream=True``). Moves are synchronous, which costs time, never correctness.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from pictor.models.weight_storage import place

__all__ = [
    "BLOCK_LISTS",
    "OFFLOAD_MODES",
    "KeepingMover",
    "Mover",
    "Offload",
    "bring_in",
    "move_module",
    "offload_mode_problem",
]

OFFLOAD_MODES = ("model", "blocks")
# The transformer's block lists (FLUX.1's names); everything else of it counts as its small top layers.
BLOCK_LISTS = ("double_blocks", "single_blocks")

Mover = Callable[[nn.Module, torch.device, bool], None]

# Every module of an attached group (each submodule too) -> its Offload (weakly: the Offload holds the
# modules, and a strong reference here would keep a dropped pipeline's models alive) and group name.
_GROUP_OF: weakref.WeakKeyDictionary[nn.Module, tuple[weakref.ref[Offload], str]] = (
    weakref.WeakKeyDictionary()
)


def bring_in(module: nn.Module) -> torch.device:
    """The device `module` runs on, made ready for it: under offload its group is made the resident one
    (moved onto the execution device, the resident one out) and the execution device is returned; a module
    offload does not manage answers its first parameter's device (CPU for one without any). What code that
    is about to run a model outside its ``forward`` (an ``encode``, a tiled decode, a conditioning helper)
    asks instead of reading ``next(model.parameters()).device``, which under offload is CPU memory."""
    entry = _GROUP_OF.get(module)
    offload = entry[0]() if entry is not None else None
    if offload is not None and entry is not None:
        name = entry[1]
        if name in offload.groups:
            offload.activate(name)
            return offload.execution_device
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def move_module(module: nn.Module, device: torch.device, inward: bool = True) -> None:
    """A plain mover: every tensor of `module` to `device`, in its own dtype (FP8 and GGML blocks stay
    narrow; `place` re-tags quantized weights after the move), copying both ways (the default,
    `KeepingMover`, points back at the CPU tensors on the way out instead)."""
    place(module, device)


class KeepingMover:
    """The default mover: in, every tensor to the execution device in its own dtype (`place`: FP8 and GGML
    weights stay narrow, GGML formats stay tagged), and the CPU tensor each one replaced is kept; out, each
    tensor is pointed back at its kept CPU tensor, so no weight is copied device-to-host and no CPU memory
    is allocated (diffusers' group offload does the same). A tensor that changed while in (an in-place
    change moved its version counter, or its data was replaced) is copied back instead, as is one with
    nothing kept. Weights stay in CPU memory while their copies are in: CPU memory holds every model
    throughout, as it does between uses anyway."""

    def __init__(self) -> None:
        # (id(module), "p" | "b", name) -> (the CPU tensor, the device tensor's data_ptr and version)
        self._kept: dict[tuple[int, str, str], tuple[Tensor, int, int]] = {}

    def __call__(self, module: nn.Module, device: torch.device, inward: bool) -> None:
        if inward:
            before = {key: t.detach() for key, t in _slots(module) if t.device != device}
            place(module, device)
            for key, t in _slots(module):
                if key in before and t.device == device:
                    self._kept[key] = (before[key], t.data_ptr(), t._version)
            return
        for (sub, kind, name), t in _slots(module, with_module=True):
            kept = self._kept.pop((id(sub), kind, name), None)
            if kept is None or t.device == kept[0].device:
                continue
            home, ptr, version = kept
            if t.data_ptr() != ptr or t._version != version:  # changed while in: its values go back
                continue
            if kind == "p":
                _point_back(sub, name, home)
            else:
                sub._buffers[name] = home
        place(module, device)  # anything not pointed back (none, normally): moved, tags kept


def _point_back(module: nn.Module, name: str, home: Tensor) -> None:
    """Parameter `name` of `module` pointed back at its CPU tensor: the same Parameter where torch allows
    swapping its data across the two devices (CUDA and CPU, as ``Module.to`` does), else a new Parameter
    with the old one's attributes (a GGML format tag, `weight_storage`) carried over (meta, the tests')."""
    param = module._parameters[name]
    assert param is not None
    try:
        param.data = home
    except RuntimeError:  # "incompatible tensor type": a new Parameter in its place
        new = nn.Parameter(home, requires_grad=param.requires_grad)
        new.__dict__.update(param.__dict__)
        module._parameters[name] = new


def _slots(module: nn.Module, with_module: bool = False) -> Iterator[tuple[Any, Tensor]]:
    """Every parameter and buffer of `module` and its submodules, keyed (id(module), "p" | "b", name), or
    (module, kind, name) with `with_module`."""
    for sub in module.modules():
        for kind, store in (("p", sub._parameters), ("b", sub._buffers)):
            for name, t in store.items():
                if t is not None:
                    yield ((sub if with_module else id(sub)), kind, name), t


def offload_mode_problem(mode: Any, blocks_on_device: Any = 0) -> str | None:
    """What is wrong with an offload setting (None: fine)."""
    if mode is not None and mode not in OFFLOAD_MODES:
        return f"offload must be one of {', '.join(repr(m) for m in OFFLOAD_MODES)} or None, got {mode!r}"
    if isinstance(blocks_on_device, bool) or not isinstance(blocks_on_device, int) or blocks_on_device < 0:
        return f"blocks_on_device must be a whole number >= 0, got {blocks_on_device!r}"
    if blocks_on_device and mode != "blocks":
        return f"blocks_on_device keeps blocks of offload='blocks' on the device; offload is {mode!r}"
    return None


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors in (nested tuples, lists, dicts of) arguments moved to `device`; anything else as it is."""
    if isinstance(value, Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The model's double then single blocks (in the order its forward runs them)."""
    return [
        block
        for name in BLOCK_LISTS
        if isinstance(lst := getattr(model, name, None), nn.ModuleList)
        for block in lst
    ]


def _top_layers(model: nn.Module) -> list[nn.Module]:
    """The model's children other than its block lists. Its own direct tensors would be missed by moving
    children, so a model with any is refused (FLUX.1 keeps none at its root)."""
    own = [n for n, t in [*model._parameters.items(), *model._buffers.items()] if t is not None]
    if own:
        raise ValueError(f"block offload moves a model's children; this one holds tensors of its own: {own}")
    return [child for name, child in model.named_children() if name not in BLOCK_LISTS]


class Offload:
    """Scheduling of one pipeline's models between the offload device (CPU memory) and the execution device.

    `attach(groups, swapped)` installs the hooks; `release()` moves whatever is resident back (the pipeline
    calls it after every sampler run, so nothing stays on the device between requests); `detach()` removes
    the hooks and releases. A group's modules are all of `groups[name]`; `swapped` (blocks mode) is the
    model, inside one of the groups, whose blocks are swapped one at a time.
    """

    def __init__(
        self,
        mode: str,
        execution_device: torch.device | str,
        offload_device: torch.device | str = "cpu",
        mover: Mover | None = None,
        blocks_on_device: int = 0,
    ) -> None:
        problem = offload_mode_problem(mode, blocks_on_device)
        if problem or mode is None:
            raise ValueError(problem or "Offload needs a mode; offload=None is no Offload at all")
        self.mode = mode
        self.execution_device = torch.device(execution_device)
        self.offload_device = torch.device(offload_device)
        self.mover: Mover = mover or KeepingMover()
        self.blocks_on_device = blocks_on_device
        self.groups: dict[str, list[nn.Module]] = {}
        self.resident: str | None = None  # the group on the execution device, if any
        self._swapped: nn.Module | None = None
        self._swapped_group: str | None = None
        self._kept: list[nn.Module] = []  # the swapped model's first blocks, resident with its group
        self._blocks_in: dict[int, nn.Module] = {}  # swapped blocks now on the device (by id)
        self._handles: list[RemovableHandle] = []

    # -- setup ----------------------------------------------------------------------------------------

    def attach(self, groups: Mapping[str, Sequence[nn.Module]], swapped: nn.Module | None = None) -> None:
        """(Re)install the hooks for these groups (a group with no modules is left out). Everything is moved
        to the offload device first, so attaching twice (a LoRA added, an adapter loaded) is safe."""
        self.detach()
        self.groups = {name: _unique(modules) for name, modules in groups.items() if modules}
        seen: dict[int, str] = {}
        for name, modules in self.groups.items():
            for module in modules:
                for sub in module.modules():
                    if seen.setdefault(id(sub), name) != name:  # one module in two groups would ping-pong
                        raise ValueError(f"a module is in offload groups '{seen[id(sub)]}' and '{name}'")
        self._swapped = swapped if self.mode == "blocks" else None
        self._swapped_group = None
        if self._swapped is not None:
            self._swapped_group = next(
                (n for n, mods in self.groups.items() if any(m is self._swapped for m in mods)), None
            )
            if self._swapped_group is None:
                raise ValueError("the model whose blocks are swapped must be in one of the offload groups")
            blocks = _blocks(self._swapped)
            self._kept = blocks[: self.blocks_on_device]
            _top_layers(self._swapped)  # refuses a model it cannot move in parts, before any hook
        for name, modules in self.groups.items():
            for module in modules:
                self._hook_group(name, module)
                for sub in module.modules():
                    _GROUP_OF[sub] = (weakref.ref(self), name)
        if self._swapped is not None:
            for block in _blocks(self._swapped)[self.blocks_on_device :]:
                self._handles.append(block.register_forward_pre_hook(self._block_in))
                self._handles.append(block.register_forward_hook(self._block_out))
        for modules in self.groups.values():  # the starting state: nothing on the execution device
            for module in modules:
                self._move(module, self.offload_device, False)

    def _hook_group(self, name: str, root: nn.Module) -> None:
        # The root and its direct children also move their arguments in: some callers place inputs on
        # the device of the model's parameters, read before the model came in (the offload device).
        entries = {id(root), *(id(c) for c in root.children())}
        for sub in root.modules():

            def hook(
                module: nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                _name: str = name,
                _entry: bool = id(sub) in entries,
            ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
                if self.resident != _name:
                    self.activate(_name)
                if _entry:
                    return _to_device(args, self.execution_device), _to_device(kwargs, self.execution_device)
                return None

            self._handles.append(sub.register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        """Remove every hook and move everything back to the offload device."""
        self.release()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for sub, (owner, _name) in list(_GROUP_OF.items()):
            if owner() is self:
                del _GROUP_OF[sub]

    # -- scheduling -----------------------------------------------------------------------------------

    def parts(self, name: str) -> list[nn.Module]:
        """What moves when group `name` comes in: all its modules, except that the swapped model brings only
        its top layers and kept blocks (its other blocks come in one at a time)."""
        out: list[nn.Module] = []
        for module in self.groups[name]:
            if module is self._swapped:
                out += _top_layers(module) + self._kept
            else:
                out.append(module)
        return out

    def activate(self, name: str) -> None:
        """Make group `name` the resident one: the previous one out first, so only one is ever in."""
        if self.resident == name:
            return
        self.release()
        # Resident before the first move, so that a move that fails half way (out of device memory) leaves
        # a group `release` moves back, its moved parts included, instead of weights stranded on the device.
        self.resident = name
        for module in self.parts(name):
            self._move(module, self.execution_device, True)

    def release(self) -> None:
        """Move the resident group (and any swapped block left in by an error mid-forward) out."""
        for block in list(self._blocks_in.values()):
            self._move(block, self.offload_device, False)
        self._blocks_in.clear()
        if self.resident is not None:
            for module in self.parts(self.resident):
                self._move(module, self.offload_device, False)
            self.resident = None

    def _move(self, module: nn.Module, device: torch.device, inward: bool) -> None:
        # Moves happen inside the sampler's inference_mode; tensors made there would be inference tensors,
        # and the weights would stay so after the run (an in-place change to them, such as a LoRA merge,
        # or a backward through them would then fail). Outside it, a move makes ordinary tensors.
        with torch.inference_mode(False), torch.no_grad():
            self.mover(module, device, inward)

    def _block_in(self, block: nn.Module, args: tuple[Any, ...]) -> None:
        # The group hook (registered first, so it ran first) brought the top layers in. Recorded before the
        # move, so that `release` moves a block back that failed half way in.
        self._blocks_in[id(block)] = block
        self._move(block, self.execution_device, True)

    def _block_out(self, block: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._move(block, self.offload_device, False)
        self._blocks_in.pop(id(block), None)


def _unique(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """The modules once each (one Union ControlNet may serve two pictures), in order."""
    out: list[nn.Module] = []
    for module in modules:
        if not any(module is m for m in out):
            out.append(module)
    return out
