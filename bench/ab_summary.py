"""Medians per variant of an interleaved A/B (bench/ab.sh): `python bench/ab_summary.py RESULTS_DIR VARIANT...`.

RESULTS_DIR holds one `shmrt bench` results directory per run, named `<variant>-<round>`. For each variant it
prints the median over its rounds of the decode row's per-token columns, how many rounds each variant
beat the first one in ms/token (the rounds alternate, so a drift of the host touches every variant alike), the
median of its rounds' ms/token over their own floor, the median of its differences to the first variant round by
round, and the two-sided sign test's p for its wins (lent hosts move +-25% between rounds of one tree: 3 of 3 wins
is p 0.25, 4 of 9 is 1.0; read a change as real only where that p is small or a quiet host agrees)."""
from __future__ import annotations

import json
import math
import pathlib
import statistics
import sys

COLUMNS = (("ms/token", "median_s"), ("enclave", "enclave_s"), ("encode", "stage_encode_s"),
           ("doorbell", "stage_doorbell_s"), ("wait", "stage_wait_s"), ("decode", "stage_decode_s"),
           ("daemon", "daemon_s"), ("floor", "floor_s"))


def decode_row(results: pathlib.Path) -> dict | None:
    records = json.loads(results.read_text())
    records = records if isinstance(records, list) else records.get("records", [])
    rows = [r for r in records if r.get("phase") == "decode" and r.get("transport") == "shm"]
    return rows[0] if rows else None


def per_token(row: dict) -> list[float]:
    return [row[key] / row["tokens"] * 1e3 for _, key in COLUMNS]


def sign_test(wins: int, rounds: int) -> float:
    """Two-sided p of `wins` of `rounds` under no difference (each round a coin toss)."""
    if not rounds:
        return 1.0
    tail = sum(math.comb(rounds, i) for i in range(min(wins, rounds - wins) + 1)) / 2 ** rounds
    return min(1.0, 2 * tail)


def main(root: str, variants: list[str]) -> None:
    runs: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    for path in sorted(pathlib.Path(root).glob("*-*/results.json")):
        variant, _, round_ = path.parent.name.rpartition("-")
        row = decode_row(path) if variant in runs else None
        if row is not None:
            runs[variant][round_] = per_token(row)
    print("| variant | rounds | " + " | ".join(name for name, _ in COLUMNS) + " | faster than " + variants[0]
          + " | x floor | minus " + variants[0] + " | sign p |")
    print("|" + "---|" * (len(COLUMNS) + 6))
    first = runs[variants[0]]
    for variant in variants:
        rounds = runs[variant]
        if not rounds:
            continue
        medians = [statistics.median(values) for values in zip(*rounds.values())]
        shared = [r for r in rounds if r in first]
        wins = sum(rounds[r][0] < first[r][0] for r in shared)
        over_floor = statistics.median(v[0] / v[-1] for v in rounds.values())
        compared = variant != variants[0] and shared
        diff = f"{statistics.median(rounds[r][0] - first[r][0] for r in shared):+.2f}" if compared else ""
        p = f"{sign_test(wins, len(shared)):.2f}" if compared else ""
        print(f"| {variant} | {len(rounds)} | " + " | ".join(f"{m:.2f}" for m in medians)
              + f" | {wins}/{len(shared)} | {over_floor:.2f} | {diff} | {p} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["old", "new"])
