"""Benchmark: IFRU and AltEraser per request as the catalog grows, against Retrain, a validation pass and a training epoch (issue 16).

For power-law catalogs (:class:`~lightning_unlearn.data.PowerLawCatalog`) of
``--users`` users, ``--interactions`` draws and each of ``--items`` item counts, loaded by a
:class:`~lightning_unlearn.data.RecDataModule` as a real run loads its data (``split="leave_last_out"``:
each user's latest row is the test target; ``val_fraction=0.1``: a tenth of each user's remaining
rows, rounded, are the validation targets, so users with fewer than 5 training rows have none;
4 fixed negatives per training row, ``--batch-size`` rows per training batch, ``--eval-batch-size``
users per ranking batch), MF (d=``--dim``, l2=0.03, Adam at the default learning rate, random
initialisation: the cost of a request does not depend on how well the model was trained, its
fidelity is measured by ``compare``), and two deletions applied with ``RecDataModule.remove`` as the
callback applies them (``--delete-users`` whole users, with their validation and test rows; a
``--delete-fraction`` of the training rows), measures each of

* ``Retrain(epochs=N)``: ``Retrain().unlearn`` with the library's default :class:`FitRecipe` capped
  at ``--retrain-epochs`` epochs (the same cap in every row): every epoch is a training epoch and a
  validation pass (early stopping and best checkpoint on ``val/ndcg@20``), after Lightning's sanity
  check; the reference of the speed-ups;
* ``validation pass``: ``Trainer.validate`` on the retained data: every validation user ranked
  against every item (``validation_step``, Recall/NDCG/Hit@10,20 and AUC, on by default);
* ``training epoch``: ``FitRecipe(max_epochs=1, monitor=None, limit_val_batches=0)``, a ``Trainer.fit``
  of one epoch over the retained rows with validation, logger, checkpoints and progress bar off;
* ``IFRU(blocks="cached")`` and ``AltEraser(blocks="cached")`` with the curvature cache (built once per
  model, reported as precomputation, ``(users + items) x d^2`` float64 and more for factors);
* ``IFRU(blocks="fresh")`` and ``AltEraser(blocks="fresh")``: the scope's blocks per request,
  from the rows that touch it, nothing kept;
* ``IFRU(cache_budget_gb=2)`` and ``AltEraser(cache_budget_gb=2)`` (``blocks="auto"``, the
  default, with a 2 GiB budget instead of 4): every block while they fit; past the budget, the
  blocks of the busiest users and items in float32, the others computed on demand;

each in a subprocess of its own, with the same data and deletions (same seeds): seconds (per
request for the methods, the median of ``--repeats`` requests from the same prepared state, as
``compare --repeats`` times them, with the first and every run in the JSON; the whole ``Trainer``
call for the validation pass and the epoch), precomputation seconds, and the peak resident memory
of the process above what it held before the measurement (the peak is reset once the data is
loaded; with ``--repeats`` above 1 it includes the copy of the prepared method that later runs
start from: AltEraser's gradient over every row, ``(users + items) x d`` float64), and for the methods the blocks a
request solves (``blocks``: IFRU's neighbourhood, AltEraser's over its rounds; what the cost follows) and how many of
them the cache held (``cache_hits``, ``cache_misses``). A method's speed-up is Retrain's seconds
over its per-request seconds (same catalog and deletion). The model has the items drawn at least
once (``items`` in the JSON, ``catalog`` being the generator's: with the defaults 10,000, 80,727
and 217,205 of :math:`10^4`, :math:`10^5` and :math:`10^6`). A cached variant whose cache, or a
validation pass (or Retrain) whose score chunk of ``--eval-batch-size x items`` float32, would exceed
``--memory-gb`` for the users and items the data has is reported as skipped. Prints a table, writes JSON (``runs/benchmarks/scale.json``)
and, with matplotlib, a log-log plot of seconds (the methods per request, Retrain, and for scale the
validation pass and the epoch) and of the speed-ups against the catalog size
(``runs/benchmarks/scale.png``)::

    python tests/benchmarks/bench_scale.py --threads 2 --retrain-epochs 2

A small run (minutes on one thread)::

    python tests/benchmarks/bench_scale.py --items 10000 30000 --users 2000 --interactions 100000 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

METHODS = {
    "IFRU(blocks=cached)": lambda m: m.IFRU(blocks="cached"),
    "IFRU(blocks=fresh)": lambda m: m.IFRU(blocks="fresh"),
    "AltEraser(blocks=cached)": lambda m: m.AltEraser(blocks="cached"),
    "AltEraser(blocks=fresh)": lambda m: m.AltEraser(blocks="fresh"),
    # blocks="auto" (the default) under a 2 GiB budget: every block while it fits, the busiest past it
    "IFRU(cache_budget_gb=2)": lambda m: m.IFRU(cache_budget_gb=2),
    "AltEraser(cache_budget_gb=2)": lambda m: m.AltEraser(cache_budget_gb=2),
}
VALIDATION, EPOCH = "validation pass", "training epoch"
# what a request's cost follows: the blocks it solves (IFRU: its neighbourhood's; AltEraser: over its rounds), and
# how many of those the cache held
DIAGNOSTICS = {"blocks": ("solver/num_blocks", "solved_blocks"), "cache_hits": ("cache_hits",), "cache_misses": ("cache_misses",)}


def retrain_name(epochs: int) -> str:
    return f"Retrain(epochs={epochs})"


def one(args: argparse.Namespace) -> dict:
    """Measure one (catalog, deletion, method) in this process."""
    import pytorch_lightning as pl

    from lightning_unlearn.data import PowerLawCatalog, RecDataModule
    from lightning_unlearn.models import MF
    from lightning_unlearn.unlearning import methods
    from lightning_unlearn.unlearning.compare import _requests
    from lightning_unlearn.unlearning.memory import PeakMemory
    from lightning_unlearn.unlearning.methods import UnlearningContext
    from lightning_unlearn.unlearning.recipe import FitRecipe

    warnings.filterwarnings("ignore")  # Lightning's advice on workers and logging; the JSON line is what counts
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)

    source = PowerLawCatalog(args.users, args.one_items, args.interactions, seed=0)
    dm = RecDataModule(source, split="leave_last_out", val_fraction=0.1, num_negatives=4, batch_size=args.batch_size,
                       eval_batch_size=args.eval_batch_size, seed=0)
    dm.setup()
    rows_before = len(dm.train)
    g = torch.Generator().manual_seed(1)
    if args.one_deletion == "users":
        users = torch.randperm(dm.num_users, generator=g)[:args.delete_users]
        deleted = dm.remove(torch.zeros(0, dtype=torch.long), users=users)
    else:
        deleted = dm.remove(torch.randperm(rows_before, generator=g)[:max(1, round(args.delete_fraction * rows_before))])
    retained = dm.train_rows()
    torch.manual_seed(0)
    model = MF(dm.num_users, dm.num_items, embedding_dim=args.dim, l2=0.03, init_std=0.1)
    sizes = {"items": dm.num_items, "catalog": args.one_items, "users": dm.num_users, "rows": rows_before, "deleted_rows": len(deleted),
             "deletion": args.one_deletion, "method": args.one_method}
    reason = skip_reason(args.one_method, model, args)  # the items the data has, not the catalog's
    if reason:
        return {**sizes, "skipped": reason}
    trainer_flags = dict(accelerator="cpu", devices=1, deterministic=True, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    torch.linalg.cholesky(torch.eye(4, dtype=torch.float64).expand(2, 4, 4))  # load LAPACK before the clock starts
    with PeakMemory() as peak:  # the process's resident peak, reset here, above what it holds now
        start = time.perf_counter()
        precompute, detail = 0.0, {}
        if args.one_method == VALIDATION:
            metrics = pl.Trainer(**trainer_flags).validate(model, dm, verbose=False)[0]
            seconds = time.perf_counter() - start
            detail = {"val_users": int((dm.val.by_user.lengths() > 0).sum()),
                      "val_ndcg@20": round(float(metrics["val/ndcg@20"]), 4), "val_auc": round(float(metrics["val/auc"]), 4)}
        elif args.one_method == EPOCH:
            FitRecipe(max_epochs=1, monitor=None, limit_val_batches=0)(model, dm)
            seconds = time.perf_counter() - start
            detail = {"batches": -(-len(retained) // args.batch_size)}
        elif args.one_method == retrain_name(args.retrain_epochs):
            recipe = FitRecipe(max_epochs=args.retrain_epochs)
            context = UnlearningContext(seed=0, fit=lambda fresh: recipe(fresh, dm))
            report = methods.Retrain().unlearn(model, retained, deleted, context)
            seconds = report.seconds
        else:
            method, original = METHODS[args.one_method](methods), copy.deepcopy(model)
            precompute = method.prepare(model, retained.concat(deleted))
            report, runs = _requests(method, original, model, retained, deleted, UnlearningContext(), args.repeats)
            seconds, precompute = statistics.median(runs), precompute + report.precompute_seconds
            detail = {"first_seconds": runs[0], "seconds_runs": runs,
                      **{key: report.diagnostics[name] for key, names in DIAGNOSTICS.items() for name in names if name in report.diagnostics}}
        total = time.perf_counter() - start
    return {**sizes, "seconds": seconds, "precompute_seconds": precompute,
            "total_seconds": total, "peak_mb_above_start": peak.cpu_mb, "threads": torch.get_num_threads(), **detail}


def ranking_gb(items: int, eval_batch_size: int) -> float:
    """A ranking batch's scores (float32) plus the metrics' working chunk (``2**28`` bytes) and masks."""
    return (eval_batch_size * items * 4 + 2**29) / 2**30


def skip_reason(name: str, model, args: argparse.Namespace) -> str | None:
    """Why a measurement would not fit in ``--memory-gb`` for ``model``, sized by the loaded data (``None``: it fits)."""
    from lightning_unlearn.unlearning.methods.curvature import cache_bytes  # blocks and factors, float64

    if name in METHODS and "cached" in name and cache_bytes(model) / 2**30 > args.memory_gb:
        return f"cache of ~{cache_bytes(model) / 2**30:.1f} GB over {args.memory_gb} GB"
    if name in (VALIDATION, retrain_name(args.retrain_epochs)) and ranking_gb(model.num_items, args.eval_batch_size) > args.memory_gb:
        return f"ranking batch of ~{ranking_gb(model.num_items, args.eval_batch_size):.1f} GB over {args.memory_gb} GB"
    return None


HEADER = (f"{'catalog':>8} {'deletion':<12} {'measurement':<29} {'seconds':>9} {'precompute':>10} {'peak MB':>8} "
          f"{'vs Retrain':>10}  rows deleted / rows; blocks solved")


def table_line(row: dict) -> str:
    start = f"{row['catalog']:>8} {row['deletion']:<12} {row['method']:<29}"
    if "skipped" in row or "failed" in row:
        return f"{start} {'skipped' if 'skipped' in row else 'failed'}: {row.get('skipped') or row.get('failed')}"
    speedup = f"{row['speedup_over_retrain']:9.0f}x" if "speedup_over_retrain" in row else f"{'':>10}"
    return (f"{start} {row['seconds']:9.3f} {row['precompute_seconds']:10.2f} {row['peak_mb_above_start']:+8.0f} {speedup}  "
            f"{row['deleted_rows']} / {row['rows']}" + (f"; {row['blocks']} blocks" if "blocks" in row else ""))


def plot(results: list[dict], retrain: str, path: Path) -> None:
    """Log-log plot of seconds and speed-ups against the catalog size (with matplotlib; else a hint)."""
    measurements = [retrain, VALIDATION, EPOCH, *METHODS]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[plot]')")
        return
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True, sharey="row")
    styles = {retrain: dict(color="black", lw=2), VALIDATION: dict(color="grey", ls="--"), EPOCH: dict(color="grey", ls=":")}
    for column, deletion in enumerate(("users", "interactions")):
        top, bottom = axes[0, column], axes[1, column]
        for name in measurements:
            ok = [r for r in results if r["method"] == name and r["deletion"] == deletion and "seconds" in r]
            if ok:
                top.plot([r["catalog"] for r in ok], [r["seconds"] for r in ok], marker="o", label=name, **styles.get(name, {}))
            ok = [r for r in ok if "speedup_over_retrain" in r]
            if ok:
                bottom.plot([r["catalog"] for r in ok], [r["speedup_over_retrain"] for r in ok], marker="o", label=name)
        top.set(xscale="log", yscale="log", title=f"delete {deletion}")
        bottom.set(xscale="log", yscale="log", xlabel="items in the catalog")
        for ax in (top, bottom):
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].set_ylabel("seconds (per request for the methods)")
    axes[1, 0].set_ylabel(f"speed-up over {retrain}")
    axes[0, 0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--items", type=int, nargs="+", default=[10**4, 10**5, 10**6])
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--delete-users", type=int, default=100)
    parser.add_argument("--delete-fraction", type=float, default=0.001)
    parser.add_argument("--retrain-epochs", type=int, default=2, help="Retrain's epoch cap, the same in every row")
    parser.add_argument("--batch-size", type=int, default=2048, help="training rows per batch")
    parser.add_argument("--eval-batch-size", type=int, default=1024, help="users per full-ranking batch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="requests per method, each from the same prepared state (median reported)")
    parser.add_argument("--memory-gb", type=float, default=12.0, help="skip cached variants and ranking batches that would exceed this")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/scale.json"))
    parser.add_argument("--plot", type=Path, help="only draw the plot of an earlier run's JSON (next to it, .png)")
    parser.add_argument("--one-items", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-method", help=argparse.SUPPRESS)
    parser.add_argument("--one-deletion", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_method:
        print(json.dumps(one(args)))
        return
    if args.plot:
        saved = json.loads(args.plot.read_text())
        plot(saved["results"], retrain_name(saved["settings"]["retrain_epochs"]), args.plot.with_suffix(".png"))
        return
    retrain = retrain_name(args.retrain_epochs)
    measurements = [retrain, VALIDATION, EPOCH, *METHODS]  # Retrain first: the methods' speed-ups are printed with them
    print(f"torch {torch.__version__}, {args.threads} threads, {args.users} users, {args.interactions} draws, d={args.dim}; "
          f"deletions: {args.delete_users} users, {args.delete_fraction:.1%} of training rows; Retrain capped at "
          f"{args.retrain_epochs} epochs; each measurement in its own process, a method's the median of {args.repeats} requests")
    print(HEADER)
    results = []
    for items in args.items:
        for deletion in ("users", "interactions"):
            reference = None
            for name in measurements:
                row = {"catalog": items, "deletion": deletion, "method": name}
                command = [sys.executable, __file__, *sys.argv[1:], "--one-items", str(items), "--one-method", name, "--one-deletion", deletion]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    row["failed"] = done.stderr.strip().splitlines()[-1:]
                else:
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    if name == retrain and "seconds" in row:
                        reference = row["seconds"]
                    elif name in METHODS and reference and "seconds" in row:
                        row["speedup_over_retrain"] = reference / row["seconds"]
                results.append(row)
                print(table_line(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if not k.startswith("one_") and k not in ("out", "plot")}
                                    | {"out": str(args.out)}, "results": results}, indent=1))
    print(f"wrote {args.out}")
    plot(results, retrain, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
