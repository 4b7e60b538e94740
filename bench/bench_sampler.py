"""Sampler throughput: regft_jax's jitted KV-cache sampler vs HF transformers `generate` (PyTorch).

Same model (a random float32 HF Llama of each width, converted once), same left-padded prompt batch,
same number of new tokens, in three modes: greedy (the tokens must be identical), T=1 (pure
sampling) and T=1 with top-p 0.9. Times are the best of `repeats` interleaved calls after a warm-up
call (compilation).

The same run measures the memory bandwidth (STREAM "scale": a jitted, donated x <- 2·x over --stream_mb of
float32, bytes read + written per second) and puts each row next to the bandwidth limit of decoding:

    limit tokens/s = batch x bandwidth / bytes read per decode step
    bytes per step = 4 x N (float32 weights in matrix multiplies: layers and LM head; the embedding is a lookup)
                     + batch x 2 x layers x kv_heads x head_dim x 4 x (prompt + new / 2)  (KV cache, mean length)

i.e. the rate if every step read the weights and the filled part of the KV cache once at the measured
bandwidth (prefill and sampling arithmetic not counted). Small models whose weights fit in the
caches (CPU L2/L3, a GPU's L2) can beat it. At large batches decoding is bound by arithmetic instead;
the same run measures the float32 matmul peak (a jitted square matmul of --peak_n) and the compute limit

    compute limit tokens/s = peak FLOP/s / (2 x N + 4 x layers x heads x head_dim x (prompt + new / 2))

and "% of limit" is of the lower of the two limits (the roofline).

    python bench/bench_sampler.py [--widths 128,256] [--batch 8,32,128] [--new 64] [--repeats 3]
                                  [--torch_device cpu|cuda] [--write]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (free_torch, heads_for, hf_llama, interleaved_times, jax_copy_bandwidth,  # noqa: E402
                    jax_matmul_flops, machine,
                    parse_shapes, report, set_float32_matmuls, to_regft, torch_info, torch_sync)

MODES = (  # (name, regft_jax generate kwargs, HF generate kwargs)
    ("greedy", dict(temperature=0.0), dict(do_sample=False)),
    ("T=1", dict(temperature=1.0), dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)),
    ("T=1, top-p 0.9", dict(temperature=1.0, top_p=0.9), dict(do_sample=True, temperature=1.0, top_p=0.9, top_k=0)),
)


def _bytes_per_step(cfg, batch: int, context: float) -> float:
    """Bytes a decode step reads at least: the float32 matmul weights and the KV cache of `context` slots."""
    from regft_jax.train.throughput import matmul_params

    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 * context
    return 4.0 * matmul_params(cfg) + batch * kv


def _flops_per_token(cfg, context: float) -> float:
    """FLOPs of one decode step per row: the matmul weights and attention over `context` slots."""
    from regft_jax.train.throughput import matmul_params

    return 2.0 * matmul_params(cfg) + 4.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * context


def _rows(args, width: int, layers: int, bandwidth: float, peak: float) -> list[tuple]:
    """Table rows (shape, batch, mode, ours tokens/s, HF tokens/s, bandwidth limit, compute limit) of one
    model shape."""
    import torch

    from regft_jax import sampling

    device, n = args.torch_device, args.new
    hf = hf_llama(args.vocab, width, layers, heads_for(width, args.heads), 4 * width, device=device).eval()
    cfg, params = to_regft(hf)
    shape = f"{width}x{layers} ({cfg.num_params() / 1e6:.1f}M)"
    rows = []
    for batch in [int(x) for x in args.batch.split(",")]:
        rng = np.random.default_rng(0)
        lengths = rng.integers(args.prompt_len // 2, args.prompt_len + 1, batch)
        prompts = [rng.integers(1, args.vocab, k).tolist() for k in lengths]
        # HF takes the same left-padded batch with its attention mask.
        tokens, mask = sampling.pad_prompts(prompts, max(lengths), batch)
        hf_inputs = {"input_ids": torch.tensor(tokens, dtype=torch.long, device=device),
                     "attention_mask": torch.tensor(mask, dtype=torch.long, device=device)}
        context = tokens.shape[1] + n / 2
        limit = batch * bandwidth / _bytes_per_step(cfg, batch, context)
        compute = peak / _flops_per_token(cfg, context)
        for mode, kw_ours, kw_hf in MODES:
            def ours():
                return sampling.generate(cfg, params, prompts, max_new_tokens=n, batch_size=batch, **kw_ours)

            def theirs():
                with torch.no_grad():
                    out = hf.generate(**hf_inputs, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                      pad_token_id=0, **kw_hf)
                torch_sync(device)
                return out

            t_ours, t_hf = (t.min() for t in interleaved_times([ours, theirs], args.repeats))
            if mode == "greedy":  # same tokens, or the comparison is meaningless
                same = (np.asarray(ours()) == theirs()[:, tokens.shape[1]:].cpu().numpy()).all(axis=1)
                mode += (" (tokens identical)" if same.all()
                         else f" (TOKENS DIFFER: {same.sum()}/{batch} rows identical)")
            rows.append((shape, batch, mode, batch * n / t_ours, batch * n / t_hf, limit, compute))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="8,32,128", help="comma-separated batch sizes")
    ap.add_argument("--widths", default="128",
                    help='comma-separated model widths, each optionally xLAYERS (e.g. "128,256,1024x8")')
    ap.add_argument("--layers", type=int, default=4, help="layers of a width given without xLAYERS")
    ap.add_argument("--heads", type=int, default=0, help="attention heads (0: width // 64, at least 4)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--prompt_len", type=int, default=24)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch_device", default="cpu", help="cpu | cuda (HF model and inputs on it)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matmuls (both sides)")
    ap.add_argument("--stream_mb", type=int, default=0,
                    help="array size of the bandwidth test (0: 1024 on GPU, 256 on CPU)")
    ap.add_argument("--peak_n", type=int, default=0, help="matmul size for the peak (0: 8192 on GPU, 2048 on CPU)")
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args(argv)

    import jax

    precision = set_float32_matmuls(args.tf32)
    stream_mb = args.stream_mb or (1024 if jax.devices()[0].platform == "gpu" else 256)
    bandwidth = jax_copy_bandwidth(stream_mb)
    peak_n = args.peak_n or (8192 if jax.devices()[0].platform == "gpu" else 2048)
    peak = jax_matmul_flops(peak_n, "float32")
    rows = []
    for width, layers in parse_shapes(args.widths, args.layers):
        rows += _rows(args, width, layers, bandwidth, peak)
        print(f"done: {rows[-1][0]} ({len(rows)} rows)", flush=True)
        free_torch(args.torch_device)

    header = (f"model: random Llama (shape: width x layers), vocab {args.vocab}, float32; prompts "
              f"{args.prompt_len // 2}-{args.prompt_len} tokens (left-padded), {args.new} new tokens; {precision}; "
              f"best of {args.repeats} interleaved calls after warm-up; memory bandwidth "
              f"{bandwidth / 1e9:.1f} GB/s (jitted x <- 2x, {stream_mb} MB float32); float32 matmul peak "
              f"{peak / 1e9:,.0f} GFLOP/s (jitted {peak_n}^3); bandwidth limit = batch x bandwidth / (float32 matmul "
              f"weights + KV cache at the mean context) per step; compute limit = peak / FLOPs per token; "
              f"% of limit: of the lower one (in bold); {machine()}; HF: {torch_info(args.torch_device)}")
    lines = ["| shape (params) | batch | mode | regft_jax tokens/s | HF generate tokens/s | speed-up "
             "| bandwidth limit tokens/s | compute limit tokens/s | ours % of limit | HF % of limit |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for shape, bs, m, a, b, bw, fl in rows:
        lim = min(bw, fl)
        bold = lambda x: f"**{x:,.0f}**" if x == lim else f"{x:,.0f}"
        lines.append(f"| {shape} | {bs} | {m} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x | {bold(bw)} | {bold(fl)} "
                     f"| {100 * a / lim:.0f}% | {100 * b / lim:.0f}% |")
    report("Sampler vs HF generate", "bench_sampler.py", argv, header, "\n".join(lines), args.write)


if __name__ == "__main__":
    main()
