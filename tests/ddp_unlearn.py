"""Run by ``tests/test_multi_device.py``: UnlearningCallback inside ``Trainer(strategy="ddp")`` on CPU.

    python tests/ddp_unlearn.py DEVICES METHOD MODEL STATE_FILE OUT_DIR [rank0-only[-skipped]|twice|rank0-full-disk|rank0-full-journal|late]

Loads the weights in STATE_FILE, "trains" one batch of SGD with ``lr=1e-30`` (below the
weights' resolution, so the weights reaching ``on_train_end`` are exactly those, whatever the
number of processes), then the callback
deletes a fixed request with METHOD; every rank saves its parameters to OUT_DIR.
"""

from __future__ import annotations

import os
import sys
import warnings

import pytorch_lightning as pl
import torch

from lightning_unlearn.data import RecDataModule, Synthetic
from lightning_unlearn.models import MF, LightGCN
from lightning_unlearn.unlearning import DeletionRequest, UnlearningCallback
from lightning_unlearn.unlearning.methods import IFRU

MODELS = {"mf": MF, "lightgcn": LightGCN}


def method(name: str):
    if name == "ifru":
        return IFRU(damping=1e-4, solver="cg", tol=1e-10, max_iter=300)
    if name == "ifru-block":
        return IFRU(damping=1e-4, solver="block")
    from lightning_unlearn.unlearning.methods import AltEraser

    return AltEraser()


def setting(model_name: str) -> tuple[pl.LightningModule, RecDataModule, DeletionRequest]:
    dm = RecDataModule(Synthetic(num_users=40, num_items=30, density=0.25, seed=1), batch_size=64, num_negatives=2,
                       val_fraction=0.0, seed=0)
    dm.setup()
    model = MF if model_name == "mf" else LightGCN
    model = model(dm.num_users, dm.num_items, embedding_dim=8, l2=0.05, lr=1e-30, optimizer="sgd")
    users = [int(dm.train.user_ids[u]) for u in (3, 7)]
    pairs = [(int(dm.train.user_ids[dm.train.users[r]]), int(dm.train.item_ids[dm.train.items[r]])) for r in (0, 50, 90)]
    return model, dm, DeletionRequest(pairs=pairs, users=users)


def main(devices: int, method_name: str, model_name: str, state_file: str, out: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model, dm, request = setting(model_name)
    model.load_state_dict(torch.load(state_file, weights_only=True), strict=False)
    mode = sys.argv[6] if len(sys.argv) > 6 else ""
    queued = [request, request] if mode == "twice" else [request]  # twice: the repeat is dropped on every rank alike
    if mode.startswith("rank0-only") and os.environ.get("LOCAL_RANK", "0") != "0":  # the request reaches one process alone
        queued = []
    callback = UnlearningCallback(method(method_name), requests=[] if mode == "late" else queued, dirpath=f"{out}/unlearned-{devices}",
                                  seed=0)

    class Late(pl.Callback):  # late: a callback after the UnlearningCallback queues the request in its own train end
        def on_train_end(self, trainer, pl_module):
            callback.request(request)

    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=1,
        limit_train_batches=0 if mode.endswith("-skipped") else 1,  # skipped: the loop too, and the queue applied at fit end
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback, Late()] if mode == "late" else [callback], deterministic=True,
    )
    if mode.startswith("rank0-full-") and os.environ.get("LOCAL_RANK", "0") == "0":  # rank 0 alone fails on a full disk
        import errno

        from lightning_unlearn.unlearning import callback as callback_module

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        if mode == "rank0-full-disk":  # after the method: its checkpoint
            callback_module.save_checkpoint = full
        else:  # rank0-full-journal, before the method: its `pending` entry
            append = callback_module.Journal.append
            callback_module.Journal.append = lambda self, digest, status, **fields: (
                full() if status == "pending" else append(self, digest, status, **fields))
    name = f"{out}/{method_name}-{model_name}-devices{devices}-rank{trainer.global_rank}"
    try:
        trainer.fit(model, dm)
    except Exception as err:
        torch.save({k: v for k, v in model.state_dict().items() if "adjacency" not in k}, f"{name}-failed.pt")
        print(f"rank {trainer.global_rank}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise
    torch.save({k: v for k, v in model.state_dict().items() if "adjacency" not in k}, f"{name}.pt")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
