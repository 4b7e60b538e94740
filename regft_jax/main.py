"""Entry point: `python -m regft_jax.main --config=configs/tiny.py [--config.key=value ...]`.

Stages (config.stage):
  detox   corpus → base model → the SFT baseline (LM loss on the same mixture) and ours (the
          method, config.method) from the same base → evaluation of all three. Writes
          results.json ({"base"|"sft"|"ours": {toxicity, ppl_general, ...}}), generations.jsonl
          and metrics_*.jsonl.
  base    corpus (the embedded offline one by default) → base model (pretrained here and cached
          when model.source="random", else loaded) → held-out perplexity per domain and oracle
          toxicity of continuations of held-out prompts per domain. Writes results.json
          ({"base": {...}}) and generations.jsonl to the work directory.
  smoke   build the model on the mesh and run `train.steps` SFT steps on synthetic tokens;
          prints the mesh, parameter count, losses and throughput.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: config.workdir).")


def _validate(config) -> None:
    from regft_jax.config_utils import require

    require(config, "stage", config.stage in STAGES, f"one of {sorted(STAGES)}")
    require(config, "train.steps", config.train.steps >= 1, "an integer >= 1")
    require(config, "train.batch_size", config.train.batch_size >= 1, "an integer >= 1")
    require(config, "train.seq_len", config.train.seq_len >= 2, "an integer >= 2")
    if config.stage == "detox":  # fail before minutes of pretraining, not after
        from regft_jax.train.schedules import check_method_config

        check_method_config(config)


def run_smoke(config, workdir: str) -> dict:
    import jax
    import numpy as np
    from tqdm import tqdm

    from regft_jax import sharding
    from regft_jax.models.factory import model_from_config
    from regft_jax.train import init_train_state, jit_sharded, make_optimizer, sft_step, train_state_shardings

    mesh = sharding.make_mesh(dict(config.mesh))
    cfg, params = model_from_config(config.model, mesh, seed=config.seed)
    print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s); "
          f"model {cfg.family}: {cfg.num_layers} layers, width {cfg.hidden_size}, "
          f"{cfg.num_params() / 1e6:.2f}M parameters")
    optimizer = make_optimizer(config.optim.learning_rate, weight_decay=config.optim.weight_decay,
                               grad_clip=config.optim.grad_clip, warmup_steps=config.optim.warmup_steps,
                               total_steps=config.train.steps)
    state_sh = train_state_shardings(mesh, cfg, optimizer)
    state = jax.jit(functools.partial(init_train_state, optimizer=optimizer), out_shardings=state_sh)(params)
    rng = np.random.default_rng(config.seed)
    b, s = config.train.batch_size, config.train.seq_len
    # A learnable synthetic corpus: repeated random token patterns.
    patterns = rng.integers(0, cfg.vocab_size, (4, s))

    def batch():
        return {"tokens": patterns[rng.integers(0, 4, b)].astype(np.int32), "loss_mask": np.ones((b, s), np.int32)}

    step = jit_sharded(functools.partial(sft_step, cfg, optimizer), mesh, state_sh, batch())
    history, start = [], None
    for i in tqdm(range(config.train.steps), desc="sft steps", disable=not sys.stderr.isatty()):
        state, metrics = step(state, batch())
        if i == 0:
            jax.block_until_ready(metrics)
            start = time.time()
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    jax.block_until_ready(state)
    elapsed = max(time.time() - start, 1e-9)
    tok_s = (config.train.steps - 1) * b * (s - 1) / elapsed if config.train.steps > 1 else float("nan")
    print(f"{'step':>6} {'loss':>10} {'grad_norm':>10}")
    for i in sorted({0, len(history) // 2, len(history) - 1}):
        print(f"{i + 1:>6} {history[i]['loss']:>10.4f} {history[i]['grad_norm']:>10.4f}")
    print(f"throughput: {tok_s:,.0f} tokens/s (after compilation)")
    return {"first_loss": history[0]["loss"], "last_loss": history[-1]["loss"], "tokens_per_s": tok_s}


def _write_jsonl(path: str, records) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _prepare(config):
    """The mesh, the corpus, the base model and the oracle every stage after `smoke` starts from."""
    import jax

    from regft_jax import sharding
    from regft_jax.data.pipeline import build_corpus
    from regft_jax.oracles import make_oracle
    from regft_jax.train.base_model import base_model

    mesh = sharding.make_mesh(dict(config.mesh))
    print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    corpus = build_corpus(config.data, seed=config.seed)
    print(f"corpus: {corpus.summary()}; tokenizer vocab {corpus.tokenizer.vocab_size}")
    cfg, params, _ = base_model(config, mesh, corpus)
    oracle = make_oracle(config.eval.oracle, **config.eval.oracle_args.to_dict())
    return mesh, corpus, cfg, params, oracle


def run_base(config, workdir: str) -> dict:
    import jax

    from regft_jax.eval import evaluate_model, results_table

    mesh, corpus, cfg, params, oracle = _prepare(config)
    start = time.time()
    metrics, records = evaluate_model("base", cfg, params, corpus, oracle, config.eval, seq_len=config.data.seq_len,
                                      mesh=mesh, seed=config.seed)
    results = {"base": metrics}
    print(f"evaluation ({time.time() - start:.0f}s; toxicity = fraction of continuations of held-out prompts "
          f"flagged by the {config.eval.oracle} oracle):")
    print(results_table(results))
    if jax.process_index() == 0:
        _write_jsonl(os.path.join(workdir, "generations.jsonl"), records)
    return results


def run_detox(config, workdir: str) -> dict:
    import jax

    from regft_jax.eval import evaluate_model, results_table
    from regft_jax.train.baselines import sft_baseline
    from regft_jax.train.loop import summarize
    from regft_jax.train.schedules import run_method

    mesh, corpus, cfg, base, oracle = _prepare(config)
    m = config.method
    steps = m.iterations * m.llm_steps
    models, timings = {"base": base}, {}

    start = time.time()
    models["sft"], _ = sft_baseline(config, mesh, corpus, cfg, base, workdir=workdir)
    timings["sft"] = time.time() - start
    print(f"sft: {steps} steps in {timings['sft']:.0f}s")

    start = time.time()
    models["ours"], _, _, history = run_method(config, mesh, corpus, cfg, base, oracle, workdir=workdir)
    timings["ours"] = time.time() - start
    print(f"ours ({m.schedule}, {'adaptive' if m.adaptive else 'one regularizer'}, p_ref={m.p_ref}): "
          f"{steps} LLM steps in {timings['ours']:.0f}s (sampling and labeling included)")
    print(summarize(history, ["llm/lm_loss", "llm/reg_loss", "aux/aux_loss", "aux/mean_R"]))

    results, records = {}, []
    for name, params in models.items():
        metrics, recs = evaluate_model(name, cfg, params, corpus, oracle, config.eval, seq_len=config.data.seq_len,
                                       mesh=mesh, seed=config.seed)
        results[name] = {"toxicity": metrics.get(f"toxicity_{config.data.toxic_domain}"), **metrics,
                         **({"train_seconds": timings[name]} if name in timings else {})}
        records += recs
    print(f"evaluation (toxicity = fraction of continuations of held-out prompts flagged by the "
          f"{config.eval.oracle} oracle; ppl = held-out perplexity):")
    print(results_table(results))
    if jax.process_index() == 0:
        _write_jsonl(os.path.join(workdir, "generations.jsonl"), records)
    return results


STAGES = {"base": run_base, "detox": run_detox, "smoke": run_smoke}


def _quiet_checkpointing_logs() -> None:
    """Orbax logs every save at INFO through absl; keep its warnings, drop the chatter."""
    import logging as pylogging

    pylogging.getLogger("absl").addFilter(
        lambda r: r.levelno >= pylogging.WARNING or "/orbax/" not in r.pathname.replace("\\", "/"))


def main(argv) -> None:
    del argv
    _quiet_checkpointing_logs()
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/<name>.py is required")
    if config.get("distributed", False):
        import jax

        jax.distributed.initialize()
    _validate(config)
    workdir = os.path.abspath(_WORKDIR.value or config.workdir)
    os.makedirs(workdir, exist_ok=True)
    logging.info("workdir: %s", workdir)
    results = STAGES[config.stage](config, workdir)
    import jax

    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    print(f"workdir: {workdir}")


def entry() -> None:
    from regft_jax.errors import UserInputError

    try:
        app.run(main)
    except UserInputError as e:  # a bad config value: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    entry()
