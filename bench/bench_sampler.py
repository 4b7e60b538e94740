"""Sampler throughput: regft_jax's jitted KV-cache sampler vs HF transformers `generate` (PyTorch).

Same model (a random HF Llama of the tiny base model's shape, converted once), same prompt batch,
same number of new tokens, measured in one run; prints a table and, with --write, appends it to
bench/RESULTS.md with the command that produced it.

    python bench/bench_sampler.py [--batch 8,32,128] [--new 64] [--repeats 3] [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import report  # noqa: E402


def _hf_model(vocab, width, layers, heads, mlp):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=heads, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).float().eval()


def _best_time(fn, repeats):
    fn()  # warm-up (compilation for JAX)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="8,32,128", help="comma-separated batch sizes")
    ap.add_argument("--prompt_len", type=int, default=24)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = ap.parse_args(argv)

    import jax
    import torch

    from regft_jax import models, sampling

    hf = _hf_model(args.vocab, args.width, args.layers, 4, 4 * args.width)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        cfg, params = models.load_hf(d)
    n = args.new
    rows = []
    for batch in [int(x) for x in args.batch.split(",")]:
        rng = np.random.default_rng(0)
        lengths = rng.integers(args.prompt_len // 2, args.prompt_len + 1, batch)
        prompts = [rng.integers(1, args.vocab, k).tolist() for k in lengths]
        # HF takes the same left-padded batch with its attention mask.
        tokens, mask = sampling.pad_prompts(prompts, max(lengths), batch)
        hf_inputs = {"input_ids": torch.tensor(tokens, dtype=torch.long),
                     "attention_mask": torch.tensor(mask, dtype=torch.long)}
        for mode, kw_ours, kw_hf in [
            ("greedy", dict(temperature=0.0), dict(do_sample=False)),
            ("T=1, top-p 0.9", dict(temperature=1.0, top_p=0.9),
             dict(do_sample=True, temperature=1.0, top_p=0.9, top_k=0)),
        ]:
            def ours():
                return sampling.generate(cfg, params, prompts, max_new_tokens=n, batch_size=batch, **kw_ours)

            def theirs():
                with torch.no_grad():
                    return hf.generate(**hf_inputs, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                       pad_token_id=0, **kw_hf)

            t_ours, t_hf = _best_time(ours, args.repeats), _best_time(theirs, args.repeats)
            if mode == "greedy":  # same tokens, or the comparison is meaningless
                same = np.array_equal(np.asarray(ours()), theirs()[:, tokens.shape[1]:].numpy())
                mode += " (tokens identical)" if same else " (TOKENS DIFFER)"
            total = batch * n
            rows.append((batch, mode, total / t_ours, total / t_hf, t_hf / t_ours))

    header = (f"model: Llama {args.layers} layers, width {args.width}, vocab {args.vocab} "
              f"({cfg.num_params() / 1e6:.1f}M params), float32; prompts {args.prompt_len // 2}-{args.prompt_len} "
              f"tokens (left-padded), {n} new tokens; "
              f"{jax.device_count()} {jax.devices()[0].platform} device(s), torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores")
    lines = ["| batch | mode | regft_jax tokens/s | HF generate tokens/s | speed-up |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {bs} | {m} | {a:,.0f} | {b:,.0f} | {r:.1f}x |" for bs, m, a, b, r in rows]
    table = "\n".join(lines)
    report("Sampler vs HF generate", "bench_sampler.py", argv, header, table, args.write)


if __name__ == "__main__":
    main()
