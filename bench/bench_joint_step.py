"""The joint step vs a plain SFT step on the same model and corpus batch: time ratio next to the
FLOP ratio (XLA's cost analysis of the compiled steps), and the parts that make up the difference.

    python bench/bench_joint_step.py [--config configs/tiny.py] [--repeats 20] [--write]
    python bench/bench_joint_step.py --arch llama2-7b --flops_only [--write]

Each row times one jitted step (the median of `repeats` interleaved rounds, after compilation) on
the config's tiny architecture with random weights and random tokens (values do not change the cost).
`--flops_only` compiles the steps for abstract inputs and reports XLA's FLOP counts only, which
works for architectures far too large to run here (`--arch llama2-7b`: Llama-2-7B shapes, an
auxiliary model of 8 layers = 1/4 of the depth, corpus batch 8x1024, samples 8x(64+64)).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_config, machine, report  # noqa: E402


def _times(rows, repeats):
    """Median seconds per call of each (fn, args), timed in interleaved rounds (one call of every
    step per round), so drifts of a shared machine hit all rows alike."""
    import jax

    for fn, args in rows:
        jax.block_until_ready(fn(*args))  # compile
    samples = [[] for _ in rows]
    for _ in range(repeats):
        for (fn, args), out in zip(rows, samples):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out.append(time.perf_counter() - start)
    return [float(np.median(x)) for x in samples]


def _flops(fn, args):
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.py")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--arch", default="config", choices=["config", "llama2-7b"])
    ap.add_argument("--flops_only", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from regft_jax.models import ModelConfig, init_params
    from regft_jax.models.aux import aux_config, init_aux_params
    from regft_jax.train.aux import aux_step
    from regft_jax.train.method import Frozen, MethodSpec, joint_step, llm_step
    from regft_jax.train.steps import init_train_state, make_optimizer, sft_step

    config = load_config(args.config)
    m = config.method
    cfg = ModelConfig.from_dict({**config.model.arch.to_dict(), "scan_layers": config.model.scan_layers})
    # prompt: the sampler's padded prompt length on the offline corpus (95th percentile, 24 tokens)
    aux_layers, b, s, prompt, n = m.aux_layers, m.batch_size, config.data.seq_len, 24, m.sample_batch_size
    if args.arch == "llama2-7b":
        cfg = ModelConfig(family="llama", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                          num_kv_heads=32, head_dim=128, mlp_dim=11008, max_seq_len=4096,
                          param_dtype="bfloat16", dtype="bfloat16", scan_layers=True)
        aux_layers, b, s, prompt, n = 8, 8, 1024, 64, 8
        m.sample_tokens = 64
    acfg = aux_config(cfg, aux_layers)
    abstract = args.flops_only
    params = (jax.eval_shape if abstract else lambda f: f())(lambda: init_params(cfg, jax.random.key(0)))
    opt, aux_opt = make_optimizer(1e-3), make_optimizer(1e-3)
    rng = np.random.default_rng(0)
    n_general = round(b * m.proportions["general"])
    corpus = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (b, s + 1)), jnp.int32),
              "loss_mask": jnp.ones((b, s + 1), jnp.int32),
              "domain": jnp.asarray([0] * n_general + [1] * (b - n_general), jnp.int32)}  # 0 general, 1 toxic
    t = prompt + m.sample_tokens
    samples = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (n, t)), jnp.int32),
               "loss_mask": jnp.asarray(np.r_[[0] * prompt + [1] * m.sample_tokens][None].repeat(n, 0), jnp.int32),
               "attention_mask": jnp.ones((n, t), jnp.int32), "label": jnp.asarray(rng.random(n), jnp.float32)}
    spec = MethodSpec.from_config(m, (False, True), domain_rows=(n_general, b - n_general))
    frozen = Frozen(anchor=params)
    make = jax.eval_shape if abstract else lambda f: f()
    aux_params = make(lambda: init_aux_params(acfg, jax.random.key(1), mean_label=0.8))
    state, aux_state = make(lambda: init_train_state(params, opt)), make(lambda: init_train_state(aux_params, aux_opt))

    no_anchor = dataclasses.replace(spec, kinds=("closed_form", "closed_form"))

    def steps(cfg, acfg):
        """(name, jitted step, args) rows for one pair of model configs."""
        return [
            ("SFT step (LM loss)", jax.jit(functools.partial(sft_step, cfg, opt)), (state, corpus)),
            ("llm_step: LM + closed-form KL everywhere (no anchor)",
             jax.jit(functools.partial(llm_step, cfg, acfg, no_anchor, opt)),
             (state, aux_state.params, Frozen(), corpus)),
            ("llm_step: adaptive (+ anchor forward)", jax.jit(functools.partial(llm_step, cfg, acfg, spec, opt)),
             (state, aux_state.params, frozen, corpus)),
            ("aux update on samples (+ p_ref forward)",
             jax.jit(functools.partial(aux_step, acfg, cfg, aux_opt, spec.beta, sample_tokens=spec.sample_tokens)),
             (aux_state, params, samples)),
            ("joint_step (adaptive LLM + aux, one program)",
             jax.jit(functools.partial(joint_step, cfg, acfg, spec, opt, aux_opt)),
             (state, aux_state, frozen, corpus, samples)),
        ]

    # XLA's cost analysis counts a loop body once, so FLOPs come from the unrolled (no layer scan)
    # programs; times from the configured ones (the same arithmetic).
    unrolled = steps(cfg.replace(scan_layers=False), acfg.replace(scan_layers=False))
    rows = [(name, fn, fargs, flop_fn) for (name, fn, fargs), (_, flop_fn, _) in zip(steps(cfg, acfg), unrolled)]
    times = [float("nan")] * len(rows) if abstract else _times([(fn, a) for _, fn, a, _ in rows], args.repeats)
    flops = [_flops(flop_fn, fargs) for _, _, fargs, flop_fn in rows]
    lines = ["| step | ms | time / SFT | GFLOP | FLOPs / SFT |", "|---|---:|---:|---:|---:|"]
    for (name, *_), t_, f_ in zip(rows, times, flops):
        ms, ratio = ("-", "-") if abstract else (f"{1e3 * t_:.1f}", f"{t_ / times[0]:.2f}x")
        lines.append(f"| {name} | {ms} | {ratio} | {f_ / 1e9:.2f} | {f_ / flops[0]:.2f}x |")
    header = (f"model: {cfg.family} {cfg.num_layers} layers, width {cfg.hidden_size}, vocab {cfg.vocab_size}, "
              f"{cfg.param_dtype}{' (FLOPs of abstract shapes only)' if abstract else ''}; "
              f"aux {acfg.num_layers} layer(s); corpus batch {b}x{s} ({n_general} general rows), sample batch "
              f"{n}x{t}; " + machine())
    table = "\n".join(lines)
    title = "Joint step vs SFT step" + (", Llama-2-7B shapes, FLOPs only" if args.arch == "llama2-7b" else "")
    report(title, "bench_joint_step.py", argv, header, table, args.write)


if __name__ == "__main__":
    main()
