"""Fixtures shared by the training tests: one torch thread, and a tiny base bundle to adapt."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pictor.checkpoint import save_bundle

from tiny_bundle import tiny_models


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (use with `pytestmark = pytest.mark.usefixtures("one_thread")`):
    tiny models gain nothing from two, and on a busy machine two OpenMP threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset with seeded random weights, saved as a trained bundle: a base for LoRA runs."""
    config, flux, ae = tiny_models("base", trained=True)
    path = tmp_path_factory.mktemp("base") / "base"
    save_bundle(path, config, flux.state_dict(), ae.state_dict())
    return path
