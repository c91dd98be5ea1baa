"""Benchmark: unlearning on 1 vs 2 processes (gloo, CPU) on a trained MovieLens-1M model.

Each process loads the checkpoint and the data, the deletion (1% of training interactions)
is applied, and every method runs with the rows sharded over the processes and its partial
sums all-reduced (what ``UnlearningCallback`` does under ``Trainer(strategy="ddp")``). The
cost paid once per trained model (curvature cache) is timed apart from the request. Prints the
seconds (slowest rank, median of ``--repeats``) and writes JSON. On a 2-core machine two
processes share the same cores, so expect little gain; the point is that the numbers are
measured, not assumed.

    python tests/benchmarks/bench_multi_device.py --ckpt runs/ml1m_mf/checkpoints/best.ckpt --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_unlearn.data import AdjacencyLists, RecDataModule
from lightning_unlearn.models import MF
from lightning_unlearn.unlearning import IFRU
from lightning_unlearn.unlearning.deletion import DeletionSpec
from lightning_unlearn.unlearning.methods import AltEraser, UnlearningContext

METHODS = {"IFRU(k_hop=0)": IFRU, "AltEraser": AltEraser}


def _worker(rank: int, world_size: int, args: argparse.Namespace, folder: str) -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    try:
        def reduce(tensor):
            tensor = tensor.clone()
            dist.all_reduce(tensor)
            return tensor

        context = UnlearningContext(seed=0, reduce=reduce, rank=rank, world_size=world_size)
        model = MF.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True).eval()
        dm = RecDataModule(AdjacencyLists(), split="given", val_fraction=0.1, num_negatives=4, seed=0)
        dm.setup()
        resolved = DeletionSpec(kind="interactions", fraction=args.fraction, seed=0).build(dm.train).resolve(dm.train)
        deleted = dm.remove(resolved.rows, resolved.users, resolved.items)
        retained = dm.train_rows()
        timings = {}
        for name, cls in METHODS.items():
            prepared = cls()
            dist.barrier()
            start = time.perf_counter()
            prepared.prepare(model, retained.concat(deleted), context)
            precompute = time.perf_counter() - start
            seconds = []
            for _ in range(args.repeats):
                method, unlearned = copy.deepcopy(prepared), copy.deepcopy(model).train()
                dist.barrier()
                seconds.append(method.unlearn(unlearned, retained, deleted, context).seconds)
            timings[name] = {"precompute_seconds": precompute, "seconds": seconds}
        (Path(folder) / f"rank{rank}.json").write_text(json.dumps(timings))
    finally:
        dist.destroy_process_group()


def run(world_size: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_worker, args=(world_size, args, folder), nprocs=world_size, join=True, start_method="spawn")
        ranks = [json.loads((Path(folder) / f"rank{r}.json").read_text()) for r in range(world_size)]
    out = {}
    for name in METHODS:
        slowest = [max(rank[name]["seconds"][i] for rank in ranks) for i in range(args.repeats)]
        out[name] = {"median_seconds": statistics.median(slowest), "seconds": slowest,
                     "precompute_seconds": max(rank[name]["precompute_seconds"] for rank in ranks)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=Path("runs/ml1m_mf/checkpoints/best.ckpt"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (set explicitly: the machine is shared)")
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/multi_device.json"))
    args = parser.parse_args()
    os.environ.setdefault("LIGHTNING_UNLEARN_DATA", str(Path("../shared/data").resolve()))
    results = {str(world): run(world, args) for world in (1, 2)}
    print(f"{'method':<16} | {'1 process':>10} | {'2 processes':>11} | ratio | cache 1p / 2p")
    for name in METHODS:
        one, two = results["1"][name], results["2"][name]
        print(f"{name:<16} | {one['median_seconds']:>8.3f} s | {two['median_seconds']:>9.3f} s | "
              f"{one['median_seconds'] / two['median_seconds']:.2f}x | {one['precompute_seconds']:.1f} s / {two['precompute_seconds']:.1f} s")
    meta = {"threads_per_process": args.threads, "torch": torch.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "fraction": args.fraction, "repeats": args.repeats, "backend": "gloo"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"threads per process={args.threads} torch={torch.__version__} cpus={os.cpu_count()}; wrote {args.out}")


if __name__ == "__main__":
    main()
