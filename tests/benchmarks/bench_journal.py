"""Benchmark: what the deletion record costs per request as the journal grows.

For a journal of N entries: the seconds of one ``Journal.append`` by the process that wrote
them (it verifies only what was appended since it last read), of one by a fresh process
(``Journal`` object; it verifies the whole chain once), and of ``recover`` (the strict read,
the lock, the check for interrupted requests). Each figure is the median of ``--repeats``
runs; the fsync of every append is included (the disk's figure, not the code's, at small N).

Prints a table and writes JSON. Not part of the test run:

    python tests/benchmarks/bench_journal.py --sizes 100,1000,10000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from lightning_unlearn.unlearning.journal import Journal
from lightning_unlearn.unlearning.record import recover


def grow(journal: Journal, n: int) -> None:
    """``n`` entries of the usual shape: pending, then applied, with the usual fields."""
    fields = {"kind": "users", "num_rows": 120, "num_pairs": 0, "num_users": 1, "num_items": 0, "num_ignored": 0,
              "method": "IFRU(k_hop=0)"}
    with journal.lock():
        for seq in range(len(journal.entries()), n):
            if seq % 2 == 0:
                journal.append("d" * 64, "pending", request=seq // 2, checkpoint=str(journal.folder / "x.ckpt"), **fields)
            else:
                journal.append("d" * 64, "applied", request=seq // 2, pending_seq=seq - 1, seconds=0.1,
                               checkpoint=str(journal.folder / "x.ckpt"), **fields)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="runs/benchmarks/journal.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        journal = Journal(Path(folder) / "journal.jsonl")
        (Path(folder) / "x.ckpt").touch()  # what the applied entries name
        for n in sorted(int(s) for s in args.sizes.split(",")):
            grow(journal, n)
            warm = [timed(lambda: journal.append("e" * 64, "dropped", reason="benchmark")) for _ in range(args.repeats)]
            cold = [timed(lambda: Journal(journal.path).append("e" * 64, "dropped", reason="benchmark"))
                    for _ in range(args.repeats)]
            recovery = [timed(lambda: recover(folder)) for _ in range(args.repeats)]
            rows.append({"entries": n, "append_same_process_s": statistics.median(warm),
                         "append_new_process_s": statistics.median(cold), "recover_s": statistics.median(recovery)})
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, medians of {args.repeats}")
    print(f"{'entries':>8} {'append (same process) ms':>26} {'append (new process) ms':>25} {'recover ms':>12}")
    for row in rows:
        print(f"{row['entries']:>8} {1e3 * row['append_same_process_s']:>26.2f} {1e3 * row['append_new_process_s']:>25.2f} "
              f"{1e3 * row['recover_s']:>12.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.machine(), "repeats": args.repeats, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
