"""Training checkpoints: a model bundle plus everything needed to continue the run bit for bit.

Layout of ``OUT/checkpoints/step-000100/``::

    config.json, transformer.safetensors, autoencoder.safetensors   the bundle (EMA weights); or, for the
    autoencoder.json, autoencoder.safetensors                       autoencoder stage, an AE checkpoint
    model.safetensors       raw (non-EMA) weights of the trained module
    optimizer.safetensors   AdamW state, flattened: "<param name>.<exp_avg|exp_avg_sq|step>"
    rng.safetensors         torch CPU / CUDA generator states, python and numpy Mersenne-Twister states
    trainer_state.json      step, data position, config, param-group hyperparameters, schedule state,
                            the scalar parts of the RNG states; written last

The EMA weights are not stored twice: the bundle's weights ARE the EMA. Nothing is pickled. Weights and
optimizer state are always stored whole: a run sharded with FSDP gathers them first (`distributed.full_state`
on every rank; rank 0 writes) and shards them again on resume, so the format does not depend on sharding.

Crash safety (SIGKILL at any moment): a checkpoint is assembled in ``.step-000100.tmp`` and renamed into
place, so a folder named ``step-*`` is always complete; ``latest`` (a file naming the newest checkpoint)
is replaced atomically after the rename; old checkpoints are renamed to a dot-name before they are
deleted. Dot-names are leftovers by definition and are cleaned up on the next start.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pictor.checkpoint import (
    CheckpointError,
    LazySafetensors,
    UnreadableFileError,
    read_safetensors,
    replace_dir,
    staged_file,
    write_json,
    write_safetensors,
)
from pictor.train.distributed import full_tensor, load_full_state, shard_like

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


# -- optimizer state <-> flat tensors + JSON --------------------------------------------------------------


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def optimizer_to_flat(
    optimizer: torch.optim.Optimizer, model: nn.Module, keep: bool = True
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """AdamW state keyed by parameter name (robust to re-ordering), and the groups' hyperparameters.

    Sharded (FSDP) state is gathered whole, one tensor at a time, to the CPU: a collective, so every rank
    calls this in the same order; ranks with `keep` False drop what they gathered."""
    names = _param_names(model)
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    groups: list[dict[str, Any]] = []
    for group, sd_group in zip(optimizer.param_groups, sd["param_groups"], strict=True):
        group_names = [names[id(p)] for p in group["params"]]
        for index, name in zip(sd_group["params"], group_names, strict=True):
            for key, value in sd["state"].get(index, {}).items():
                whole = full_tensor(value) if isinstance(value, torch.Tensor) else torch.tensor(value)
                if keep:  # no copy to the CPU on ranks that only took part in the gathers
                    tensors[f"{name}.{key}"] = whole.cpu()
        hyper = {k: _jsonable(v) for k, v in sd_group.items() if k != "params"}
        groups.append({**hyper, "params": group_names})
    return tensors, groups


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    return v


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    groups: list[dict[str, Any]],
) -> None:
    names = _param_names(model)
    keys_of: dict[str, list[str]] = {}  # "<param name>.<state key>", each tensor read once, when used
    for key in tensors:
        keys_of.setdefault(key.rpartition(".")[0], []).append(key)
    current = optimizer.state_dict()
    if len(groups) != len(current["param_groups"]):
        raise CheckpointError(
            f"optimizer: checkpoint has {len(groups)} param groups, the model needs "
            f"{len(current['param_groups'])}"
        )
    state: dict[int, dict[str, torch.Tensor]] = {}
    new_groups = []
    for group, sd_group, saved in zip(optimizer.param_groups, current["param_groups"], groups, strict=True):
        group_names = [names[id(p)] for p in group["params"]]
        if group_names != saved["params"]:
            raise CheckpointError("optimizer: the checkpoint's parameters do not match the model's")
        for index, name, param in zip(sd_group["params"], group_names, group["params"], strict=True):
            # cut to the parameter's shard under FSDP
            entry = {k.rpartition(".")[2]: shard_like(tensors[k], param) for k in keys_of.get(name, [])}
            if entry:
                state[index] = entry
        hyper = {k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"}
        new_groups.append({**sd_group, **hyper})
    optimizer.load_state_dict({"state": state, "param_groups": new_groups})


# -- RNG states ------------------------------------------------------------------------------------------


def rng_to_flat() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    version, mt, gauss = random.getstate()
    tensors["python_mt"] = torch.tensor(mt, dtype=torch.int64)
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["numpy_mt"] = torch.from_numpy(np_keys.astype(np.int64))
    scalars = {
        "python_version": version,
        "python_gauss_next": gauss,
        "numpy_name": np_name,
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_cached_gaussian": float(np_gauss),
    }
    return tensors, scalars


def rng_from_flat(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
    mt = tuple(int(x) for x in tensors["python_mt"].tolist())
    random.setstate((scalars["python_version"], mt, scalars["python_gauss_next"]))
    np.random.set_state(
        (
            scalars["numpy_name"],
            tensors["numpy_mt"].numpy().astype(np.uint32),
            scalars["numpy_pos"],
            scalars["numpy_has_gauss"],
            scalars["numpy_cached_gaussian"],
        )
    )


# -- writing ---------------------------------------------------------------------------------------------


def write_checkpoint(
    out: Path,
    step: int,
    write_weights: Callable[[Path], None],
    weights: dict[str, torch.Tensor],
    optimizer_state: tuple[dict[str, torch.Tensor], list[dict[str, Any]]],
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write OUT/checkpoints/step-N atomically, point OUT/latest at it, and keep the newest `keep`.

    `write_weights(folder)` writes the bundle part (EMA weights + config) into a folder that does not
    exist yet; `weights` are the raw weights (`distributed.full_state`), `optimizer_state` is
    `optimizer_to_flat`'s; `state` is the JSON-able trainer state (step, data position, config, ...).
    """
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    tmp = root / f".{step_name(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_weights(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        write_safetensors(weights, tmp / MODEL_FILE)
        opt_tensors, groups = optimizer_state
        write_safetensors(opt_tensors, tmp / OPTIMIZER_FILE)
        rng_tensors, rng_scalars = rng_to_flat()
        write_safetensors(rng_tensors, tmp / RNG_FILE)
        full = {"format": FORMAT, **state, "optimizer": {"param_groups": groups}, "rng": rng_scalars}
        write_json(full, tmp / STATE_FILE)  # last: its presence marks a complete folder
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(out / LATEST, f"{CHECKPOINTS}/{final.name}\n")
    prune(root, keep)
    return final


def write_text_atomic(path: Path, text: str) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(text)


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune(root: Path, keep: int) -> None:
    for _, path in list_checkpoints(root.parent)[:-keep]:
        trash = root / f".{path.name}.trash"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)  # atomic: a half-deleted folder never carries a step-* name
        shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(out: Path) -> None:
    """Remove temp folders and files a killed run left behind (all carry a leading dot)."""
    for folder in (out, out / CHECKPOINTS):
        if folder.is_dir():
            for p in folder.iterdir():
                if p.name.startswith(".") and (p.name.endswith((".tmp", ".trash", ".old"))):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)


# -- reading ---------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]
    model: Mapping[str, torch.Tensor]  # read tensor by tensor (LazySafetensors)
    optimizer: Mapping[str, torch.Tensor]
    rng: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def find_latest(out: Path) -> Path | None:
    """The newest complete checkpoint. The `latest` file is a convenience for people and tools; a scan is
    the truth (a run killed between the rename and the pointer update has a newer folder than it names)."""
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def read_checkpoint(path: Path) -> Checkpoint:
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{path}: not a training checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as exc:
        raise UnreadableFileError(f"{state_path}: not valid JSON ({exc.msg})") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')} is not {FORMAT}")
    return Checkpoint(
        path=path,
        state=state,
        model=LazySafetensors(path / MODEL_FILE),
        optimizer=LazySafetensors(path / OPTIMIZER_FILE),
        rng=read_safetensors(path / RNG_FILE),
    )


def restore(
    ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer, restore_rng: bool = True
) -> None:
    """Raw weights, optimizer state and RNG states back into live objects (EMA is the stage's part)."""
    load_full_state(model, ckpt.model)
    optimizer_from_flat(optimizer, model, ckpt.optimizer, ckpt.state["optimizer"]["param_groups"])
    if restore_rng:
        rng_from_flat(ckpt.rng, ckpt.state["rng"])
