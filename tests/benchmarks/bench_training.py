"""Benchmark: Lightning overhead on an MF epoch, and full-ranking evaluation speed (MovieLens-1M).

Compares, in one process and on the same batches (same order, same negatives):
  * one MF epoch through ``Trainer.fit`` vs. a plain PyTorch loop doing the same work;
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
from lightning_unlearn.models import MF


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
    parser.add_argument("--eval-batch-size", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/training.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    dm = RecDataModule(AdjacencyLists(), split="given", num_negatives=4, batch_size=args.batch_size,
                       eval_batch_size=args.eval_batch_size, seed=0)
    dm.setup()
    plain_model, lightning_model = MF(dm.num_users, dm.num_items), MF(dm.num_users, dm.num_items)
    plain, lightning = [], []
    for rep in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        plain.append(plain_epoch(plain_model, dm, rep))
        lightning.append(lightning_epoch(lightning_model, dm))
    eval_topk = [evaluate(lightning_model, dm, auc=False)[0] for _ in range(args.repeats)]
    eval_all = [evaluate(lightning_model, dm, auc=True) for _ in range(args.repeats)]

    result = {
        "hardware": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "device": "cpu"},
        "torch": torch.__version__, "pytorch_lightning": pl.__version__,
        "data": {"train_rows": len(dm.train), "negatives_per_row": 4, "batch_size": args.batch_size, "test_users": int((dm.test.by_user.lengths() > 0).sum())},
        "epoch_seconds": {"plain_median": statistics.median(plain), "lightning_median": statistics.median(lightning),
                          "plain": plain, "lightning": lightning},
        "lightning_over_plain": statistics.median(lightning) / statistics.median(plain),
        "eval_seconds": {"topk_median": statistics.median(eval_topk), "topk_and_auc_median": statistics.median(t for t, _ in eval_all),
                         "eval_batch_size": args.eval_batch_size},
        "eval_metrics_after_benchmark_epochs": eval_all[0][1],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    e, v = result["epoch_seconds"], result["eval_seconds"]
    print(f"MovieLens-1M, MF d=64, {len(dm.train)} rows x 4 negatives, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}, medians of {args.repeats}")
    print(f"{'measure':<44}{'seconds':>10}")
    print(f"{'MF epoch, plain PyTorch loop':<44}{e['plain_median']:>10.3f}")
    print(f"{'MF epoch, Trainer.fit':<44}{e['lightning_median']:>10.3f}")
    print(f"{'  ratio Trainer / plain (budget 1.5)':<44}{result['lightning_over_plain']:>10.3f}")
    print(f"{'full-ranking eval, 6040 users, top-K':<44}{v['topk_median']:>10.3f}")
    print(f"{'full-ranking eval, 6040 users, top-K + AUC':<44}{v['topk_and_auc_median']:>10.3f}")
    print(f"JSON written to {args.out}")


if __name__ == "__main__":
    main()
