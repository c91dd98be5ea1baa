"""Benchmark: reading interaction CSVs at scale, and generating a power-law catalog (issue 16).

Generates a power-law catalog (:func:`~lightning_unlearn.data.synthetic.power_law_catalog`,
``--users`` x ``--items`` x ``--draws``), writes it as ``user,item,rating,timestamp`` CSV, and
times :func:`~lightning_unlearn.data.readers.read_csv` on it (the vectorised path) and, on its
first ``--general-rows`` rows, both paths side by side (the general path parses with ``csv`` and
a Python loop per line). Reports rows/second and the ratio; medians of ``--repeats``. Writes
JSON (``runs/benchmarks/data.json``)::

    python tests/benchmarks/bench_data.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lightning_unlearn.data.readers as readers
from lightning_unlearn.data.synthetic import power_law_catalog


def timed(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--draws", type=int, default=10_000_000)
    parser.add_argument("--general-rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/data.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, numpy {np.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, medians of {args.repeats}")
    generate_seconds, data = timed(lambda: power_law_catalog(args.users, args.items, args.draws, seed=0), 1)
    print(f"power_law_catalog({args.users}, {args.items}, {args.draws}): {len(data)} distinct pairs, {data.num_items} items seen, "
          f"{generate_seconds:.2f} s")
    table = np.stack([data.user_ids[data.users.numpy()], data.item_ids[data.items.numpy()], np.full(len(data), 4),
                      1_000_000_000 + data.timestamps.numpy()], axis=1)
    with tempfile.TemporaryDirectory() as folder:
        full, head = Path(folder) / "full.csv", Path(folder) / "head.csv"
        for path, rows in ((full, table), (head, table[:args.general_rows])):
            np.savetxt(path, rows, fmt="%d", delimiter=",", header="user,item,rating,timestamp", comments="")
        size_mb = full.stat().st_size / 2**20
        fast_full, read = timed(lambda: readers.read_csv(full), args.repeats)
        assert len(read) == len(data)
        fast_head, _ = timed(lambda: readers.read_csv(head), args.repeats)
        original = readers._read_numeric
        readers._read_numeric = lambda *a, **k: None  # the general path only
        try:
            general_head, _ = timed(lambda: readers.read_csv(head), args.repeats)
        finally:
            readers._read_numeric = original
    result = {
        "threads": torch.get_num_threads(), "generate": {"draws": args.draws, "pairs": len(data), "seconds": generate_seconds},
        "read_full": {"rows": len(data), "mb": size_mb, "seconds": fast_full, "rows_per_second": len(data) / fast_full},
        "read_head": {"rows": min(args.general_rows, len(data)), "vectorised_seconds": fast_head, "general_seconds": general_head,
                      "speedup": general_head / fast_head},
    }
    print(f"read_csv, {len(data)} rows ({size_mb:.0f} MB): {fast_full:.2f} s, {len(data) / fast_full / 1e6:.2f} M rows/s")
    print(f"read_csv, first {result['read_head']['rows']} rows: vectorised {fast_head:.2f} s, general {general_head:.2f} s, "
          f"{general_head / fast_head:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
