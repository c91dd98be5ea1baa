"""Shared fixtures: W&B never reaches the network, data comes from ../shared/data when present."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import tqdm

REPO = Path(__file__).resolve().parents[1]

tqdm.tqdm.monitor_interval = 0  # no monitor thread, which a forked child would copy (with a lock it may hold)


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


@pytest.fixture(autouse=True, scope="session")
def _machine_lines_of_the_session(tmp_path_factory):
    """The lines of deletions ``unlearn`` notes on the machine (``$LIGHTNING_UNLEARN_HOME``) go to the session's folder,
    never to the user's: also those of module fixtures, which start before a test's own folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIGHTNING_UNLEARN_HOME", str(tmp_path_factory.mktemp("machine")))
        yield


@pytest.fixture(autouse=True)
def _machine_lines_of_each_test(tmp_path, monkeypatch):
    """Each test notes its lines of deletions on a machine of its own: tests that train the same model (byte for byte)
    and delete different rows are independent experiments, not lines from one model."""
    monkeypatch.setenv("LIGHTNING_UNLEARN_HOME", str(tmp_path / "machine"))


@pytest.fixture(autouse=True)
def _offline_wandb(tmp_path, monkeypatch):
    """Every test runs W&B offline into its own temporary folder, finishes any run and stops W&B's service.

    Without the teardown, the service a test started (with ``WANDB_SERVICE`` in the environment,
    and its threads) outlives the test: a later test's subprocess attaches to it and does not wait
    for its files to be written, and a fork copies the threads.
    """
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONSOLE", "WANDB_SERVICE"):  # the command sets the first; the service the second
        monkeypatch.delenv(name, raising=False)
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None:
        if wandb.run is not None:
            wandb.finish()
        wandb.teardown()
    os.environ.pop("WANDB_CONSOLE", None)  # set by the command while the test ran (monkeypatch restores only what it set)
    os.environ.pop("WANDB_SERVICE", None)


def joined(process, timeout: float) -> int | None:
    """Wait for a child process; one still running after ``timeout`` seconds (hung) is stopped, so it holds no
    folder lock into later tests. Its exit code: ``-15`` (SIGTERM) when it was stopped here, which no test expects."""
    process.join(timeout)
    if process.is_alive():
        process.terminate()
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
        return -15
    return process.exitcode


@pytest.fixture
def cli_run(monkeypatch, tmp_path):
    """Run the CLI as the console script would, in a scratch folder (it writes config.yaml and runs/)."""
    monkeypatch.setattr(sys, "argv", ["lightning-unlearn"])
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True, scope="session")
def _threads():
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and steady on a shared machine
