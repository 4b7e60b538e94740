"""End-to-end wall time of the method's schedules vs plain SFT for the same number of LLM steps,
sampling, labeling and compilation included, with the quality each reaches.

    python bench/bench_schedules.py [--config configs/tiny.py] [--repeats 2] [--write]

Runs on the config's corpus and (cached) base model: SFT on the method's mixture and the parallel
schedule with the config's method settings, alternately `repeats` times, then the sequential
schedule, each timed from its setup to its final parameters (compilation included); then
evaluates all three (toxicity on held-out toxic-domain
prompts, held-out general-domain perplexity). The "steady" column excludes the first iteration
(compilation, the bootstrap sample) by timing from the end of iteration 1 to the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_config, machine, report  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.py")
    ap.add_argument("--repeats", type=int, default=2, help="runs of SFT and of the parallel schedule")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from regft_jax import sharding
    from regft_jax.data.pipeline import build_corpus
    from regft_jax.eval import eval_oracles, evaluate_model, judge_label, training_oracle
    from regft_jax.train.base_model import base_model
    from regft_jax.train.baselines import sft_baseline
    from regft_jax.train.schedules import run_method

    config = load_config(args.config)
    config.method.checkpoint_every = 0  # time the method, not the disk
    m = config.method
    mesh = sharding.make_mesh(dict(config.mesh))
    corpus = build_corpus(config.data, seed=config.seed)
    cfg, base, _ = base_model(config, mesh, corpus)
    oracle = training_oracle(config, corpus)  # config.method.oracle labels the samples
    judges = eval_oracles(config, corpus, oracle)  # config.eval.oracles: one toxicity column each
    steps = m.iterations * m.llm_steps

    def sft():
        params, history = sft_baseline(config, mesh, corpus, cfg, base)
        tok_s = history[-1].get("tokens_per_s")  # excludes the compiling first step
        return params, steps * m.batch_size * config.data.seq_len / tok_s if tok_s else float("nan"), 0.0

    def ours(schedule):
        def run():
            config.method.schedule = schedule
            params, _, _, history = run_method(config, mesh, corpus, cfg, base, oracle, desc=schedule)
            steady = sum(m.batch_size * config.data.seq_len / h["tokens_per_s"] for h in history[m.llm_steps:])
            return params, steady * steps / max(len(history) - m.llm_steps, 1), history[-1]["label_wait_s"]
        return run

    # SFT and the parallel schedule alternate `repeats` times (the median counts: this machine's speed
    # drifts); every run starts without compiled programs.
    order = [("SFT", sft), ("ours, parallel", ours("parallel"))] * args.repeats + [("ours, sequential",
                                                                                     ours("sequential"))]
    times = {}
    runs = {}
    for name, fn in order:
        jax.clear_caches()
        start = time.time()
        params, steady, wait = fn()
        times.setdefault(name, []).append((time.time() - start, steady))
        runs[name] = (params, *np.median(times[name], axis=0), wait)

    sft_total, sft_steady = runs["SFT"][1], runs["SFT"][2]
    toxic = config.data.toxic_domain
    lines = ["| run | wall s | / SFT | steady-state s (per 240 steps) | / SFT | waited for oracle s | "
             + "".join(f"toxicity {judge_label(config, o)} | " for o in judges) + "ppl general |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * len(judges) + "---:|"]
    for name, (params, total, steady, wait) in runs.items():
        metrics, _ = evaluate_model(name, cfg, params, corpus, judges, config.eval, seq_len=config.data.seq_len,
                                    mesh=mesh, seed=config.seed,
                                    document_attention=config.data.document_attention)
        lines.append(f"| {name} | {total:.1f} | {total / sft_total:.2f}x | {steady:.1f} | {steady / sft_steady:.2f}x "
                     f"| {wait:.1f} | " + "".join(f"{100 * metrics[f'toxicity_{o}_{toxic}']:.1f}% | " for o in judges)
                     + f"{metrics['ppl_general']:.1f} |")
    lines[0] = lines[0].replace("per 240 steps", f"per {steps} steps")
    header = (f"median of {args.repeats} interleaved runs of SFT and of the parallel schedule; {steps} LLM steps ({m.iterations} iterations x {m.llm_steps}), batch {m.batch_size}x"
              f"{config.data.seq_len}; method: {'adaptive' if m.adaptive else 'one regularizer'}, p_ref={m.p_ref}, "
              f"aux {m.aux_layers} layer(s), {m.samples_per_iteration} samples x {m.sample_tokens} tokens per "
              f"iteration, Ω_tox at {m.reg_prefixes} prefixes, sequential: {m.aux_steps} aux steps per iteration; "
              f"toxicity on {toxic} prompts; " + machine())
    lines.append("\nEvery run's wall time (s): " + "; ".join(
        f"{name} " + ", ".join(f"{t:.1f}" for t, _ in ts) for name, ts in times.items()))
    table = "\n".join(lines)
    report("Schedules end to end vs SFT", "bench_schedules.py", argv, header, table, args.write)


if __name__ == "__main__":
    main()
