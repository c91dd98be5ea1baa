"""Unlearning on several processes (gloo, CPU) gives the parameters one process gives.

Each rank sums its shard of the rows and the partial sums are all-reduced, so every rank
applies the identical update. The processes are real (``torch.multiprocessing`` with a gloo
process group); the Lightning-level run with ``Trainer(strategy="ddp")`` is in
``test_callback_under_ddp_equals_one_device``.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_unlearn.data import RecDataModule, Synthetic
from lightning_unlearn.models import MF, LightGCN
from lightning_unlearn.unlearning.methods import IFRU, AltEraser, UnlearningContext

CASES = {
    "ifru-mf-block": (MF, lambda: IFRU(damping=1e-4, solver="block")),
    "ifru-mf-cg": (MF, lambda: IFRU(damping=1e-4, solver="cg", tol=1e-10, max_iter=300)),
    "ifru-mf-retained": (MF, lambda: IFRU(damping=1e-4, solver="direct", gradient="retained")),
    "ifru-lightgcn-cg": (LightGCN, lambda: IFRU(damping=1e-4, solver="cg", tol=1e-10, max_iter=300)),
    "ifru-lightgcn-block": (LightGCN, lambda: IFRU(damping=1e-4, tol=1e-10, max_iter=300)),
    "alteraser-mf": (MF, lambda: AltEraser(rounds=3)),
    "alteraser-lightgcn": (LightGCN, lambda: AltEraser(rounds=2)),
}


def setting(case: str):
    cls, method = CASES[case]
    torch.manual_seed(0)
    dm = RecDataModule(Synthetic(num_users=20, num_items=16, density=0.4, seed=3), val_fraction=0.0, num_negatives=2)
    dm.setup()
    model = cls(dm.num_users, dm.num_items, embedding_dim=4, l2=0.1, init_std=0.3).double()
    model.set_graph(dm.train)
    deleted = dm.remove(torch.arange(0, 60, 7))
    model.set_graph(dm.train)
    return model, dm.train_rows(), deleted, method()


def _rank(rank: int, world_size: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)

        def reduce(tensor):
            tensor = tensor.clone()
            dist.all_reduce(tensor)
            return tensor

        context = UnlearningContext(seed=0, reduce=reduce, rank=rank, world_size=world_size)
        for case in CASES:
            model, retained, deleted, method = setting(case)
            method.unlearn(model, retained, deleted, context)
            torch.save(model.state_dict(), f"{folder}/{case}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Every case unlearned by two gloo processes (one spawn for all cases: start-up dominates)."""
    folder = tmp_path_factory.mktemp("gloo")
    mp.start_processes(_rank, args=(2, str(folder)), nprocs=2, join=True, start_method="spawn")
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_two_gloo_processes_equal_one_process(case, two_processes):
    model, retained, deleted, method = setting(case)
    before = copy.deepcopy(model.state_dict())
    method.unlearn(model, retained, deleted)
    ranks = [torch.load(two_processes / f"{case}-rank{r}.pt", weights_only=True) for r in range(2)]
    for name, value in model.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-8, msg=f"{name}: 2 processes vs 1")
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the update did something


SCRIPT = Path(__file__).with_name("ddp_unlearn.py")


@pytest.mark.parametrize("method,model", [("ifru-block", "mf"), ("ifru", "lightgcn"), ("alteraser", "mf")])
def test_callback_under_ddp_equals_one_device(method, model, tmp_path):
    """``Trainer(strategy="ddp", accelerator="cpu", devices=2)``: both ranks end with the parameters one device gives."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from ddp_unlearn import setting as ddp_setting
    finally:
        sys.path.pop(0)
    torch.manual_seed(1)
    initial, _, _ = ddp_setting(model)
    with torch.no_grad():  # a model that is not at its initialisation, the same for every run
        for p in initial.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = tmp_path / "state.pt"
    torch.save({k: v for k, v in initial.state_dict().items() if "adjacency" not in k}, state)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    for devices in (1, 2):
        done = subprocess.run([sys.executable, str(SCRIPT), str(devices), method, model, str(state), str(tmp_path)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one = torch.load(tmp_path / f"{method}-{model}-devices1-rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"{method}-{model}-devices2-rank{r}.pt", weights_only=True) for r in range(2)]
    before = torch.load(state, weights_only=True)
    assert any(not torch.equal(before[k], one[k]) for k in one)  # unlearning changed the model
    for name, value in one.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=f"{name}: ddp x2 vs one device")


def two_ranks(tmp_path: Path, mode: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Two gloo processes run ``ddp_unlearn.py`` (IFRU's block solver, MF) in ``mode``: the run and the initial weights."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from ddp_unlearn import setting as ddp_setting
    finally:
        sys.path.pop(0)
    initial, _, _ = ddp_setting("mf")
    state = tmp_path / "state.pt"
    torch.save(initial.state_dict(), state)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(SCRIPT), "2", "ifru-block", "mf", str(state), str(tmp_path), mode],
                          env=env, capture_output=True, text=True, timeout=300), state


@pytest.mark.parametrize("mode", ["rank0-only", "rank0-only-skipped"])
def test_a_request_queued_on_one_rank_alone_is_refused_on_every_rank_instead_of_hanging(tmp_path, mode):
    done, _ = two_ranks(tmp_path, mode)
    assert done.returncode != 0 and "the ranks hold different queues (1 on rank 0, 0 on rank 1" in done.stderr
    twice, _ = two_ranks(tmp_path, "twice")
    assert twice.returncode == 0, twice.stderr[-3000:]  # a repeated request is one request on every rank, not a difference


@pytest.mark.parametrize("mode", ["rank0-full-disk", "rank0-full-journal"])
def test_a_failure_on_rank_zero_alone_rolls_the_request_back_on_every_rank(tmp_path, mode):
    """Rank zero alone fails, on a full disk, to write the checkpoint (after the method) or the journal's `pending`
    entry (before it): every rank votes at both points, so the other rank raises too and keeps no update the record
    does not hold, instead of going on with it in memory or waiting in the method's collectives."""
    done, state = two_ranks(tmp_path, mode)
    assert done.returncode != 0
    assert "rank 0: OSError: [Errno 28] No space left on device" in done.stderr
    assert "rank 1: UnlearningError: 1 other rank(s) failed to apply the request" in done.stderr
    before = torch.load(state, weights_only=True)
    for rank in (0, 1):
        after = torch.load(tmp_path / f"ifru-block-mf-devices2-rank{rank}-failed.pt", weights_only=True)
        assert all(torch.equal(after[name], before[name]) for name in after), f"rank {rank} kept the update"


def test_a_request_queued_after_the_train_end_is_refused_on_every_rank_that_holds_it_and_nothing_is_applied(tmp_path):
    """Under DDP the ranks meet at the train end only: a request queued after it (by a later callback) is refused where it
    is held, with a message, and the ranks exit without a collective after the strategy's teardown (no abort, no hang)."""
    done, state = two_ranks(tmp_path, "late")
    assert done.returncode != 0 and "terminate called" not in done.stderr
    before = torch.load(state, weights_only=True)  # lr=1e-30: the weights training leaves are these
    for rank in (0, 1):
        assert f"rank {rank}: RuntimeError: UnlearningCallback: 1 request(s) were queued after the end of training" in done.stderr
        after = torch.load(tmp_path / f"ifru-block-mf-devices2-rank{rank}-failed.pt", weights_only=True)
        assert all(torch.equal(after[name], before[name]) for name in after), f"rank {rank} applied the refused request"
    journal = tmp_path / "unlearned-2" / "journal.jsonl"
    assert not journal.exists() or '"pending"' not in journal.read_text()
