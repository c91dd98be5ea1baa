"""Benchmark: how unlearning drifts from retraining over a stream of sequential requests (MovieLens-100K).

Trains MF (the settings of ``recipes/ml100k/mf.yaml``: d=64, BPR, l2=0.05, 8 negatives, early
stopping on val/ndcg@20) once, then sends the same stream of requests -- each a seeded random
``--fraction`` of the *current* training interactions -- to one ``UnlearningCallback`` per
method (IFRU and AltEraser with their default options, and AltEraser with
``objective="retained"``; the retrain policy off), through
``apply_pending``: the path a request takes in a real run (resolve, remove from the datamodule,
method, checkpoint, journal). With a policy (by default the callback's default), each method
runs a second time with it (``<method>+policy``), showing what the retrains it orders buy.

At the checkpoints (``--checkpoints``) every model is compared with ``Retrain`` on the data as
it is at that point (the original's seed), on every row deleted so far: the rank gap closed
(1 = retrain, 0 = nothing forgotten), Recall@20 and NDCG@20 relative to the retrain's, and the
top-20 overlap with the retrain. Two baselines are measured the same way: ``nothing`` (the
original model, untouched: gap 0 by definition, and the overlap that doing nothing gets) and
``Retrain(seed=1)`` (the seed noise of every figure). After every request the cheap drift
estimates that need no retraining are recorded:

* ``drift``: the callback's :attr:`UnlearningCallback.drift`, training rows deleted since the
  model was last fitted as a share of the rows it was fitted on (``deleted`` without retrains);
* ``grad_ratio``: ``||grad L_retained(model)||`` over the original's ``||grad L(original)||``,
  how far the model is from a stationary point of the objective it should minimise (one pass
  over the retained rows).

Prints a table and how the estimates track the measured drift (Pearson r over the checkpoints,
and the change of each figure per 1% of rows deleted), and writes JSON. Not part of the test
run (MovieLens-100K from ``$LIGHTNING_UNLEARN_DATA`` or ``--data-root``):

    LIGHTNING_UNLEARN_DATA=/work/shared/data python tests/benchmarks/bench_drift.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_unlearn.data import MovieLens100K, RecDataModule
from lightning_unlearn.data.batches import TrainRows
from lightning_unlearn.metrics.completeness import completeness_report
from lightning_unlearn.models import MF
from lightning_unlearn.models.base import Recommender
from lightning_unlearn.unlearning import IFRU, DeletionSpec, FitRecipe, Retrain, UnlearningCallback, UnlearningContext
from lightning_unlearn.unlearning.callback import MAX_DELETED_FRACTION
from lightning_unlearn.unlearning.methods.alteraser import AltEraser
from lightning_unlearn.unlearning.stationarity import objective_gradient_norm

SEED = 0
NOISE_SEED = 1
K = 20
# recipes/ml100k/mf.yaml
RECIPE = FitRecipe(max_epochs=100, monitor="val/ndcg@20", mode="max", patience=5)


def datamodule(root: str | None) -> RecDataModule:
    dm = RecDataModule(MovieLens100K(root=root), split="random", test_fraction=0.2, val_fraction=0.1, num_negatives=8,
                       batch_size=1024, seed=SEED)
    dm.setup()
    return dm


def methods() -> dict[str, Any]:
    """Default options (AltEraser anchored at the trained model), plus AltEraser on the paper's retained objective."""
    return {"IFRU": IFRU(), "AltEraser": AltEraser(), "AltEraser(retained)": AltEraser(objective="retained")}


def utility(model: Recommender, dm: RecDataModule) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        metrics = model.evaluate(dm.test_dataloader(), prefix="test")
    return {k: metrics[f"test/{k}"] for k in (f"recall@{K}", f"ndcg@{K}")}


def retrain(original: Recommender, dm: RecDataModule, deleted: TrainRows, seed: int | None) -> tuple[Recommender, float]:
    model = copy.deepcopy(original).train()
    context = UnlearningContext(seed=SEED, fit=lambda fresh: RECIPE(fresh, dm))
    report = Retrain(seed=seed).unlearn(model, dm.train_rows(), deleted, context)
    return model.eval(), report.seconds


def figures(original: Recommender, model: Recommender, reference: Recommender, deleted_table, dm: RecDataModule,
            reference_utility: dict[str, float], cache: dict) -> dict[str, Any]:
    """The completeness and utility of ``model`` against ``reference`` on every row deleted so far."""
    report = completeness_report(original, model, reference, deleted_table, dm.train, dm.test, k=K, seed=SEED, cache=cache)
    mine = utility(model, dm)
    c = report["completeness"]
    return {
        "gap_closed_rank": c["gap_closed_rank"], "gap_closed_top20": c[f"gap_closed_top{K}"], "gap_closed_mia": c["gap_closed_mia"],
        "overlap@20": c[f"overlap@{K}"], "overlap@20_affected": c[f"overlap@{K}_affected"],
        "score_distance_rel": c["score_distance_rel"],
        "utility": mine, **{f"rel_{k}": mine[k] / reference_utility[k] for k in mine},
        "deleted_rank_pct": report["deleted"]["rank_pct"], "original_rank_pct": report["original"]["rank_pct"],
        "reference_rank_pct": report["reference"]["rank_pct"],
    }


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson's r over the pairs where both are finite (``nan`` with fewer than 3, or no spread)."""
    pairs = [(x, y) for x, y in zip(xs, ys) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan
    mx, my = statistics.fmean(p[0] for p in pairs), statistics.fmean(p[1] for p in pairs)
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx, syy = sum((x - mx) ** 2 for x, _ in pairs), sum((y - my) ** 2 for _, y in pairs)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` on ``xs``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else math.nan


def main() -> None:
    global RECIPE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (set explicitly: the machine is shared)")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--fraction", type=float, default=0.001, help="share of the current training rows per request")
    parser.add_argument("--checkpoints", default="1,5,10,20,30,40,50", help="requests after which to compare with Retrain")
    parser.add_argument("--no-noise", action="store_true", help="skip the second-seed Retrain (seed noise) at the checkpoints")
    parser.add_argument("--policy-fraction", type=float, default=MAX_DELETED_FRACTION,
                        help="also run each method with UnlearningCallback(max_deleted_fraction=...) set to this "
                             "(default: the callback's default; 0: no policy streams)")
    parser.add_argument("--policy-every", type=int, default=None, help="... and with retrain_every=... set to this")
    parser.add_argument("--policy-grad-ratio", type=float, default=None, help="... and with max_grad_ratio=... set to this")
    parser.add_argument("--max-epochs", type=int, default=RECIPE.max_epochs, help="epoch cap of every fit (fewer: a quick smoke run)")
    parser.add_argument("--data-root", default=None, help="data root (default: $LIGHTNING_UNLEARN_DATA)")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/drift.json"))
    args = parser.parse_args()
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if int(c) <= args.requests})
    warnings.filterwarnings("ignore")
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    RECIPE = dataclasses.replace(RECIPE, max_epochs=args.max_epochs)
    policy = {"max_deleted_fraction": args.policy_fraction or None, "retrain_every": args.policy_every,
              "max_grad_ratio": args.policy_grad_ratio}

    # the original, fitted once; the plan's datamodule decides the requests and serves the retrains
    plan = datamodule(args.data_root)
    first_train = plan.train
    pl.seed_everything(SEED, verbose=False)
    original = MF(plan.num_users, plan.num_items, embedding_dim=64, loss="bpr", l2=0.05, lr=2.0e-3)
    start = time.perf_counter()
    RECIPE(original, plan)
    fit_seconds = time.perf_counter() - start
    original.eval()
    original_rows = len(plan.train)
    original_grad = objective_gradient_norm(original, plan.train_rows())
    original_utility = utility(original, plan)
    print(f"original: {original_rows} training rows, fit {fit_seconds:.1f} s, grad norm {original_grad:.3g}, "
          f"recall@20 {original_utility['recall@20']:.4f}", flush=True)

    folder = Path(tempfile.mkdtemp(prefix="bench_drift_"))
    variants = {"": {"max_deleted_fraction": None, "retrain_every": None, "max_grad_ratio": None}}  # the bare method: never retrains
    if any(v is not None for v in policy.values()):
        variants["+policy"] = policy
    streams = {}
    for suffix, settings in variants.items():
        for name, method in methods().items():
            streams[name + suffix] = {
                "method": method, "policy": settings, "dm": datamodule(args.data_root), "model": copy.deepcopy(original).train(),
                "callback": UnlearningCallback(method, dirpath=folder / (name + suffix), evaluate=False, seed=SEED, **settings),
                "steps": [], "checkpoints": [],
            }
    deleted_rows: list[TrainRows] = []
    baselines: dict[str, list] = {"nothing": [], "Retrain(seed=1)": []}
    references = []
    for index in range(1, args.requests + 1):
        request = DeletionSpec(kind="interactions", fraction=args.fraction, seed=SEED + index).build(plan.train)
        resolved = request.resolve(plan.train)
        deleted_rows.append(plan.remove(resolved.rows))
        deleted_frac = 1 - len(plan.train) / original_rows
        for name, s in streams.items():
            s["callback"].request(request)
            (report,) = s["callback"].apply_pending(s["model"], s["dm"], recipe=RECIPE, seed=SEED)
            assert torch.equal(s["dm"].train.keys, plan.train.keys), "the streams must see the same data"
            tick = time.perf_counter()
            grad_ratio = objective_gradient_norm(s["model"], s["dm"].train_rows()) / original_grad
            grad_seconds = time.perf_counter() - tick
            s["steps"].append({"request": index, "method": report.method, "rows": report.rows_removed, "seconds": report.seconds,
                               "precompute_seconds": report.precompute_seconds, "deleted_frac": deleted_frac,
                               "drift": s["callback"].drift, "grad_ratio": grad_ratio, "grad_seconds": grad_seconds,
                               "diagnostics": {k: v for k, v in report.diagnostics.items()
                                               if isinstance(v, (int, float)) and not isinstance(v, bool)}})
        if index not in checkpoints:
            continue
        deleted = _concat(deleted_rows)
        deleted_table = first_train.select(~torch.isin(first_train.keys, plan.train.keys))
        reference, retrain_seconds = retrain(original, plan, deleted, None)
        reference_utility = utility(reference, plan)
        cache: dict = {}
        row = {"request": index, "deleted_frac": deleted_frac, "drift": deleted_frac}
        baselines["nothing"].append({**row, "grad_ratio": math.nan,
                                     **figures(original, copy.deepcopy(original), reference, deleted_table, plan, reference_utility, cache)})
        if not args.no_noise:
            noise, _ = retrain(original, plan, deleted, NOISE_SEED)
            baselines["Retrain(seed=1)"].append({**row, "grad_ratio": objective_gradient_norm(noise, plan.train_rows()) / original_grad,
                                                 **figures(original, noise, reference, deleted_table, plan, reference_utility, cache)})
        references.append({"request": index, "retrain_seconds": retrain_seconds, "utility": reference_utility,
                           "grad_ratio": objective_gradient_norm(reference, plan.train_rows()) / original_grad})
        line = [f"after {index:>2} requests ({deleted_frac:.2%} deleted, retrain {retrain_seconds:.1f} s)"]
        for name, s in streams.items():
            f = figures(original, s["model"].eval(), reference, deleted_table, plan, reference_utility, cache)
            s["model"].train()
            step = s["steps"][-1]
            s["checkpoints"].append({**row, "drift": step["drift"], "grad_ratio": step["grad_ratio"], **f})
            line.append(f"{name}: gap {f['gap_closed_rank']:.3f} rel_recall {f['rel_recall@20']:.3f} overlap {f['overlap@20']:.3f}")
        print(" | ".join(line), flush=True)

    result = {
        "hardware": {"cpu": _cpu(), "threads": torch.get_num_threads(), "device": "cpu"},
        "torch": torch.__version__, "pytorch_lightning": pl.__version__,
        "recipe": dataclasses.asdict(RECIPE),
        "data": {"dataset": "MovieLens-100K", "train_rows": original_rows, "fraction_per_request": args.fraction,
                 "requests": args.requests},
        "original": {"fit_seconds": fit_seconds, "grad_norm": original_grad, "utility": original_utility},
        "reference": references,
        "baselines": {name: rows for name, rows in baselines.items() if rows},
        "methods": {name: _summary(s) for name, s in streams.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print()
    print(f"MovieLens-100K, MF d=64 BPR, {original_rows} training rows; {args.requests} requests of {args.fraction:.1%} of the "
          f"current rows; torch threads {torch.get_num_threads()}; original grad norm {original_grad:.3g}; "
          f"'+policy': UnlearningCallback({', '.join(f'{k}={v}' for k, v in policy.items())})")
    print(format_table(result))
    print(f"JSON written to {args.out}")


def _summary(stream: dict[str, Any]) -> dict[str, Any]:
    steps, points = stream["steps"], stream["checkpoints"]
    fast = [step for step in steps if step["method"] != "Retrain"]
    measured = {"gap_closed_rank": "gap_rank", "rel_recall@20": "rel_recall", "overlap@20": "overlap"}
    return {
        "options": _options(stream["method"]), "policy": stream["policy"], "steps": steps, "checkpoints": points,
        "retrains": [step["request"] for step in steps if step["method"] == "Retrain"],
        "median_seconds": statistics.median(step["seconds"] for step in fast) if fast else math.nan,
        "median_grad_seconds": statistics.median(step["grad_seconds"] for step in steps),
        "precompute_seconds": sum(step["precompute_seconds"] for step in steps),
        # how the cheap estimates track what was measured, over the checkpoints
        "pearson": {f"{est}~{label}": pearson([c[est] for c in points], [c[key] for c in points])
                    for est in ("drift", "grad_ratio") for key, label in measured.items()},
        "slope_per_pct_deleted": {label: slope([100 * c["deleted_frac"] for c in points], [c[key] for c in points])
                                  for key, label in measured.items()},
    }


def format_table(result: dict[str, Any]) -> str:
    """One line per model and checkpoint: the measured drift next to the cheap estimates."""
    header = (f"{'model':<27}{'requests':>9}{'deleted':>9}{'drift':>8}{'gap_rank':>10}{'gap_top20':>10}{'rel_rec@20':>11}"
              f"{'rel_ndcg@20':>12}{'overlap@20':>11}{'ovl_aff':>9}{'grad_ratio':>11}")
    lines = [header]
    rows = [(name, c) for name, points in result["baselines"].items() for c in points]
    rows += [(name, c) for name, m in result["methods"].items() for c in m["checkpoints"]]
    for name, c in rows:
        lines.append(f"{name:<27}{c['request']:>9}{c['deleted_frac']:>9.2%}{c['drift']:>8.2%}{c['gap_closed_rank']:>10.3f}"
                     f"{c['gap_closed_top20']:>10.3f}{c['rel_recall@20']:>11.3f}{c['rel_ndcg@20']:>12.3f}{c['overlap@20']:>11.3f}"
                     f"{c['overlap@20_affected']:>9.3f}{c['grad_ratio']:>11.3f}")
    grads = ", ".join(f"{r['request']}: {r['grad_ratio']:.3f}" for r in result["reference"])
    lines.append(f"Retrain (the reference): grad_ratio {grads}")
    for name, m in result["methods"].items():
        r, k = m["pearson"], m["slope_per_pct_deleted"]
        lines.append(f"{name}: median {m['median_seconds'] * 1000:.0f} ms per fast request (the grad_ratio pass "
                     f"{m['median_grad_seconds'] * 1000:.0f} ms), precompute {m['precompute_seconds']:.1f} s, "
                     f"retrained at requests {m['retrains'] or 'none'}; per 1% deleted: gap_rank {k['gap_rank']:+.3f}, "
                     f"rel_recall {k['rel_recall']:+.4f}, overlap {k['overlap']:+.3f}; Pearson r of drift with gap_rank "
                     f"{r['drift~gap_rank']:.2f}, rel_recall {r['drift~rel_recall']:.2f}, overlap {r['drift~overlap']:.2f}; "
                     f"of grad_ratio with gap_rank {r['grad_ratio~gap_rank']:.2f}, rel_recall {r['grad_ratio~rel_recall']:.2f}, "
                     f"overlap {r['grad_ratio~overlap']:.2f}")
    retrains = [r["retrain_seconds"] for r in result["reference"]]
    lines.append(f"Retrain: median {statistics.median(retrains):.1f} s over {len(retrains)} checkpoints")
    return "\n".join(lines)


def _concat(parts: list[TrainRows]) -> TrainRows:
    out = parts[0]
    for part in parts[1:]:
        out = out.concat(part)
    return out


def _options(method: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(method).items() if not k.startswith("_")}


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
