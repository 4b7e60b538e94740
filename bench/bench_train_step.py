"""One SFT train step (forward + backward + AdamW update): regft_jax vs HF transformers (PyTorch).

Same model (a random HF Llama, converted with `regft_jax.models.load_hf`), same batch, same
optimizer (AdamW, betas (0.9, 0.95), eps 1e-8, weight decay, global-norm clipping at 1.0):

    ours:   regft_jax.train.steps.sft_step, jitted with jit_sharded on make_mesh() (all devices on "fsdp"),
            twice: layers applied by lax.scan (scan_layers=True, the default: one compiled layer, for deep
            models) and unrolled in the program (scan_layers=False)
    HF:     model(input_ids).logits -> cross-entropy -> backward -> clip_grad_norm_ -> AdamW.step -> zero_grad
            (eager PyTorch; fused AdamW on CUDA)

Times are per step after two warm-up steps (compilation), in interleaved rounds (one step of each
variant per round); the table shows the median (best in parentheses). The same run measures the machine's
matmul peak (a square matmul of --peak_n in the compute dtype, JAX and PyTorch, the faster of the
two) and reports each side's model FLOPs per second as a fraction of it; model FLOPs per step are
`regft_jax.train.throughput.train_flops_per_token` (6·N + 12·L·H·Q·T per token) x batch x seq.

    python bench/bench_train_step.py [--shapes 128x4,256x4] [--batch 8] [--seq 128] [--dtype float32]
                                     [--torch_device cpu|cuda] [--repeats 5] [--write]

--dtype bfloat16: bf16 matmuls, float32 parameters and optimizer on both sides (ours: cfg.dtype;
HF: torch.autocast). --tf32 allows TF32 for float32 matmuls on both sides (default: full float32).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (free_torch, heads_for, hf_llama, interleaved_times, jax_matmul_flops, machine,  # noqa: E402
                    parse_shapes, report, set_float32_matmuls, to_regft, torch_device, torch_info,
                    torch_matmul_flops, torch_sync)


def _ours(hf, args, mesh, tokens, scan_layers: bool):
    """(step fn returning the loss, ModelConfig) of regft_jax's jitted SFT step on `hf`'s weights, its
    layers applied by `lax.scan` or unrolled in the program (`ModelConfig.scan_layers`)."""
    import jax
    import jax.numpy as jnp

    from regft_jax import sharding as shd
    from regft_jax.train.steps import init_train_state, jit_sharded, make_optimizer, sft_step, train_state_shardings

    cfg, params = to_regft(hf, mesh=mesh, param_dtype="float32", dtype=args.dtype, scan_layers=scan_layers)
    opt = make_optimizer(args.lr, weight_decay=args.weight_decay, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0)
    state_sh = train_state_shardings(mesh, cfg, opt)
    state = jax.jit(lambda p: init_train_state(p, opt), out_shardings=state_sh)(params)
    batch = {"tokens": jnp.asarray(tokens, jnp.int32), "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
    batch = jax.device_put(batch, shd.tree_batch_shardings(mesh, batch))
    step = jit_sharded(lambda st, b: sft_step(cfg, opt, st, b), mesh, state_sh, batch)
    holder = [state]  # the state is donated: each call replaces it

    def run():
        holder[0], metrics = step(holder[0], batch)
        return float(metrics["loss"])  # waits for the step

    return run, cfg


def _theirs(hf, args, device, tokens):
    """A step fn returning the loss: HF eager forward/backward and torch AdamW on `hf` (in place)."""
    import torch
    import torch.nn.functional as F

    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=args.weight_decay, fused=device.startswith("cuda"))
    x = torch.tensor(tokens[:, :-1], dtype=torch.long, device=device)
    y = torch.tensor(tokens[:, 1:], dtype=torch.long, device=device)
    bf16 = args.dtype == "bfloat16"

    def run():
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            logits = hf(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch_sync(device)
        return loss.item()

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=None,
                    help='comma-separated WIDTHxLAYERS (e.g. "128x4,256x4"; a bare width uses --layers); '
                         "default: --width x --layers")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=0, help="attention heads (0: width // 64, at least 4)")
    ap.add_argument("--mlp", type=int, default=0, help="MLP width (0: 4 x width)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128, help="trained positions per row (rows hold seq + 1 tokens)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="matmul compute dtype")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matmuls (both sides)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight_decay", type=float, default=0.1)
    ap.add_argument("--torch_device", default=None, help="cpu | cuda (default: cuda if PyTorch sees one)")
    ap.add_argument("--peak_n", type=int, default=0, help="matmul size for the peak (0: 8192 on GPU, 2048 on CPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args(argv)

    import jax

    from regft_jax.sharding import make_mesh
    from regft_jax.train.throughput import device_peak_tflops, train_flops_per_token

    device = torch_device(args.torch_device)
    precision = set_float32_matmuls(args.tf32)
    on_gpu = jax.devices()[0].platform == "gpu"
    peak_n = args.peak_n or (8192 if on_gpu else 2048)
    peak_jax = jax_matmul_flops(peak_n, args.dtype)
    peak_torch = torch_matmul_flops(peak_n, args.dtype, device)
    peak = max(peak_jax, peak_torch)
    mesh = make_mesh()

    rows = []
    for width, layers in parse_shapes(args.shapes or str(args.width), args.layers):
        heads = heads_for(width, args.heads)
        hf = hf_llama(args.vocab, width, layers, heads, args.mlp or 4 * width, device=device,
                      max_positions=max(512, args.seq + 1))
        tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
        scanned, cfg = _ours(hf, args, mesh, tokens, scan_layers=True)
        unrolled, _ = _ours(hf, args, mesh, tokens, scan_layers=False)
        theirs = _theirs(hf, args, device, tokens)
        first = scanned(), unrolled(), theirs()  # the same weights and batch: the first losses agree
        times = interleaved_times([scanned, unrolled, theirs], args.repeats, warmup=1)
        flops = train_flops_per_token(cfg, args.seq) * args.batch * args.seq
        rows.append((f"{width}x{layers} ({cfg.num_params() / 1e6:.1f}M)", [float(np.median(t)) for t in times],
                     [float(t.min()) for t in times], flops, first))
        del scanned, unrolled, theirs, hf
        free_torch(device)

    nominal = device_peak_tflops(jax.devices()[0].device_kind) if on_gpu else None
    header = (f"SFT train step (forward, backward, AdamW with weight decay {args.weight_decay}, clip 1.0), "
              f"Llama, vocab {args.vocab}, batch {args.batch} x seq {args.seq}, {args.dtype} compute, float32 "
              f"parameters and optimizer; {precision}; median of {args.repeats} interleaved steps after warm-up "
              f"(best in parentheses); matmul peak ({peak_n}^3, {args.dtype}): JAX {peak_jax / 1e12:.2f}, "
              f"PyTorch {peak_torch / 1e12:.2f} TFLOP/s (% of peak: of the faster"
              + (f"; nominal dense bf16 peak {nominal:.0f} TFLOP/s" if nominal else "")
              + f"); model FLOPs 6·N + 12·L·H·Q·T per token; {machine()}; HF: {torch_info(device)}, eager")
    lines = ["| shape (params) | regft_jax ms, layers scanned | regft_jax ms, unrolled | HF ms "
             "| speed-up (HF/ours): scanned, unrolled | ours % of peak (faster) | HF % of peak "
             "| first loss ours (scanned / unrolled) / HF |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for shape, medians, bests, flops, losses in rows:
        ms = [f"{1e3 * m:.1f} ({1e3 * b:.1f})" for m, b in zip(medians, bests)]
        (m_scan, m_unrolled, m_hf) = medians
        lines.append(f"| {shape} | {' | '.join(ms)} | {m_hf / m_scan:.2f}x, {m_hf / m_unrolled:.2f}x "
                     f"| {100 * flops / min(m_scan, m_unrolled) / peak:.1f}% | {100 * flops / m_hf / peak:.1f}% "
                     f"| {' / '.join(f'{x:.4f}' for x in losses)} |")
    report("SFT train step vs HF PyTorch", "bench_train_step.py", argv, header, "\n".join(lines), args.write)


if __name__ == "__main__":
    main()
