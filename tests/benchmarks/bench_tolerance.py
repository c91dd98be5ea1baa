"""Benchmark: how tight IFRU's CG solve must be, on a trained MovieLens-1M model.

For each ``--tols`` value, one IFRU request from the same trained model, deletion and
curvature cache (built once, rolled back after each request): its CG iterations (curvature products on a
graph model, the most any block took with the block solver), the relative residual the graph
solve reports, the seconds, and the step's relative error against a solve to ``1e-9``. The step's
error follows the residual; how much of it a comparison with a retrain can see is what
``compare`` measures. Prints a table and writes JSON.

    lightning-unlearn fit -c recipes/ml1m/lightgcn.yaml
    python tests/benchmarks/bench_tolerance.py --ckpt runs/ml1m_lightgcn/checkpoints/best.ckpt --threads 2
    python tests/benchmarks/bench_tolerance.py --model neumf --ckpt runs/ml1m_neumf/checkpoints/best.ckpt --damping 3e-5
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import warnings
from pathlib import Path

import torch

from lightning_unlearn.data import AdjacencyLists, RecDataModule
from lightning_unlearn.models import MF, LightGCN, NeuMF
from lightning_unlearn.unlearning import IFRU
from lightning_unlearn.unlearning.deletion import DeletionSpec
from lightning_unlearn.unlearning.methods import UnlearningContext

MODELS = {"lightgcn": LightGCN, "mf": MF, "neumf": NeuMF}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=Path("runs/ml1m_lightgcn/checkpoints/best.ckpt"))
    parser.add_argument("--model", choices=list(MODELS), default="lightgcn")
    parser.add_argument("--kind", choices=["interactions", "users"], default="interactions", help="1%% of these, seed 0 (the compare recipes')")
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-6, 1e-4, 1e-3, 1e-2])
    parser.add_argument("--damping", type=float, default=1e-7, help="IFRU's (the NeuMF compare recipe's is 3e-5)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (set explicitly: the machine is shared)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/tolerance.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    model = MODELS[args.model].load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True).eval()
    dm = RecDataModule(AdjacencyLists(), split="given", val_fraction=0.1, num_negatives=4, seed=0)
    dm.setup()
    resolved = DeletionSpec(kind=args.kind, fraction=0.01, seed=0).build(dm.train).resolve(dm.train)
    deleted = dm.remove(resolved.rows, resolved.users, resolved.items)
    retained = dm.train_rows()
    model.set_graph(dm.train)  # as compare leaves the original (a no-op without a graph)

    def flat(m):
        return torch.cat([p.detach().flatten().double() for p in m.parameters()])

    method = IFRU(k_hop=0, damping=args.damping, max_iter=300)
    precompute = method.prepare(model, retained.concat(deleted))
    method.cache.mark()
    start, steps, results = flat(model), {}, []
    for tol in [1e-9, *args.tols]:
        method.tol = tol
        method.cache.save(deleted)  # what the rollback restores, copied before the timed request
        unlearned = copy.deepcopy(model).train()
        report = method.unlearn(unlearned, retained, deleted, UnlearningContext(seed=0))
        method.cache.rollback()
        steps[tol] = flat(unlearned) - start
        error = float(torch.linalg.vector_norm(steps[tol] - steps[1e-9]) / torch.linalg.vector_norm(steps[1e-9]))
        d = report.diagnostics
        row = {"tol": tol, "iterations": d.get("solver/iterations", d.get("solver/cg_iterations")),
               "relative_residual": d.get("solver/relative_residual", float("nan")), "seconds": report.seconds, "step_relative_error": error}
        results.append(row)
        print(f"tol {tol:8.0e} | {row['iterations']:>4} iterations | residual {row['relative_residual']:.2e} | "
              f"step error {error:.2e} | {report.seconds:.2f} s")
    meta = {"threads": args.threads, "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "checkpoint": str(args.ckpt), "model": args.model, "damping": args.damping, "deletion": f"1% {args.kind}", "rows": len(deleted),
            "precompute_seconds": precompute}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"threads={args.threads} torch={torch.__version__}; wrote {args.out}")


if __name__ == "__main__":
    main()
