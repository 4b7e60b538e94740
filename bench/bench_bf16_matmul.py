"""bf16 matmuls on the CPU: how XLA runs each form a train step needs, and what `token_matmul` uses.

A train step's linear layer makes three products of [tokens, i] activations x and an [i, o] weight w:
the forward x·w, the input gradient g·wᵀ and the weight gradient xᵀ·g (contracting the tokens, the leading
axis of both). On the CPU, XLA hands a dot to YNNPACK (the CPU's bf16 units: AMX / AVX512-BF16) only in some
forms; the others run in float32 on its generic kernels. For each shape this times, in GFLOP/s (best of
--repeats):

    float32           the product in float32 (the reference rate)
    bf16 -> bf16      bf16 operands, bf16 result (plain `x @ w` in a bf16 model)
    bf16 -> f32       bf16 operands summed in float32 (`preferred_element_type=float32`): forward and g·wᵀ
                      with wᵀ named in the contracting dims (`lax.dot_general`)
    g @ w.T           the same input gradient written with an explicit transpose (XLA folds it into the dot
                      and converts both operands to float32)
    xᵀ·g folded       the weight gradient as autodiff writes it (contracting the leading axes)
    xᵀ·g copied       the weight gradient on a written-out xᵀ (`models.decoder._transposed_copy`), as
                      `models.decoder.matmul_f32_accumulate`'s backward computes it

Shapes are M x K x N for the forward / input-gradient forms and i x tokens x o for the weight gradient.

    python bench/bench_bf16_matmul.py [--shapes 1024x128x512,...] [--repeats 10] [--write]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import interleaved_times, machine, report  # noqa: E402

SHAPES = "1024x128x512,1024x512x128,1024x128x4096,1024x1024x4096,1024x4096x1024,2048x2048x2048"


def _forms(m: int, k: int, n: int):
    """{name: (jitted fn, args)} of the forms, on [m, k] x [k, n] products (weight gradient: [k, m]ᵀ x [k, n])."""
    import jax
    import jax.numpy as jnp

    from regft_jax.models.decoder import _dot_f32, _transposed_copy

    bf, f32 = jnp.bfloat16, jnp.float32
    key = iter(jax.random.split(jax.random.key(0), 4))
    x = jax.random.normal(next(key), (m, k), f32).astype(bf)
    w = jax.random.normal(next(key), (k, n), f32).astype(bf)
    w_t = jax.random.normal(next(key), (n, k), f32).astype(bf)  # wᵀ stored as [n, k], for g·wᵀ
    tokens = jax.random.normal(next(key), (k, m), f32).astype(bf)  # x of the weight gradient: [tokens=k, i=m]
    g = jax.random.normal(jax.random.key(1), (k, n), f32).astype(bf)
    lead = (((0,), (0,)), ((), ()))
    return {
        "float32": (lambda a, b: a @ b, (x.astype(f32), w.astype(f32))),
        "bf16 -> bf16": (lambda a, b: a @ b, (x, w)),
        "bf16 -> f32": (lambda a, b: _dot_f32(a, b, f32, b_contracting=1), (x, w_t)),
        "g @ w.T": (lambda a, b: jnp.matmul(a, b.T, preferred_element_type=f32), (x, w_t)),
        "xᵀ·g folded": (lambda a, b: jax.lax.dot_general(a, b, lead, preferred_element_type=f32), (tokens, g)),
        "xᵀ·g copied": (lambda a, b: _dot_f32(_transposed_copy(a), b, f32), (tokens, g)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated MxKxN")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args(argv)

    import jax

    names = None
    rows = []
    for shape in args.shapes.split(","):
        m, k, n = (int(v) for v in shape.split("x"))
        forms = _forms(m, k, n)
        names = list(forms)
        fns = []
        for fn, inputs in forms.values():
            jitted = jax.jit(fn)
            fns.append(lambda jitted=jitted, inputs=inputs: jitted(*inputs).block_until_ready())
        best = [float(t.min()) for t in interleaved_times(fns, args.repeats)]
        rows.append((shape, [2.0 * m * k * n / t / 1e9 for t in best]))

    header = (f"bf16 matmul forms on the CPU, GFLOP/s (best of {args.repeats} interleaved calls, jitted, inputs as "
              f"arguments); {machine()}")
    lines = ["| M x K x N | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {shape} | " + " | ".join(f"{v:,.0f}" for v in rates) + " |" for shape, rates in rows]
    report("bf16 matmuls on the CPU: XLA's forms", "bench_bf16_matmul.py", argv, header, "\n".join(lines), args.write)


if __name__ == "__main__":
    main()
