"""The joint step vs a plain SFT step on the same model and corpus batch: time ratio next to the
FLOP ratio (XLA's cost analysis of the compiled steps), and the parts that make up the difference.

    python bench/bench_joint_step.py [--config configs/tiny.py] [--repeats 20] [--write]

Each row times one jitted step (best of `repeats`, after compilation) on the default tiny
architecture with random weights and random tokens (values do not change the cost).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _time(fn, args, repeats):
    out = fn(*args)
    import jax

    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def _flops(fn, args):
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.py")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)

    import importlib.util

    import jax
    import jax.numpy as jnp

    from regft_jax import sharding
    from regft_jax.models import ModelConfig, init_params
    from regft_jax.models.aux import aux_config, init_aux_params
    from regft_jax.train.aux import aux_step
    from regft_jax.train.method import Frozen, MethodSpec, joint_step, llm_step
    from regft_jax.train.steps import init_train_state, make_optimizer, sft_step

    spec_ = importlib.util.spec_from_file_location("cfg", args.config)
    mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(mod)
    config = mod.get_config()
    m = config.method
    cfg = ModelConfig.from_dict({**config.model.arch.to_dict(), "scan_layers": config.model.scan_layers})
    acfg = aux_config(cfg, m.aux_layers)
    params = init_params(cfg, jax.random.key(0))
    opt, aux_opt = make_optimizer(1e-3), make_optimizer(1e-3)
    rng = np.random.default_rng(0)
    b, s = m.batch_size, config.data.seq_len
    n_general = round(b * m.proportions["general"])
    corpus = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, s + 1)), jnp.int32),
              "loss_mask": jnp.ones((b, s + 1), jnp.int32),
              "domain": jnp.asarray([0] * n_general + [1] * (b - n_general), jnp.int32)}  # 0 general, 1 toxic
    n, t = m.sample_batch_size, 16 + m.sample_tokens
    samples = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (n, t)), jnp.int32),
               "loss_mask": jnp.asarray(np.r_[[0] * 16 + [1] * m.sample_tokens][None].repeat(n, 0), jnp.int32),
               "attention_mask": jnp.ones((n, t), jnp.int32), "label": jnp.asarray(rng.random(n), jnp.float32)}
    spec = MethodSpec.from_config(m, (False, True), domain_rows=(n_general, b - n_general))
    frozen = Frozen(anchor=params)
    aux_params = init_aux_params(acfg, jax.random.key(1), mean_label=0.8, llm_params=params)
    state, aux_state = init_train_state(params, opt), init_train_state(aux_params, aux_opt)

    sft = jax.jit(functools.partial(sft_step, cfg, opt))
    llm = jax.jit(functools.partial(llm_step, cfg, acfg, spec, opt))
    aux = jax.jit(functools.partial(aux_step, acfg, cfg, aux_opt, spec.beta))
    joint = jax.jit(functools.partial(joint_step, cfg, acfg, spec, opt, aux_opt))
    no_anchor = MethodSpec(("closed_form", "closed_form"), spec.lambdas, spec.p_ref, spec.beta, spec.domain_rows)
    llm_na = jax.jit(functools.partial(llm_step, cfg, acfg, no_anchor, opt))
    rows = [
        ("SFT step (LM loss)", sft, (state, corpus)),
        ("llm_step: LM + closed-form KL everywhere (no anchor)", llm_na, (state, aux_state.params, Frozen(), corpus)),
        ("llm_step: adaptive (+ anchor forward)", llm, (state, aux_state.params, frozen, corpus)),
        ("aux update on samples (+ p_ref forward)", aux, (aux_state, params, samples)),
        ("joint_step (adaptive LLM + aux, one program)", joint, (state, aux_state, frozen, corpus, samples)),
    ]
    base_t, base_f = None, None
    lines = ["| step | ms | time / SFT | GFLOP | FLOPs / SFT |", "|---|---:|---:|---:|---:|"]
    for name, fn, fargs in rows:
        t_, f_ = _time(fn, fargs, args.repeats), _flops(fn, fargs)
        base_t, base_f = base_t or t_, base_f or f_
        lines.append(f"| {name} | {1e3 * t_:.1f} | {t_ / base_t:.2f}x | {f_ / 1e9:.2f} | {f_ / base_f:.2f}x |")
    header = (f"model: {cfg.family} {cfg.num_layers} layers, width {cfg.hidden_size}, vocab {cfg.vocab_size}; "
              f"aux {acfg.num_layers} layer(s); corpus batch {b}x{s} ({n_general} general rows), sample batch "
              f"{n}x{t}; {jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} cores")
    table = "\n".join(lines)
    print(header)
    print(table)
    if args.write:
        cmd = "python bench/bench_joint_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        with open(path, "a") as f:
            f.write(f"\n## Joint step vs SFT step ({time.strftime('%Y-%m-%d')})\n\n`{cmd.strip()}`\n\n"
                    f"{header}\n\n{table}\n")


if __name__ == "__main__":
    main()
