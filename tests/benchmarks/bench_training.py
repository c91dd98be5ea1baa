"""Benchmark: Lightning overhead on an MF and a LightGCN epoch, and full-ranking evaluation speed (MovieLens-1M).

Compares, in one process and on the same batches (same order, same negatives):
  * one MF epoch through ``Trainer.fit`` vs. a plain PyTorch loop doing the same work;
  * one LightGCN epoch (the recipe's 2 layers, batch 8192) likewise, and against its floor:
    the sparse products alone (each batch propagates forward and back, ``2 x layers`` products
    of the normalised adjacency with the ``(users + items, d)`` table), with the bytes those
    products move at the least (CSR indices and values, the table read and written);
  * full-ranking evaluation of every test user (6,040) with and without AUC.

Prints a table and writes JSON. Not part of the test run:

    python tests/benchmarks/bench_training.py --threads 1 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_unlearn.data import AdjacencyLists, RecDataModule
from lightning_unlearn.models import MF, LightGCN, lightgcn


class EpochTimer(pl.Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


def plain_epoch(model: MF, dm: RecDataModule, epoch: int) -> float:
    optimizer = model.configure_optimizers()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    start = time.perf_counter()
    for batch in loader:
        optimizer.zero_grad()
        loss = model.loss(batch) + model.dense_penalty()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def propagation_epoch(model: LightGCN, batches: int) -> float:
    """The sparse products of an epoch alone: per batch, the propagation forward and its backward."""
    table = torch.cat([model.user_embedding.weight, model.item_embedding.weight]).detach().requires_grad_(True)
    start = time.perf_counter()
    for _ in range(batches):
        layer, total = table, table
        for _ in range(model.num_layers):
            layer = lightgcn._Propagate.apply(model.adjacency, layer)
            total = total + layer
        total.sum().backward()
    return time.perf_counter() - start


def propagation_bytes(model: LightGCN, batches: int) -> int:
    """The least an epoch's sparse products move: per product, CSR column indices and values, the table in and out."""
    adjacency = model.adjacency
    table_bytes = adjacency.shape[0] * model.user_embedding.weight.shape[1] * 4
    per_product = adjacency._nnz() * (adjacency.col_indices().element_size() + 4) + 2 * table_bytes
    return per_product * 2 * model.num_layers * batches


def lightning_epoch(model: MF, dm: RecDataModule) -> float:
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, callbacks=[timer],
    )
    trainer.fit(model, dm)
    return timer.seconds


def evaluate(model: MF, dm: RecDataModule, auc: bool) -> tuple[float, dict]:
    model.hparams.eval_auc = auc
    start = time.perf_counter()
    metrics = model.evaluate(dm.test_dataloader())
    return time.perf_counter() - start, {k: round(v, 4) for k, v in metrics.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (set explicitly: the machine is shared)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--lightgcn-batch-size", type=int, default=8192, help="the ML-1M LightGCN recipe's")
    parser.add_argument("--eval-batch-size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/training.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    def datamodule(batch_size: int) -> RecDataModule:
        dm = RecDataModule(AdjacencyLists(), split="given", num_negatives=4, batch_size=batch_size,
                           eval_batch_size=args.eval_batch_size, seed=0)
        dm.setup()
        return dm

    dm, graph_dm = datamodule(args.batch_size), datamodule(args.lightgcn_batch_size)
    models = {"MF": (dm, lambda: MF(dm.num_users, dm.num_items)),
              "LightGCN": (graph_dm, lambda: LightGCN(graph_dm.num_users, graph_dm.num_items, num_layers=2))}
    epochs: dict[str, dict] = {}
    for name, (data, make) in models.items():
        plain_model, lightning_model = make(), make()
        for model in (plain_model, lightning_model):
            if isinstance(model, LightGCN):
                model.set_graph(data.train)
        plain, lightning, floor = [], [], []
        for rep in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            plain.append(plain_epoch(plain_model, data, rep))
            lightning.append(lightning_epoch(lightning_model, data))
            if isinstance(plain_model, LightGCN):
                floor.append(propagation_epoch(plain_model, len(data.train_dataloader())))
        epochs[name] = {"batch_size": data.hparams.batch_size, "batches": len(data.train_dataloader()),
                        "plain_median": statistics.median(plain), "lightning_median": statistics.median(lightning),
                        "plain": plain, "lightning": lightning,
                        "lightning_over_plain": statistics.median(lightning) / statistics.median(plain)}
        if floor:
            moved = propagation_bytes(plain_model, len(data.train_dataloader()))
            epochs[name].update({"propagation": floor, "propagation_median": statistics.median(floor),
                                 "lightning_over_propagation": statistics.median(lightning) / statistics.median(floor),
                                 "propagation_bytes": moved, "propagation_gb_per_s": moved / statistics.median(floor) / 1e9})
        if name == "MF":
            mf_model = lightning_model
    eval_topk = [evaluate(mf_model, dm, auc=False)[0] for _ in range(args.repeats)]
    eval_all = [evaluate(mf_model, dm, auc=True) for _ in range(args.repeats)]

    result = {
        "hardware": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "device": "cpu"},
        "torch": torch.__version__, "pytorch_lightning": pl.__version__,
        "data": {"train_rows": len(dm.train), "negatives_per_row": 4, "test_users": int((dm.test.by_user.lengths() > 0).sum())},
        "epoch_seconds": epochs,
        "lightning_over_plain": epochs["MF"]["lightning_over_plain"],
        "eval_seconds": {"topk_median": statistics.median(eval_topk), "topk_and_auc_median": statistics.median(t for t, _ in eval_all),
                         "eval_batch_size": args.eval_batch_size},
        "eval_metrics_after_benchmark_epochs": eval_all[0][1],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    v = result["eval_seconds"]
    print(f"MovieLens-1M, d=64, {len(dm.train)} rows x 4 negatives, torch threads {torch.get_num_threads()}, medians of {args.repeats}")
    print(f"{'measure':<56}{'seconds':>10}")
    for name, e in epochs.items():
        label = f"{name} epoch (batch {e['batch_size']})"
        print(f"{label + ', plain PyTorch loop':<56}{e['plain_median']:>10.3f}")
        print(f"{f'{name} epoch, Trainer.fit':<56}{e['lightning_median']:>10.3f}")
        print(f"{'  ratio Trainer / plain (budget 1.5)':<56}{e['lightning_over_plain']:>10.3f}")
        if "propagation_median" in e:
            print(f"{f'{name} epoch, the sparse products alone':<56}{e['propagation_median']:>10.3f}")
            print(f"{'  ratio Trainer / sparse products':<56}{e['lightning_over_propagation']:>10.3f}")
            print(f"{'  bytes the products move at least, GB (GB/s)':<56}{e['propagation_bytes'] / 1e9:>10.2f} "
                  f"({e['propagation_gb_per_s']:.1f})")
    print(f"{'full-ranking eval, 6040 users, top-K':<56}{v['topk_median']:>10.3f}")
    print(f"{'full-ranking eval, 6040 users, top-K + AUC':<56}{v['topk_and_auc_median']:>10.3f}")
    print(f"JSON written to {args.out}")


if __name__ == "__main__":
    main()
