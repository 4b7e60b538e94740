"""Baselines trained from the same entry point as the method (DESIGN.md section 3).

    params, history = sft_baseline(config, mesh, corpus, cfg, base_params, workdir=workdir)

`sft`: the LM loss on the method's corpus mixture, with the method's LLM optimizer settings, for
the same number of LLM steps (`method.iterations × method.llm_steps`): the fair comparison for
ours at equal cost in LLM updates.
"""

from __future__ import annotations

import os
from typing import Optional

import ml_collections

from regft_jax.checkpoint import RunCheckpointer
from regft_jax.data.batching import MixtureBatcher
from regft_jax.data.pipeline import Corpus
from regft_jax.precision import check_update_precision
from regft_jax.train.base_model import train_lm
from regft_jax.train.schedules import MetricsWriter, run_fingerprint
from regft_jax.train.throughput import Throughput

# The `config.method` keys the SFT baseline depends on (its checkpoints are resumed across changes
# of the others, e.g. lambda_toxic).
SFT_KEYS = ("learning_rate", "weight_decay", "warmup_steps", "iterations", "llm_steps", "batch_size", "proportions",
            "accum_steps")


def sft_baseline(config, mesh, corpus: Corpus, cfg, base_params, *, workdir: Optional[str] = None,
                 desc: str = "sft"):
    """SFT of `base_params` on the method's mixture; returns (params, history). With a `workdir` and
    `method.checkpoint_every` > 0 it checkpoints under <workdir>/checkpoints/<desc>/ and continues
    from the latest checkpoint there (a finished run is not rerun); `method.resume=False` deletes
    them and starts over. Metrics go to <workdir>/metrics_<desc>.jsonl and tb/<desc>; SIGTERM/SIGINT
    checkpoint at the next step boundary and raise `preemption.Preempted`."""
    m = config.method
    check_update_precision(config, base_params, ("method.learning_rate",))
    batcher = MixtureBatcher(corpus.packed("train", config.data.seq_len), dict(m.proportions), m.batch_size,
                             seed=config.seed + 7)
    optim = ml_collections.ConfigDict({"learning_rate": m.learning_rate, "weight_decay": m.weight_decay,
                                       "grad_clip": 1.0, "warmup_steps": m.warmup_steps,
                                       "accum_steps": m.accum_steps})
    ckpt = None
    if workdir and m.checkpoint_every > 0:
        ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints", desc),
                               fingerprint=run_fingerprint(config, desc, SFT_KEYS))
        if not m.resume:
            ckpt.delete_all()
    steps = m.iterations * m.llm_steps
    meter = Throughput.from_config(config, desc, cfg, mesh, batch_size=m.batch_size, seq_len=config.data.seq_len,
                                   total_steps=steps)
    writer = MetricsWriter(workdir, desc)
    try:
        return train_lm(cfg, base_params, mesh, batcher, optim, steps=steps, desc=desc, ckpt=ckpt,
                        every=m.checkpoint_every, document_attention=config.data.document_attention, meter=meter,
                        log=writer.write)
    finally:
        writer.close()
        if ckpt is not None:
            ckpt.close()
