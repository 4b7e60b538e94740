"""Aggregate `detox` runs (e.g. one per seed) into one table: mean ± std over the runs per method.

    python -m regft_jax.report runs/seed0 runs/seed1 runs/seed2 [--out DIR]

Reads each RUN_DIR/results.json; prints a markdown table (rows = methods in the runs' order;
toxicity ↓ under every eval oracle, the training oracle marked, perplexity per domain, train
seconds) and, with --out, writes it to DIR/table.md and the per-method aggregates to DIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from regft_jax.errors import UserInputError


def load_runs(run_dirs) -> list[dict]:
    runs = []
    for d in run_dirs:
        path = os.path.join(d, "results.json")
        if not os.path.isfile(path):
            raise UserInputError(f"{path}: not found (expected the work directory of a finished detox run)")
        with open(path) as f:
            runs.append(json.load(f))
        if "judges" not in runs[-1]:
            raise UserInputError(f"{path}: no 'judges' entry (not a detox/base run's results.json)")
    return runs


def aggregate(runs: list[dict]) -> tuple[dict, list[str], dict]:
    """(method -> key -> {"mean", "std", "n"}, metric keys in table order, key -> column header)."""
    judges = runs[0]["judges"]
    oracles, domain = judges["eval_oracles"], judges["domain"]
    methods = list(dict.fromkeys(m for r in runs for m in r if m != "judges"))
    keys = [f"toxicity_{o}_{domain}" for o in oracles]
    keys += sorted({k for r in runs for m in methods for k in r.get(m, {}) if k.startswith("ppl_")})
    keys += ["train_seconds"]
    labels = {f"toxicity_{o}_{domain}": f"{o} ({judges[o]['role']}) ↓" for o in oracles}
    labels["train_seconds"] = "train s"
    out = {}
    for m in methods:
        out[m] = {}
        for k in keys:
            values = [r[m][k] for r in runs if m in r and isinstance(r[m].get(k), (int, float))]
            values = [v for v in values if not math.isnan(v)]
            if values:
                out[m][k] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1
                             else 0.0, "n": len(values)}
    return out, keys, labels


def _cell(key: str, stat: dict | None) -> str:
    if stat is None:
        return "-"
    scale, fmt = (100, "{:.1f}%") if key.startswith("toxicity") else (1, "{:.1f}")
    text = fmt.format(scale * stat["mean"])
    if stat["n"] > 1:
        text += " ± " + fmt.format(scale * stat["std"]).rstrip("%")
    return text


def markdown(summary: dict, keys: list[str], labels: dict) -> str:
    lines = ["| method | " + " | ".join(labels.get(k, k) for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for m, stats in summary.items():
        lines.append(f"| {m} | " + " | ".join(_cell(k, stats.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regft_jax.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="work directories of detox runs (e.g. one per seed)")
    parser.add_argument("--out", help="write table.md and summary.json here")
    args = parser.parse_args(argv)
    try:
        summary, keys, labels = aggregate(load_runs(args.runs))
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(args.runs)
    table = markdown(summary, keys, labels)
    print(f"{n} run(s); mean ± std (sample) over runs; toxicity = fraction of held-out toxic-domain continuations "
          f"flagged:\n{table}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({"runs": list(args.runs), "methods": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
