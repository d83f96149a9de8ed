"""Settings for the whole suite."""

from __future__ import annotations

import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: one torch thread each, since two OpenMP teams on one core
    # spin waiting for each other. Subprocesses that tests start keep torch's own default.
    torch.set_num_threads(1)
