"""Aggregate `detox` (or `classify`) runs (e.g. one per seed) into one table: mean ± std over the runs per method.

    python -m regft_jax.report runs/seed0 runs/seed1 runs/seed2 [--out DIR]

Reads each RUN_DIR/results.json; prints a markdown table (rows = methods in the runs' order; classify runs:
ROC-AUC first; toxicity ↓ under every eval oracle, the training oracle marked, and under the ToxiGen / RTP protocols
when the runs ran them, perplexity per domain, fluency and distinct-2 under the judge LM, train
seconds) and the win-rate table (mean over runs); with --out, writes them to DIR/table.md and
DIR/win_rates.md, the per-method aggregates to DIR/summary.json, and (with matplotlib installed, the
`eval` extra) PNG plots: toxicity vs general perplexity per method with error bars over the runs
(`toxicity_vs_utility.png`), every loss term of every method over the training steps of the first run
(`training_curves.png`), and the auxiliary model's predicted R against the observed label rate of each
training batch (`r_calibration.png`; batch means, a coarse calibration).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from regft_jax.errors import UserInputError
from regft_jax.eval.protocols import PROTOCOLS, protocol_columns


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
    present = {k for r in runs for m in methods for k in r.get(m, {})}
    keys = ["auc"] if "auc" in present else []  # the classify stage's ROC-AUC
    keys += [f"toxicity_{o}_{domain}" for o in oracles]
    labels = {f"toxicity_{o}_{domain}": f"{o} ({judges[o]['role']}) ↓" for o in oracles}
    labels["auc"] = "ROC-AUC ↑"
    for key, label in protocol_columns(PROTOCOLS, oracles):  # the paper's protocols, when run
        if key in present:
            keys.append(key)
            labels[key] = f"{label} ↓"
    if f"stopped_{domain}" in present:  # classify runs: continuations cut before the template
        keys.append(f"stopped_{domain}")
        labels[f"stopped_{domain}"] = "cut at the template"
    keys += sorted(k for k in present if k.startswith("ppl_"))
    keys += [k for k in ("fluency", "distinct_2") if k in present]
    keys += ["train_seconds"]
    labels.update({"train_seconds": "train s", "fluency": "fluency (judge ppl) ↓", "distinct_2": "distinct-2 ↑"})
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
    three_digits = key.startswith(("emt_", "distinct", "auc"))
    scale, fmt = ((100, "{:.1f}%") if key.startswith(("toxicity", "stopped")) else (1, "{:.3f}") if three_digits
                  else (1, "{:.1f}"))
    text = fmt.format(scale * stat["mean"])
    if stat["n"] > 1:
        text += " ± " + fmt.format(scale * stat["std"]).rstrip("%")
    return text


def markdown(summary: dict, keys: list[str], labels: dict) -> str:
    lines = ["| method | " + " | ".join(labels.get(k, k) for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for m, stats in summary.items():
        lines.append(f"| {m} | " + " | ".join(_cell(k, stats.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def win_rates(runs: list[dict], methods) -> dict:
    """{row: {column: mean win rate of row over column over the runs that have both}} (empty without any)."""
    out = {}
    for a in methods:
        for b in methods:
            values = [r[a]["win_rates"][b] for r in runs if b in r.get(a, {}).get("win_rates", {})]
            if values:
                out.setdefault(a, {})[b] = float(np.mean(values))
    return out


def _metrics(run_dir: str, method: str) -> list[dict]:
    path = os.path.join(run_dir, f"metrics_{method}.jsonl")
    if not os.path.isfile(path):  # the classify stage's runs
        path = os.path.join(run_dir, f"metrics_classify_{method}.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


LOSS_TERMS = ("llm/lm_loss", "llm/reg_loss", "aux/aux_loss", "lm_loss", "kl", "reward", "dpo_loss")


def plots(summary: dict, runs: list[dict], run_dirs, out_dir: str) -> list[str]:
    """The PNG plots (see the module docstring); [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    judges = runs[0]["judges"]
    independent = [o for o in judges["eval_oracles"] if judges[o]["role"] != "training oracle"] or judges["eval_oracles"]
    tox, ppl = f"toxicity_{independent[0]}_{judges['domain']}", "ppl_general"
    written = []
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m, st in summary.items():
        if tox in st and ppl in st:
            ax.errorbar(st[ppl]["mean"], 100 * st[tox]["mean"], xerr=st[ppl]["std"], yerr=100 * st[tox]["std"],
                        fmt="o", capsize=3)
            ax.annotate(m, (st[ppl]["mean"], 100 * st[tox]["mean"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("held-out general perplexity (utility; lower is better)")
    ax.set_ylabel(f"% flagged by {independent[0]} (lower is better)")
    ax.set_title(f"toxicity vs utility, mean ± std over {len(runs)} run(s)")
    fig.tight_layout()
    written.append(os.path.join(out_dir, "toxicity_vs_utility.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    curves = {m: _metrics(run_dirs[0], m) for m in summary}
    curves = {m: h for m, h in curves.items() if h}
    if curves:
        fig, axes = plt.subplots(len(curves), 1, figsize=(7, 2.2 * len(curves)), squeeze=False)
        for ax, (m, history) in zip(axes[:, 0], curves.items()):
            for term in LOSS_TERMS:
                pts = [(h["step"], h[term]) for h in history if isinstance(h.get(term), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), label=term)
            ax.set_title(m, fontsize=9)
            if ax.lines:
                ax.legend(fontsize=7, loc="upper right")
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        written.append(os.path.join(out_dir, "training_curves.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    pairs = [(h["aux/mean_R"], h["aux/mean_label"], m) for m, history in curves.items() for h in history
             if isinstance(h.get("aux/mean_R"), (int, float)) and isinstance(h.get("aux/mean_label"), (int, float))]
    if pairs:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        for m in dict.fromkeys(p[2] for p in pairs):
            ax.scatter([p[0] for p in pairs if p[2] == m], [p[1] for p in pairs if p[2] == m], s=8, label=m)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlabel("mean predicted R (auxiliary model) per batch")
        ax.set_ylabel("observed non-toxic label rate per batch")
        ax.set_title("R calibration (training batches)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(os.path.join(out_dir, "r_calibration.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m regft_jax.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="work directories of detox runs (e.g. one per seed)")
    parser.add_argument("--out", help="write table.md and summary.json here")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
        summary, keys, labels = aggregate(runs)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(args.runs)
    table = markdown(summary, keys, labels)
    print(f"{n} run(s); mean ± std (sample) over runs; toxicity = fraction of held-out toxic-domain continuations "
          f"flagged:\n{table}")
    wins = win_rates(runs, list(summary))
    if wins:
        from regft_jax.eval.quality import format_win_rates

        wins_table = format_win_rates(wins)
        print(f"\nwin rates (row over column; both orders; mean over runs):\n{wins_table}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table + "\n")
        if wins:
            with open(os.path.join(args.out, "win_rates.md"), "w") as f:
                f.write(wins_table + "\n")
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump({"runs": list(args.runs), "methods": summary, "win_rates": wins}, f, indent=2)
        written = plots(summary, runs, args.runs, args.out)
        print("plots: " + (", ".join(written) if written else "none (pip install matplotlib, the eval extra)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
