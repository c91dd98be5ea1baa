"""Shared fixtures: W&B never reaches the network, data comes from ../shared/data when present."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    """The real data sets: $LIGHTNING_UNLEARN_DATA, else ../shared/data beside the checkout."""
    for candidate in (os.environ.get("LIGHTNING_UNLEARN_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "ml-100k" / "u.data").is_file():
            return Path(candidate)
    return None


@pytest.fixture
def data_dir() -> Path:
    path = shared_data()
    if path is None:
        pytest.skip("real data not found: set LIGHTNING_UNLEARN_DATA to a folder with ml-100k/ and ml-1m/")
    return path


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    """Every test runs W&B offline into its own temporary folder, and finishes any run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    import wandb

    if wandb.run is not None:
        wandb.finish()


@pytest.fixture
def cli_run(monkeypatch, tmp_path):
    """Run the CLI as the console script would, in a scratch folder (it writes config.yaml and runs/)."""
    monkeypatch.setattr(sys, "argv", ["lightning-unlearn"])
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and steady on a shared machine
