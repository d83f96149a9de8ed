"""A bundle's folder as commands write it: an --out that may only replace a bundle, and the files a new
bundle takes over unchanged from its source (adapters, the autoencoder). Shared by `pictor convert`,
`pictor merge` and `pictor lora merge`."""

from __future__ import annotations

import shutil
from pathlib import Path

from pictor.checkpoint import (
    AUTOENCODER_FILE,
    CONFIG_NAME,
    TRANSFORMER_FILE,
    BundleConfig,
    CheckpointError,
    is_bundle,
    sha256_file,
)
from pictor.layout_files import LAYOUT_FILE
from pictor.reference_files import REFERENCE_FILE

BUNDLE_FILES = (CONFIG_NAME, TRANSFORMER_FILE, AUTOENCODER_FILE)
# Adapters a bundle may carry beside its weights; a cast copies them, so they are the bundle's own too.
ADAPTER_FILES = (LAYOUT_FILE, REFERENCE_FILE)


def check_bundle_out(out: Path) -> None:
    """Refuse an --out whose replacement would delete anything but a bundle's own files (the source's
    own, when converting in place)."""
    if not out.exists():
        return
    if not (out.is_dir() and is_bundle(out)):
        raise CheckpointError(
            f"--out {out}: exists and is not a model bundle, and it would be replaced; give a new folder"
        )
    others = _foreign_files(out)
    if others:
        raise CheckpointError(
            f"--out {out}: holds files that are not a bundle's ({', '.join(others[:5])}), and they would be "
            "lost when it is replaced; give a new folder"
        )


def _foreign_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in BUNDLE_FILES + ADAPTER_FILES)


def copy_adapters(src: Path, dst: Path) -> None:
    """The bundle's layout and reference adapters, copied as they are (they go with its weights)."""
    for adapter in ADAPTER_FILES:
        if (src / adapter).is_file():
            shutil.copyfile(src / adapter, dst / adapter)


def copy_autoencoder(src: Path, dst: Path, config: BundleConfig) -> str:
    """The bundle's autoencoder file, copied unchanged and checked against config.json; its SHA-256."""
    shutil.copyfile(src / AUTOENCODER_FILE, dst / AUTOENCODER_FILE)
    digest = sha256_file(dst / AUTOENCODER_FILE)
    if config.hashes.get(AUTOENCODER_FILE) not in (None, digest):
        raise CheckpointError(f"{src / AUTOENCODER_FILE}: not the file config.json's hash names")
    return digest
