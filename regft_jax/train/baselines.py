"""Baselines trained from the same entry point as the method (DESIGN.md section 3).

    params, history = sft_baseline(config, mesh, corpus, cfg, base_params, workdir=workdir)

`sft`: the LM loss on the method's corpus mixture, with the method's LLM optimizer settings, for
the same number of LLM steps (`method.iterations × method.llm_steps`): the fair comparison for
ours at equal cost in LLM updates.

`filtering`: the same SFT on the corpus without the training examples the training oracle scores
above `config.filtering.threshold` (every domain; an example the oracle fails to score is kept).

    trained = run_filtering(config, mesh, corpus, cfg, base_params, oracle, workdir=workdir)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import numpy as np
import ml_collections

from regft_jax import multihost
from regft_jax.checkpoint import RunCheckpointer
from regft_jax.data.batching import MixtureBatcher
from regft_jax.data.pipeline import Corpus
from regft_jax.errors import UserInputError
from regft_jax.precision import check_update_precision
from regft_jax.train.base_model import train_lm
from regft_jax.train.schedules import MetricsWriter, run_fingerprint
from regft_jax.train.throughput import Throughput

@dataclasses.dataclass
class Trained:
    """What a method hands to the evaluation: the LLM parameters to evaluate, optionally a sampler
    `Guidance` (nado_decoding: `models.aux.AuxGuidance`) under which generations AND every
    likelihood are computed (q = p · R), the per-step metrics and extra results.json entries."""

    params: Any
    history: list = dataclasses.field(default_factory=list)
    guidance: Any = None
    guidance_params: Any = None
    info: dict = dataclasses.field(default_factory=dict)


# The `config.method` keys the SFT baseline depends on (its checkpoints are resumed across changes
# of the others, e.g. lambda_toxic).
SFT_KEYS = ("learning_rate", "weight_decay", "warmup_steps", "iterations", "llm_steps", "batch_size", "proportions",
            "accum_steps")


def sft_baseline(config, mesh, corpus: Corpus, cfg, base_params, *, workdir: Optional[str] = None,
                 desc: str = "sft", fingerprint_extra: Optional[dict] = None):
    """SFT of `base_params` on the method's mixture; returns (params, history). With a `workdir` and
    `method.checkpoint_every` > 0 it checkpoints under <workdir>/checkpoints/<desc>/ and continues
    from the latest checkpoint there (a finished run is not rerun); `method.resume=False` deletes
    them and starts over. Metrics go to <workdir>/metrics_<desc>.jsonl and tb/<desc>; SIGTERM/SIGINT
    checkpoint at the next step boundary and raise `preemption.Preempted`. fingerprint_extra: what else
    the run depends on (a checkpoint of another value is not resumed)."""
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
                               fingerprint=run_fingerprint(config, desc + json.dumps(fingerprint_extra or {},
                                                                                     sort_keys=True), SFT_KEYS))
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


def flagged_examples(corpus: Corpus, oracle, threshold: float) -> dict[str, np.ndarray]:
    """domain -> bool [n]: the training examples whose oracle score P(violation) exceeds `threshold`
    (NaN, a failure to score, is not flagged). Each process scores its share of the texts."""
    out = {}
    for d in corpus.domains:
        texts = [e.text for e in corpus.train[d]]
        scores = multihost.split_over_processes(lambda t: np.asarray(oracle.score(list(t)), np.float32), texts)
        out[d] = np.nan_to_num(scores, nan=-np.inf) > threshold
    return out


def without_flagged(corpus: Corpus, flagged: dict[str, np.ndarray]) -> Corpus:
    """`corpus` with the flagged training examples dropped (validation and prompts unchanged)."""
    train = {d: [e for e, f in zip(examples, flagged[d]) if not f] for d, examples in corpus.train.items()}
    return dataclasses.replace(corpus, train=train, _packed={})


def run_filtering(config, mesh, corpus: Corpus, cfg, base_params, oracle, *, workdir: Optional[str] = None,
                  desc: str = "filtering") -> Trained:
    """The filtering baseline: `sft_baseline` on `without_flagged(corpus, ...)`; info: the fraction of
    each domain's training examples dropped ("dropped_<domain>")."""
    threshold = float(config.filtering.threshold)
    flagged = flagged_examples(corpus, oracle, threshold)
    info = {f"dropped_{d}": float(f.mean()) if f.size else 0.0 for d, f in flagged.items()}
    kept = without_flagged(corpus, flagged)
    for d in corpus.domains:
        if not kept.train[d] and config.method.proportions.get(d, 0) > 0:
            raise UserInputError(f"config.filtering.threshold={threshold:g}: the {oracle.name!r} oracle flags "
                                 f"every training example of domain {d!r}, which config.method.proportions trains on")
    print(f"{desc}: the {oracle.name} oracle flags (P > {threshold:g}) " + ", ".join(
        f"{int(flagged[d].sum())}/{flagged[d].size} {d} training examples" for d in corpus.domains) + "; dropped")
    params, history = sft_baseline(config, mesh, kept, cfg, base_params, workdir=workdir, desc=desc,
                                   fingerprint_extra={"threshold": threshold, "oracle": oracle.name,
                                                      "oracle_args": config.method.oracle_args.to_dict(),
                                                      "dropped": {d: int(f.sum()) for d, f in flagged.items()}})
    return Trained(params, history, info=info)
