from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

import pictor.checkpoint as ckpt
from pictor.checkpoint import (
    BundleConfig,
    CheckpointError,
    LazySafetensors,
    load_bundle,
    load_into,
    read_safetensors,
    save_bundle,
    write_safetensors,
)
from pictor.models.autoencoder import AutoEncoder
from pictor.models.flux import Flux, FluxParams
from pictor.presets import get_preset

from tiny_bundle import tiny_models


def _models() -> tuple[BundleConfig, Flux, AutoEncoder]:
    return tiny_models("t")


def test_bundle_round_trip_with_hashes(tmp_path: Path) -> None:
    cfg, flux, ae = _models()
    saved = save_bundle(tmp_path / "b", cfg, flux.state_dict(), ae.state_dict())
    assert set(saved.hashes) == {"transformer.safetensors", "autoencoder.safetensors"}
    on_disk = json.loads((tmp_path / "b" / "config.json").read_text())
    assert on_disk["hashes"] == saved.hashes and on_disk["model"] == cfg.model
    bundle = load_bundle(tmp_path / "b")
    for k, v in flux.state_dict().items():
        assert torch.equal(bundle.transformer[k], v)
    with torch.device("meta"):
        fresh = Flux(FluxParams.from_dict(cfg.model))
    load_into(fresh, bundle.transformer, "t")
    assert torch.equal(fresh.img_in.weight, flux.img_in.weight)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_corrupt_file_fails_hash_check(tmp_path: Path) -> None:
    cfg, flux, ae = _models()
    save_bundle(tmp_path / "b", cfg, flux.state_dict(), ae.state_dict())
    f = tmp_path / "b" / "autoencoder.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"does not match config\.json"):
        load_bundle(tmp_path / "b")


def test_failed_save_leaves_old_bundle_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, flux, ae = _models()
    save_bundle(tmp_path / "b", cfg, flux.state_dict(), ae.state_dict())
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}

    calls = {"n": 0}
    real = ckpt.save_file

    def dying_save(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the autoencoder file, after the transformer was written
            raise OSError("disk full")
        real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", dying_save)
    with torch.no_grad():
        flux.img_in.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(tmp_path / "b", cfg, flux.state_dict(), ae.state_dict())
    after = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_pickles_are_refused_without_opening(tmp_path: Path) -> None:
    for suffix in (".ckpt", ".pt", ".bin", ".pth"):
        path = tmp_path / f"model{suffix}"
        path.write_bytes(b"\x80\x04this would be a pickle")
        with pytest.raises(CheckpointError, match="never unpickles"):
            read_safetensors(path)


def test_strict_keys_name_missing_unexpected_and_shapes() -> None:
    _, flux, _ = _models()
    sd = flux.state_dict()
    sd.pop("img_in.weight")
    sd["img_in.extra"] = torch.zeros(1)
    sd["txt_in.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        load_into(Flux(FluxParams.from_dict(get_preset("tiny")["model"])), sd, "file.safetensors")
    msg = str(err.value)
    assert "missing key(s): img_in.weight" in msg
    assert "unexpected key(s): img_in.extra" in msg
    assert "txt_in.weight: file (3, 3)" in msg


def test_unreadable_safetensors(tmp_path: Path) -> None:
    bad = tmp_path / "y.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_safetensors(bad)


def test_lazy_reads_give_the_same_tensors_one_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b.c": torch.ones(4, dtype=torch.float16)}
    write_safetensors(tensors, path)
    lazy = LazySafetensors(path)
    assert sorted(lazy) == ["a", "b.c"] and len(lazy) == 2 and "b.c" in lazy
    for key, value in tensors.items():
        assert torch.equal(lazy[key], value) and lazy[key].dtype == value.dtype
    with pytest.raises(KeyError):
        lazy["missing"]
    # A file cut short is refused when it is opened (the header promises bytes it lacks), not at a tensor.
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: not a readable safetensors"):
        LazySafetensors(cut)
    for bad, match in ((tmp_path / "m.pt", "never unpickles"), (tmp_path / "none.safetensors", "no such")):
        if bad.suffix == ".pt":
            bad.write_bytes(b"\x80\x04pickle")
        with pytest.raises(CheckpointError, match=match):
            LazySafetensors(bad)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        LazySafetensors(garbage)


@pytest.mark.parametrize(("umask", "folder", "file"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_a_bundle_gets_the_modes_of_the_umask(tmp_path: Path, umask: int, folder: int, file: int) -> None:
    """Temp files and folders are private (0600 / 0700) until renamed; a saved bundle must not stay so."""
    cfg, flux, ae = _models()
    old = os.umask(umask)
    try:
        save_bundle(tmp_path / "b", cfg, flux.state_dict(), ae.state_dict())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == folder
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "b").iterdir()}
    assert modes == dict.fromkeys(modes, file) and len(modes) == 3
