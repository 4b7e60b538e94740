"""Decode-shaped matmuls alone: XLA on this machine vs PyTorch, on the same few-row products a sampler's step makes.

A decode step multiplies a handful of rows (the batch) by every weight matrix. This isolates that from the
rest of the sampler: `--steps` iterations of `--layers` SwiGLU MLPs, x <- tanh(x + (silu(x G) * (x U)) D), with
x [rows, width], G and U [width, 4·width], D [4·width, width] (float32), as

    JAX:      one jitted `lax.fori_loop` over the steps (the layers unrolled in its body), each layer's weights
              passed as arguments, as the sampler passes its parameters (not compile-time constants), on the CPU;
    PyTorch:  an eager Python loop on the CPU (its per-op dispatch included: PyTorch's time is an upper bound
              on its matmuls' time).

The table gives microseconds per matmul (3 per layer per step); the ratio is PyTorch's time over ours. At
these sizes (3-13 MB of weights) the weights stay in the CPU's caches between steps.

    python bench/bench_decode_matmul.py [--widths 128,256] [--rows 8,32,128] [--write]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_times, machine, report, set_float32_matmuls, torch_info  # noqa: E402


def _weights(width: int, layers: int):
    rng = np.random.default_rng(0)
    scale = 0.3 * width ** -0.5  # a contracting map: over hundreds of layers the two sides stay within float error
    return [rng.normal(0.0, scale, shape).astype(np.float32)
            for shape in ((layers, width, 4 * width), (layers, width, 4 * width), (layers, 4 * width, width))]


def _ours(weights, x0, steps: int):
    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    # one array per layer and matrix, as the sampler unstacks its layers once per call: a slice of a stacked
    # weight inside the loop would be a copy at every step
    layers = [tuple(jax.device_put(w[i], cpu) for w in weights) for i in range(weights[0].shape[0])]
    x = jax.device_put(x0, cpu)

    @jax.jit
    def run(x, layers):
        def step(_, x):
            for g, u, d in layers:
                x = jnp.tanh(x + (jax.nn.silu(x @ g) * (x @ u)) @ d)
            return x

        return jax.lax.fori_loop(0, steps, step, x)

    return lambda: np.asarray(run(x, layers))


def _theirs(weights, x0, steps: int):
    import torch
    import torch.nn.functional as F

    g, u, d = (torch.from_numpy(w) for w in weights)
    x0 = torch.from_numpy(x0)

    def run():
        x = x0
        with torch.no_grad():
            for _ in range(steps):
                for layer in range(g.shape[0]):
                    x = torch.tanh(x + (F.silu(x @ g[layer]) * (x @ u[layer])) @ d[layer])
        return x.numpy()

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="128,256")
    ap.add_argument("--rows", default="8,32,128", help="comma-separated row counts (the sampler's batch)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args(argv)

    precision = set_float32_matmuls(False)
    lines = ["| width | rows | ours µs / matmul | PyTorch µs / matmul | speed-up (PyTorch/ours) | max abs difference |",
             "|---:|---:|---:|---:|---:|---:|"]
    for width in [int(w) for w in args.widths.split(",")]:
        weights = _weights(width, args.layers)
        for rows in [int(r) for r in args.rows.split(",")]:
            x0 = np.random.default_rng(1).normal(size=(rows, width)).astype(np.float32)
            ours, theirs = _ours(weights, x0, args.steps), _theirs(weights, x0, args.steps)
            diff = float(np.abs(ours() - theirs()).max())
            t_ours, t_theirs = (t.min() for t in interleaved_times([ours, theirs], args.repeats))
            matmuls = 3 * args.layers * args.steps
            lines.append(f"| {width} | {rows} | {1e6 * t_ours / matmuls:.1f} | {1e6 * t_theirs / matmuls:.1f} "
                         f"| {t_theirs / t_ours:.2f}x | {diff:.1e} |")
    header = (f"Decode-shaped matmuls: {args.steps} steps x {args.layers} SwiGLU MLP layers (3 matmuls each, float32, "
              f"{precision}), best of {args.repeats} interleaved runs; JAX on the CPU: {machine()}; PyTorch: "
              f"{torch_info('cpu')}, eager")
    report("Decode-shaped matmuls: XLA vs PyTorch", "bench_decode_matmul.py", argv, header, "\n".join(lines),
           args.write)


if __name__ == "__main__":
    main()
