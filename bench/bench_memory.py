"""Memory plan: per-device memory of the 7B joint step, compiled ahead of time for simulated meshes.

    python bench/bench_memory.py [--hardware 8xh100,v4-32,v5e-64] [--remat none,full,dots_no_batch] \
        [--rows 1,2,4] [--samples N] [--anchor_dtype float32|bfloat16] [--write]

For each hardware preset of `configs/llama.py` (8xh100: 8 devices, v4-32: 16 chips, v5e-64: 64 chips),
builds the parallel schedule's joint step (`train.method.make_joint_step`: the LLM's and the auxiliary
model's updates in one program, both states donated) exactly as a run of `configs/llama.py:llama2-7b,<preset>`
does: Llama-2-7B, an 8-layer auxiliary model, AdamW, fp32 parameters and moments with bf16 compute, the
preset's mesh (FSDP over all devices), sequence length, domain mix (rows dealt over the data-parallel shards)
and method defaults (adaptive: the anchor's forward on the general rows; Ω_tox at the prefixes of the sampled
continuations), with the remat policy and the per-device corpus / sample rows of the sweep. Every input is
abstract (`jax.ShapeDtypeStruct`): `.lower(...).compile()` then `compiled.memory_analysis()` gives the
per-device sizes of the arguments, the outputs not aliased to donated arguments and the temporaries, and
nothing is allocated. The devices are fake CPU devices (`--xla_force_host_platform_device_count=64`, set
here before jax starts), so the numbers estimate what XLA's TPU/GPU compilers would allocate: those fuse,
lay out and schedule differently.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, report  # noqa: E402

HBM = (("TPU v4", 32 * 2**30, "32 GiB"), ("TPU v5e", 16 * 2**30, "16 GiB"), ("H100", 80e9, "80 GB"))
HEADROOM = 0.9  # a plan fits when it uses at most 90% of the device's memory


def _gib(x: float) -> str:
    return f"{x / 2**30:.1f}"


def build(hardware: str, remat: str, rows: int, samples: int, *, prompt: int = 32, anchor_dtype: str = "float32"):
    """The lowered-and-compiled joint step of `configs/llama.py:llama2-7b,<hardware>` with `remat`, `rows`
    corpus rows and `samples` sample rows per device; returns (compiled, config)."""
    import jax
    import jax.numpy as jnp

    from configs import llama
    from configs.presets import model_config
    from regft_jax import sharding as shd
    from regft_jax.data.mixture import batch_quotas
    from regft_jax.models.aux import aux_abstract_params, aux_config
    from regft_jax.models.core import abstract_params
    from regft_jax.train.aux import aux_state_shardings
    from regft_jax.train.loop import corpus_keys
    from regft_jax.train.method import Frozen, MethodSpec, frozen_shardings, make_joint_step
    from regft_jax.train.steps import init_train_state, make_optimizer, train_state_shardings

    from regft_jax.models import decoder

    decoder.CPU_F32_ACCUMULATE = False  # compile the accelerators' matmuls, not the CPU's bf16 path
    config = llama.get_config(f"llama2-7b,{hardware}")
    m, devices = config.method, config.hardware.devices
    mesh = shd.make_mesh(dict(config.mesh), jax.devices()[:devices])
    dp = shd.batch_shards(mesh)
    b, n = rows * dp, samples * dp
    m.batch_size, m.sample_batch_size = b, n
    config.model.remat = remat
    cfg = model_config(config)
    acfg = aux_config(cfg, m.aux_layers)
    quotas = batch_quotas(dict(m.proportions), b)
    domains = tuple(quotas)
    spec = MethodSpec.from_config(m, tuple(d == config.data.toxic_domain for d in domains),
                                  domain_rows=tuple(quotas[d] for d in domains), shards=dp)
    llm_opt = make_optimizer(m.learning_rate, weight_decay=m.weight_decay, grad_clip=1.0,
                             warmup_steps=m.warmup_steps, total_steps=m.iterations * m.llm_steps)
    aux_opt = make_optimizer(m.aux_learning_rate, grad_clip=1.0)

    params = abstract_params(cfg)
    llm = shd.abstract_on(jax.eval_shape(lambda p: init_train_state(p, llm_opt), params),
                          train_state_shardings(mesh, cfg, llm_opt))
    aux = shd.abstract_on(jax.eval_shape(lambda p: init_train_state(p, aux_opt), aux_abstract_params(acfg)),
                          aux_state_shardings(mesh, acfg, aux_opt))
    anchor = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(anchor_dtype)), params)
    frozen = Frozen(anchor=anchor if spec.needs_anchor else None)
    frozen = shd.abstract_on(frozen, frozen_shardings(mesh, cfg, frozen))
    i32, seq = jnp.int32, config.data.seq_len
    corpus = {k: jax.ShapeDtypeStruct((b, seq + 1), i32) for k in corpus_keys(config.data.document_attention)}
    corpus["domain"] = jax.ShapeDtypeStruct((b,), i32)
    t = prompt + m.sample_tokens
    sample = {k: jax.ShapeDtypeStruct((n, t), i32) for k in ("tokens", "loss_mask", "attention_mask")}
    sample["label"] = jax.ShapeDtypeStruct((n,), jnp.float32)
    if m.importance_weights:
        sample["proposal_logp"] = jax.ShapeDtypeStruct((n,), jnp.float32)
    step = make_joint_step(cfg, acfg, spec, llm_opt, aux_opt, mesh, frozen, corpus, sample)
    return step.lower(llm, aux, frozen, corpus, sample).compile(), config


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", default="8xh100,v4-32,v5e-64", help="presets of configs/presets.py (mesh sizes)")
    ap.add_argument("--remat", default="none,full,dots_no_batch")
    ap.add_argument("--rows", default="1,2,4", help="corpus rows per device (method.batch_size / devices)")
    ap.add_argument("--samples", default="", help="sample rows per device (default: the preset's)")
    ap.add_argument("--prompt_len", type=int, default=32, help="padded prompt tokens of a sample row")
    ap.add_argument("--anchor_dtype", default="float32", choices=("float32", "bfloat16"),
                    help="storage of the frozen anchor (the base model)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    if "jax" not in sys.modules:  # fake CPU devices: must be set before jax starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=64").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from configs import llama

    names = " | ".join(f"{name} {label}" for name, _, label in HBM)
    lines = [f"| preset (devices) | remat | rows/device (batch_size) | samples/device (sample_batch_size) | "
             f"arguments | outputs | temps | total | {names} |",
             "|---|---|---:|---:|---:|---:|---:|---:|" + ":---:|" * len(HBM)]
    for hardware in args.hardware.split(","):
        preset = llama.get_config(f"llama2-7b,{hardware}")
        devices = preset.hardware.devices
        if jax.device_count() < devices:
            sys.exit(f"bench_memory: {hardware} needs {devices} devices, jax has {jax.device_count()}")
        own = (preset.model.remat, preset.method.batch_size // devices, preset.method.sample_batch_size // devices)
        sample_rows = [int(x) for x in args.samples.split(",")] if args.samples else [own[2]]
        for remat in args.remat.split(","):
            for rows in (int(x) for x in args.rows.split(",")):
                for samples in sample_rows:
                    start = time.time()
                    compiled, config = build(hardware, remat, rows, samples, prompt=args.prompt_len,
                                             anchor_dtype=args.anchor_dtype)
                    mem = compiled.memory_analysis()
                    outputs = mem.output_size_in_bytes - mem.alias_size_in_bytes  # donated states alias
                    total = mem.argument_size_in_bytes + outputs + mem.temp_size_in_bytes
                    fits = " | ".join("fits" if total <= HEADROOM * cap else "no" for _, cap, _ in HBM)
                    mark = " **(preset)**" if (remat, rows, samples) == own else ""
                    line = (f"| {hardware} ({devices}){mark} | {remat} | {rows} ({config.method.batch_size}) | "
                            f"{samples} ({config.method.sample_batch_size}) | {_gib(mem.argument_size_in_bytes)} | "
                            f"{_gib(outputs)} | {_gib(mem.temp_size_in_bytes)} | **{_gib(total)}** | {fits} |")
                    print(line, f"({time.time() - start:.0f} s to compile)", flush=True)
                    lines.append(line)
    header = (f"`configs/llama.py:llama2-7b,<preset>` (Llama-2-7B, auxiliary model = first 8 layers, AdamW, fp32 "
              f"parameters and moments, bf16 compute, anchor {args.anchor_dtype}), joint step, seq "
              f"{preset.data.seq_len}, sample rows {args.prompt_len} prompt + {preset.method.sample_tokens} generated "
              f"tokens; FSDP over the preset's devices. GiB per device from `compiled.memory_analysis()` of the CPU "
              f"compilation on fake devices, an estimate of the TPU/GPU programs; 'fits': total <= "
              f"{HEADROOM:.0%} of the device's memory; " + machine())
    report("Memory plan: the 7B joint step per device", "bench_memory.py", argv, header, "\n".join(lines), args.write)


if __name__ == "__main__":
    main()
