"""Benchmark: full-ranking evaluation against the cost of its score matmul + ``topk`` (issue 16).

For 500 users x {10^4, 10^5, 10^6} items (d=64 random embeddings, ~20 targets and ~50
exclusions per user, as ``(row, item)`` coordinates like ``RankingBatches`` gives them), times,
over chunks of users of at most ``--chunk-mb`` MB of scores (``--repeats`` rounds timing the
cases in turns; the medians of the times, and of each round's ratio to ``base``):

* ``base``: score matmul + one ``topk`` per chunk, the floor;
* ``sparse``: score matmul + :func:`sparse_ranking_metrics` without AUC, and ``sparse+auc`` with it,
  working in the freshly computed scores (``overwrite=True``, as ``Recommender`` validation does;
  ``--copy`` measures the copying default instead);
* ``dense+auc``: the former implementation (dense boolean masks, AUC by binary search of every
  candidate), for the catalogs where its masks fit (``--dense-max`` items).

Where the targets lie: ``--boost 0`` (the default) draws them uniformly, so they score like any
item (AUC about 0.5); ``--boost B`` draws each user's targets without replacement with
probability proportional to ``exp(B * z)``, ``z`` the item's standardised score for the user,
as a trained model ranks its held-out items high (B = 3 gives an AUC of about 0.98). Several
values may be given; the table reports the mean AUC obtained.

Prints a table with the ratios to ``base`` and writes JSON (``runs/benchmarks/ranking.json``)::

    python tests/benchmarks/bench_ranking.py --threads 1
    python tests/benchmarks/bench_ranking.py --threads 1 --items 100000 1000000 --boost 0 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lightning_unlearn.ranking import sparse_ranking_metrics


def dense_pass(scores, t_rows, t_items, e_rows, e_items, ks):
    """The former path: dense masks built from the coordinates, then the dense implementation."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.test_ranking import dense_reference

    target = torch.zeros_like(scores, dtype=torch.bool)
    target[t_rows, t_items] = True
    exclude = torch.zeros_like(target)
    exclude[e_rows, e_items] = True
    return dense_reference(scores, target, exclude, ks, auc=True)


def draw_targets(user_emb, item_emb, count, boost, generator, rows_per_step=16):
    """``(users, count)`` distinct target items per user: uniform for ``boost=0``, otherwise drawn
    without replacement with probability ``∝ exp(boost * z)`` (Gumbel top-k), ``z`` the standardised score."""
    if boost == 0:
        return torch.randint(len(item_emb), (len(user_emb), count), generator=generator)
    out = []
    for start in range(0, len(user_emb), rows_per_step):
        scores = user_emb[start:start + rows_per_step] @ item_emb.T
        z = (scores - scores.mean(1, keepdim=True)) / scores.std(1, keepdim=True)
        gumbel = -torch.log(-torch.log(torch.rand(scores.shape, generator=generator)))
        out.append(torch.topk(boost * z + gumbel, count, dim=1).indices)
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--items", type=int, nargs="+", default=[10**4, 10**5, 10**6])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--targets", type=int, default=20)
    parser.add_argument("--exclusions", type=int, default=50)
    parser.add_argument("--boost", type=float, nargs="+", default=[0.0], help="where the targets lie (see above)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-mb", type=float, default=256.0, help="scores of one chunk of users, MB")
    parser.add_argument("--copy", action="store_true", help="leave the scores intact (overwrite=False)")
    parser.add_argument("--dense-max", type=int, default=10**5, help="largest catalog for the former dense path")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/ranking.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, "
          f"{args.users} users, d={args.dim}, ~{args.targets} targets and ~{args.exclusions} exclusions per user, "
          f"overwrite={not args.copy}, medians of {args.repeats} rounds")
    ks = (10, 20)
    rows = []
    for items in args.items:
        for boost in args.boost:
            g = torch.Generator().manual_seed(0)
            user_emb = torch.randn(args.users, args.dim, generator=g)
            item_emb = torch.randn(items, args.dim, generator=g)
            t_items = draw_targets(user_emb, item_emb, args.targets, boost, g)
            e_items = torch.randint(items, (args.users, args.exclusions), generator=g)
            step = max(1, int(args.chunk_mb * 2**20) // (4 * items))
            chunks = []
            for start in range(0, args.users, step):
                n = min(step, args.users - start)
                chunks.append((start, n, torch.arange(n).repeat_interleave(args.targets), t_items[start:start + n].flatten(),
                               torch.arange(n).repeat_interleave(args.exclusions), e_items[start:start + n].flatten()))

            def base():
                for start, n, *_ in chunks:
                    torch.topk(user_emb[start:start + n] @ item_emb.T, max(ks), dim=1)

            def sparse(auc):
                return [sparse_ranking_metrics(user_emb[start:start + n] @ item_emb.T, tr, ti, er, ei, ks, auc=auc,
                                               overwrite=not args.copy)
                        for start, n, tr, ti, er, ei in chunks]

            def dense():
                for start, n, tr, ti, er, ei in chunks:
                    dense_pass(user_emb[start:start + n] @ item_emb.T, tr, ti, er, ei, ks)

            cases = {"base": base, "sparse": lambda: sparse(False), "sparse+auc": lambda: sparse(True)}
            if items <= args.dense_max:
                cases["dense+auc"] = dense
            mean_auc = torch.cat([out["auc"] for out in sparse(True)]).mean().item()
            row = {"items": items, "boost": boost, "auc": mean_auc, "users": args.users, "users_per_chunk": step,
                   "threads": torch.get_num_threads(), "overwrite": not args.copy}
            times = {name: [] for name in cases}
            for fn in cases.values():
                fn()  # warm-up
            for _ in range(args.repeats):  # the cases in turns, so that a change of machine load hits all alike
                for name, fn in cases.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            for name in cases:
                row[name] = statistics.median(times[name])
                if name != "base":
                    row[f"{name}/base"] = statistics.median(t / b for t, b in zip(times[name], times["base"]))
            rows.append(row)
            cells = "  ".join(f"{name} {row[name]:7.3f}s" + ("" if name == "base" else f" ({row[name + '/base']:.2f}x)")
                              for name in cases)
            print(f"{items:>9,} items, boost {boost:g} (AUC {mean_auc:.3f}): {cells}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
                                    "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
