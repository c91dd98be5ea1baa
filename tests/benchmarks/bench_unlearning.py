"""Benchmark: per-request cost of the fast unlearning methods on a trained MovieLens-1M model.

Loads a trained checkpoint (train one with ``lightning-unlearn fit -c recipes/ml1m/mf.yaml``),
then for each deletion kind (0.1% and 1% of training interactions, 1% of users) runs every
method ``--repeats`` times, each time on a fresh copy of the model and of the method with its
curvature cache already built (the cache is paid once per trained model and reported apart).
Prints medians and writes JSON. Retraining is not timed here: ``compare`` measures it next to
the methods, in one process; this script is for the per-request cost and where it goes.

    python tests/benchmarks/bench_unlearning.py --ckpt runs/ml1m_mf/checkpoints/best.ckpt --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import logging
import platform
import pstats
import statistics
import warnings
from pathlib import Path

import torch

from lightning_unlearn.data import AdjacencyLists, RecDataModule
from lightning_unlearn.models import MF
from lightning_unlearn.unlearning import IFRU, AltEraser
from lightning_unlearn.unlearning.deletion import DeletionSpec
from lightning_unlearn.unlearning.methods import UnlearningContext

DELETIONS = {
    "0.1% interactions": DeletionSpec(kind="interactions", fraction=0.001, seed=0),
    "1% interactions": DeletionSpec(kind="interactions", fraction=0.01, seed=0),
    "1% users": DeletionSpec(kind="users", fraction=0.01, seed=0),
}


def methods() -> dict[str, object]:
    return {"IFRU": IFRU(), "AltEraser(rounds=1)": AltEraser(rounds=1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=Path("runs/ml1m_mf/checkpoints/best.ckpt"))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (set explicitly: the machine is shared)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="*", help="only these (names as printed); default: all")
    parser.add_argument("--deletions", nargs="*", choices=list(DELETIONS), help="only these deletion kinds; default: all")
    parser.add_argument("--profile", action="store_true", help="print the top functions of one run per case")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/unlearning.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    model = MF.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True).eval()
    results = []
    for label, spec in DELETIONS.items():
        if args.deletions and label not in args.deletions:
            continue
        dm = RecDataModule(AdjacencyLists(), split="given", val_fraction=0.1, num_negatives=4, seed=0)
        dm.setup()
        resolved = spec.build(dm.train).resolve(dm.train)
        deleted = dm.remove(resolved.rows, resolved.users, resolved.items)
        retained = dm.train_rows()
        for name, warm in methods().items():
            if args.methods and name not in args.methods:
                continue
            precompute = warm.prepare(model, retained.concat(deleted))
            seconds = []
            for repeat in range(args.repeats):
                method, unlearned = copy.deepcopy(warm), copy.deepcopy(model).train()
                profiler = cProfile.Profile() if args.profile and repeat == 0 else None
                if profiler:
                    profiler.enable()
                report = method.unlearn(unlearned, retained, deleted, UnlearningContext(seed=0))
                if profiler:
                    profiler.disable()
                    text = io.StringIO()
                    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
                    print(text.getvalue())
                seconds.append(report.seconds)
            row = {"deletion": label, "method": name, "rows": len(deleted), "median_seconds": statistics.median(seconds),
                   "seconds": seconds, "precompute_seconds": precompute,
                   "diagnostics": {k: v for k, v in report.diagnostics.items() if isinstance(v, (int, float, str, bool))}}
            results.append(row)
            print(f"{label:>18} | {name:<19} | {len(deleted):>6} rows | median {row['median_seconds']:.3f} s "
                  f"(of {args.repeats}) | cache {precompute:.1f} s | blocks {row['diagnostics'].get('solver/num_blocks')}")
    meta = {"threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "processor": platform.processor(), "checkpoint": str(args.ckpt)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"threads={args.threads} torch={torch.__version__}; wrote {args.out}")


if __name__ == "__main__":
    main()
