"""Shared test set-up: one torch thread per test worker (the suite runs 2 workers on 2 cores)."""

import os

import pytest
import torch

# Scripts run as subprocesses (torchrun workers), not test modules to import.
collect_ignore = ["_ddp_worker.py"]

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
