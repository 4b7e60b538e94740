"""End-to-end wall time of the method's schedules vs plain SFT for the same number of LLM steps,
sampling, labeling and compilation included, with the quality each reaches.

    python bench/bench_schedules.py [--config configs/tiny.py] [--write]

Runs on the config's corpus and (cached) base model: SFT on the method's mixture, then the
parallel and the sequential schedule with the config's method settings, each timed from its
first step to its final parameters; then evaluates all three (toxicity on held-out toxic-domain
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
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)

    import ml_collections

    from regft_jax import sharding
    from regft_jax.data.batching import MixtureBatcher
    from regft_jax.data.pipeline import build_corpus
    from regft_jax.eval import evaluate_model
    from regft_jax.oracles import make_oracle
    from regft_jax.train.base_model import base_model, train_lm
    from regft_jax.train.schedules import run_method

    config = load_config(args.config)
    config.method.checkpoint_every = 0  # time the method, not the disk
    m = config.method
    mesh = sharding.make_mesh(dict(config.mesh))
    corpus = build_corpus(config.data, seed=config.seed)
    cfg, base, _ = base_model(config, mesh, corpus)
    oracle = make_oracle(config.eval.oracle, **config.eval.oracle_args.to_dict())
    steps = m.iterations * m.llm_steps

    runs = {}
    start = time.time()
    batcher = MixtureBatcher(corpus.packed("train", config.data.seq_len), dict(m.proportions), m.batch_size,
                             seed=config.seed + 7)
    params, history = train_lm(cfg, base, mesh, batcher, ml_collections.ConfigDict(
        {"learning_rate": m.learning_rate, "weight_decay": m.weight_decay, "grad_clip": 1.0,
         "warmup_steps": m.warmup_steps, "accum_steps": m.accum_steps}), steps=steps, desc="sft")
    total = time.time() - start
    tok_s = history[-1].get("tokens_per_s")  # excludes the compiling first step
    runs["SFT"] = (params, total, steps * m.batch_size * config.data.seq_len / tok_s if tok_s else float("nan"), 0.0)
    for schedule in ("parallel", "sequential"):
        config.method.schedule = schedule
        start = time.time()
        params, _, _, history = run_method(config, mesh, corpus, cfg, base, oracle, desc=schedule)
        total = time.time() - start
        steady = sum(m.batch_size * config.data.seq_len / h["tokens_per_s"] for h in history[m.llm_steps:])
        runs[f"ours, {schedule}"] = (params, total, steady * steps / max(len(history) - m.llm_steps, 1),
                                     history[-1]["label_wait_s"])

    sft_total, sft_steady = runs["SFT"][1], runs["SFT"][2]
    lines = ["| run | wall s | / SFT | steady-state s (per 240 steps) | / SFT | waited for oracle s | "
             f"toxicity ({config.data.toxic_domain} prompts) | ppl general |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, (params, total, steady, wait) in runs.items():
        metrics, _ = evaluate_model(name, cfg, params, corpus, oracle, config.eval, seq_len=config.data.seq_len,
                                    mesh=mesh, seed=config.seed)
        lines.append(f"| {name} | {total:.1f} | {total / sft_total:.2f}x | {steady:.1f} | {steady / sft_steady:.2f}x "
                     f"| {wait:.1f} | {100 * metrics[f'toxicity_{config.data.toxic_domain}']:.1f}% "
                     f"| {metrics['ppl_general']:.1f} |")
    lines[0] = lines[0].replace("per 240 steps", f"per {steps} steps")
    header = (f"{steps} LLM steps ({m.iterations} iterations x {m.llm_steps}), batch {m.batch_size}x"
              f"{config.data.seq_len}; method: {'adaptive' if m.adaptive else 'one regularizer'}, p_ref={m.p_ref}, "
              f"aux {m.aux_layers} layer(s), {m.samples_per_iteration} samples x {m.sample_tokens} tokens per "
              f"iteration, sequential: {m.aux_steps} aux steps per iteration; " + machine())
    table = "\n".join(lines)
    report("Schedules end to end vs SFT", "bench_schedules.py", argv, header, table, args.write)


if __name__ == "__main__":
    main()
