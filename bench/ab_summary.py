"""Medians per variant of an interleaved A/B (bench/ab.sh): `python bench/ab_summary.py RESULTS_DIR VARIANT...`.

RESULTS_DIR holds one `shmrt bench` results directory per run, named `<variant>-<round>`. For each variant it
prints the median over its rounds of the decode row's per-token columns, and how many rounds each variant
beat the first one in ms/token (the rounds alternate, so a drift of the host touches every variant alike)."""
from __future__ import annotations

import json
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


def main(root: str, variants: list[str]) -> None:
    runs: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    for path in sorted(pathlib.Path(root).glob("*-*/results.json")):
        variant, _, round_ = path.parent.name.rpartition("-")
        row = decode_row(path) if variant in runs else None
        if row is not None:
            runs[variant][round_] = per_token(row)
    print("| variant | rounds | " + " | ".join(name for name, _ in COLUMNS) + " | faster than " + variants[0] + " |")
    print("|" + "---|" * (len(COLUMNS) + 3))
    first = runs[variants[0]]
    for variant in variants:
        rounds = runs[variant]
        if not rounds:
            continue
        medians = [statistics.median(values) for values in zip(*rounds.values())]
        wins = sum(rounds[r][0] < first[r][0] for r in rounds if r in first)
        shared = sum(r in first for r in rounds)
        print(f"| {variant} | {len(rounds)} | " + " | ".join(f"{m:.2f}" for m in medians) + f" | {wins}/{shared} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["old", "new"])
