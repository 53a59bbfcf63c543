"""Summary of several operator_speed.py runs with the kube client variants: per run, each variant's
figure divided by tuneop's (hand-written client) in the same run; then the median over runs.

    .venv/bin/python benchmarks/kube_clients_summary.py benchmarks/results/kube-clients-2026*-?.json

A run's JSON may list variants to leave out under "exclude" (with a "note" saying why).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

METRICS = [
    ("create -> Job p50", "seq", "p50_ms"), ("create -> Job p95", "seq", "p95_ms"),
    ("create -> status p50", "seq", "status_p50_ms"), ("burst: last Job", "burst", "jobs_s"),
    ("burst: last Running", "burst", "running_s"), ("burst: operator CPU", "burst", "cpu_s"),
    ("RSS idle", "rss", "rss_idle_mb"), ("RSS with objects", "rss", "rss_mb"),
]


def main(paths: list[str]) -> int:
    runs = [(Path(p).stem, json.loads(Path(p).read_text())) for p in paths]
    variants: list[str] = []
    for _, run in runs:
        variants += [o for o in run["results"] if o.startswith("tuneop-") and o not in variants]
    summary: dict[str, dict[str, dict[str, object]]] = {}
    for v in variants:
        summary[v] = {}
        for label, phase, key in METRICS:
            ratios, dups = [], []
            for _, run in runs:
                res = run["results"]
                if v in res and v not in run.get("exclude", []) and "tuneop" in res:
                    a, b = (res[v].get(phase) or {}).get(key), (res["tuneop"].get(phase) or {}).get(key)
                    if isinstance(a, (int, float)) and b:
                        ratios.append(round(a / b, 2))
                    dups.append((res[v].get("burst") or {}).get("duplicate_jobs"))
            if ratios:
                summary[v][label] = {"median": round(statistics.median(ratios), 2), "runs": ratios}
        summary[v]["duplicate Jobs (burst)"] = {"runs": dups}
    for v, rows in summary.items():
        print(f"{v} / tuneop  ({len(rows['duplicate Jobs (burst)']['runs'])} runs)")
        for label, row in rows.items():
            if "median" in row:
                print(f"  {label:22s} median {row['median']:.2f}x   runs {' '.join(f'{x:.2f}' for x in row['runs'])}")
            else:
                print(f"  {label:22s} {row['runs']}")
    print(json.dumps({"runs": [n for n, _ in runs], "ratios_to_tuneop": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
