"""Benchmark: IFRU and AltEraser per request as the catalog grows, with cached and with fresh curvature blocks (issue 16).

For power-law catalogs (:func:`~lightning_unlearn.data.synthetic.power_law_catalog`) of
``--users`` users, ``--interactions`` draws and each of ``--items`` item counts (MF, d=``--dim``,
4 uniform negatives per row, random initialisation: the cost of a request does not depend on
how well the model was trained, its fidelity is measured by ``compare``), and two deletions
(``--delete-users`` whole users; ``--delete-fraction`` of the interactions), measures each of

* ``IFRU(blocks="cached")`` and ``AltEraser(blocks="cached")`` with the curvature cache (built once per
  model, reported as precomputation, ``(users + items) x d^2`` float64 and more for factors);
* ``IFRU(blocks="fresh")`` and ``AltEraser(blocks="fresh")``: the scope's blocks per request,
  from the rows that touch it, nothing kept;

in a subprocess of its own: per-request seconds, precomputation seconds and the peak resident
memory of the process above what it held before the method ran. A cached variant whose cache
would exceed ``--memory-gb`` is reported as skipped. Prints a table, writes JSON
(``runs/benchmarks/scale.json``) and, with matplotlib, a log-log plot of per-request seconds
against the catalog size (``runs/benchmarks/scale.png``)::

    python tests/benchmarks/bench_scale.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = {
    "IFRU(blocks=cached)": lambda m: m.IFRU(blocks="cached"),
    "IFRU(blocks=fresh)": lambda m: m.IFRU(blocks="fresh"),
    "AltEraser(blocks=cached)": lambda m: m.AltEraser(blocks="cached"),
    "AltEraser(blocks=fresh)": lambda m: m.AltEraser(blocks="fresh"),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def one(args: argparse.Namespace) -> dict:
    """Measure one (catalog, deletion, method) in this process."""
    from lightning_unlearn.data.batches import TrainRows
    from lightning_unlearn.data.synthetic import power_law_catalog
    from lightning_unlearn.models import MF
    from lightning_unlearn.unlearning import methods

    torch.set_num_threads(args.threads)
    data = power_law_catalog(args.users, args.one_items, args.interactions, seed=0)
    g = torch.Generator().manual_seed(1)
    rows = TrainRows(data.users, data.items, torch.randint(data.num_items, (len(data), 4), generator=g))
    if args.one_deletion == "users":
        gone = torch.isin(rows.users, torch.randperm(data.num_users, generator=g)[:args.delete_users])
    else:
        gone = torch.zeros(len(rows), dtype=torch.bool)
        gone[torch.randperm(len(rows), generator=g)[:max(1, round(args.delete_fraction * len(rows)))]] = True
    retained, deleted = rows.select(~gone), rows.select(gone)
    torch.manual_seed(0)
    model = MF(data.num_users, data.num_items, embedding_dim=args.dim, l2=0.03, init_std=0.1)
    method = METHODS[args.one_method](methods)
    torch.linalg.cholesky(torch.eye(4, dtype=torch.float64).expand(2, 4, 4))  # load LAPACK before the clock starts
    before = rss_mb()
    start = time.perf_counter()
    report = method.unlearn(model, retained, deleted)
    total = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"items": data.num_items, "catalog": args.one_items, "users": data.num_users, "rows": len(rows), "deleted_rows": len(deleted),
            "deletion": args.one_deletion, "method": args.one_method, "seconds": report.seconds, "precompute_seconds": report.precompute_seconds,
            "total_seconds": total, "peak_mb_above_start": peak - before, "threads": torch.get_num_threads()}


def cache_gb(items: int, users: int, dim: int) -> float:
    """Blocks (float64) plus the factors or inverses a cached method keeps: about twice the blocks."""
    return 2 * (items + users) * dim * dim * 8 / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--items", type=int, nargs="+", default=[10**4, 10**5, 10**6])
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--delete-users", type=int, default=100)
    parser.add_argument("--delete-fraction", type=float, default=0.001)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-gb", type=float, default=12.0, help="skip cached variants whose cache would exceed this")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/scale.json"))
    parser.add_argument("--one-items", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-method", help=argparse.SUPPRESS)
    parser.add_argument("--one-deletion", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_method:
        print(json.dumps(one(args)))
        return
    print(f"torch {torch.__version__}, {args.threads} threads, {args.users} users, {args.interactions} draws, d={args.dim}; "
          f"deletions: {args.delete_users} users, {args.delete_fraction:.1%} of interactions; each in its own process")
    results = []
    for items in args.items:
        for deletion in ("users", "interactions"):
            for name in METHODS:
                if "fresh" not in name and cache_gb(items, args.users, args.dim) > args.memory_gb:
                    results.append({"catalog": items, "deletion": deletion, "method": name, "skipped": f"cache over {args.memory_gb} GB"})
                    print(f"{items:>8} {deletion:<13} {name:<25} skipped: cache of ~{cache_gb(items, args.users, args.dim):.1f} GB")
                    continue
                command = [sys.executable, __file__, *sys.argv[1:], "--one-items", str(items), "--one-method", name, "--one-deletion", deletion]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    results.append({"catalog": items, "deletion": deletion, "method": name, "failed": done.stderr.strip().splitlines()[-1:]})
                    print(f"{items:>8} {deletion:<13} {name:<25} failed: {done.stderr.strip().splitlines()[-1:]}")
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                results.append(row)
                print(f"{items:>8} {deletion:<13} {name:<25} {row['seconds']:8.3f} s/request  precompute {row['precompute_seconds']:7.2f} s  "
                      f"peak +{row['peak_mb_above_start']:7.0f} MB  ({row['deleted_rows']} rows deleted of {row['rows']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if not k.startswith("one_") and k != "out"}
                                    | {"out": str(args.out)}, "results": results}, indent=1))
    print(f"wrote {args.out}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[plot]')")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, deletion in zip(axes, ("users", "interactions")):
        for name in METHODS:
            points = [(r["catalog"], r["seconds"]) for r in results if r.get("method") == name and r["deletion"] == deletion and "seconds" in r]
            if points:
                ax.plot(*zip(*points), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="items in the catalog", title=f"delete {deletion}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("seconds per request")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"wrote {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
