"""The NADO-decoding baseline (DESIGN.md section 3): no LLM update; the auxiliary model R_φ trains on
samples of the base model, and the model evaluated is q = p_base · R_φ (its generations AND likelihoods).

    trained = run_nado_decoding(config, mesh, corpus, cfg, base_params, oracle, workdir=workdir)
    # trained.params is base_params; trained.guidance = AuxGuidance(aux_cfg), trained.guidance_params = φ

The budget is ours's parallel schedule's: iteration t = 1..`method.iterations` draws
`method.samples_per_iteration` continuations from p_base (the prompts and sampling keys of ours's
iteration t, `schedules.Sampler`; iteration 1's set is ours's own), labels them with the training oracle
in a background thread (a step waits only for the labels of its rows) and runs `method.llm_steps` aux
updates on batches of `method.sample_batch_size` of its rows, with p_ref = p_base: iterations × llm_steps
updates on iterations × samples_per_iteration samples. The aux model, its initialization, optimizer and
step are ours's (`aux_layers`, `aux_init`, `aux_learning_rate`, `beta`, `importance_weights`,
`label_text`, `accum_steps`; `schedules.aux_initializer`, `train.aux.make_aux_step`).

Checkpoints (`<workdir>/checkpoints/<desc>/`, every `method.checkpoint_every` aux steps, at the end and at
the step boundary after a SIGTERM/SIGINT) hold the aux train state, the current sample set and the step
(`schedules.RunState` without an LLM state); a run started again resumes from the latest one to the same
aux parameters (`method.resume=False`: start over). Metrics: <workdir>/metrics_<desc>.jsonl and tb/<desc>.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Optional

import jax
import numpy as np

from regft_jax.checkpoint import RunCheckpointer
from regft_jax.data.pipeline import Corpus
from regft_jax.models import ModelConfig
from regft_jax.models.aux import AuxGuidance, aux_config
from regft_jax.precision import check_update_precision
from regft_jax.sharding import abstract_on
from regft_jax.train.aux import aux_state_shardings, make_aux_step
from regft_jax.train.baselines import Trained
from regft_jax.train.loop import run_steps
from regft_jax.train.method import Frozen
from regft_jax.train.schedules import (MetricsWriter, PendingLabels, RunState, Sampler, Samples, aux_initializer,
                                       aux_optimizer, bootstrap_samples, check_method_config, global_sample_batch,
                                       restore_run, run_fingerprint, save_run)
from regft_jax.train.throughput import Throughput, peak_flops, train_flops_per_token

# The `config.method` keys nado_decoding depends on (its checkpoints are resumed across changes of the
# others, e.g. lambda_toxic or the LLM's learning_rate).
NADO_KEYS = ("iterations", "llm_steps", "samples_per_iteration", "sample_batch_size", "sample_tokens",
             "sample_temperature", "sample_top_p", "sample_domains", "aux_layers", "aux_init", "aux_learning_rate",
             "beta", "importance_weights", "label_text", "accum_steps", "oracle", "oracle_args", "sample_stop")


def aux_update_flops_per_token(aux_cfg: ModelConfig, llm_cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one aux update per sample token: the aux model's forward + backward
    (`train_flops_per_token`) + p_ref's forward (a third of its training count: 2N + 4·L·H·Q·T)."""
    return train_flops_per_token(aux_cfg, seq_len) + train_flops_per_token(llm_cfg, seq_len) / 3


class SampleSets:
    """`batches(step)` for `run_steps`: the sample batch of aux step `step` (0-based). Iteration
    t = step // llm_steps + 1 trains on its own set, drawn from p_base at its first step and labeled in
    a background thread; batch k of an iteration is rows `Samples.rows(k, sample_batch_size)`, as ours's."""

    def __init__(self, sampler: Sampler, base_params, run: RunState, mesh, pool):
        self.sampler, self.base_params, self.run, self.mesh, self.pool = sampler, base_params, run, mesh, pool
        self.method = sampler.method
        # the iteration of run.samples: 1 at a fresh start, that of the last step done after a restore
        self.iteration = (max(run.step, 1) - 1) // self.method.llm_steps + 1
        self.labels: Optional[PendingLabels] = None

    def _wait(self, fn, *args):
        t0 = time.time()
        fn(*args)
        self.run.label_wait += time.time() - t0

    def __call__(self, step: int) -> dict:
        m = self.method
        iteration = step // m.llm_steps + 1
        if iteration != self.iteration:  # a new iteration: its samples ~ p_base, labels in the background
            self.run.samples = Sampler.collect(self.sampler.generate(self.base_params, iteration, 0))
            self.labels = PendingLabels(self.run.samples, self.sampler.label_rows, self.pool, m.sample_batch_size)
            self.iteration = iteration
        rows = self.run.samples.rows(step - (iteration - 1) * m.llm_steps, m.sample_batch_size)
        if self.labels is not None:
            self._wait(self.labels.wait_rows, rows)
        return global_sample_batch(self.run.samples, rows, self.mesh, m.importance_weights)

    def complete(self) -> None:
        """Wait for every label of the current set (a checkpoint holds them all)."""
        if self.labels is not None:
            self._wait(self.labels.complete)
            self.labels = None


def run_nado_decoding(config, mesh, corpus: Corpus, cfg: ModelConfig, base_params, oracle, *,
                      workdir: Optional[str] = None, desc: str = "nado_decoding",
                      stop_after: Optional[int] = None) -> Optional[Trained]:
    """Train the auxiliary model on base-model samples (see the module docstring); returns
    Trained(base_params, history, AuxGuidance(aux_cfg), aux params, info: aux_updates, samples_drawn and the
    last step's aux_loss and mean_R). The base parameters are read, never updated.
    `stop_after`: return None after that many aux steps, without a checkpoint there (a simulated
    preemption, for tests)."""
    check_method_config(config, mesh)
    m = config.method
    check_update_precision(config, base_params, ("method.aux_learning_rate",))
    start_time = time.time()
    acfg, optimizer = aux_config(cfg, m.aux_layers), aux_optimizer(m)
    sampler = Sampler(cfg, corpus, oracle, m, mesh, config.seed, config.data.prompt_words)
    num_steps = m.iterations * m.llm_steps
    init_aux = aux_initializer(acfg, optimizer, mesh, m, config.seed, cfg)
    like = abstract_on(jax.eval_shape(init_aux, base_params, 0.5), aux_state_shardings(mesh, acfg, optimizer))
    length = sampler.prompt_len + m.sample_tokens
    example = global_sample_batch(Samples.empty(m.sample_batch_size, length, 0), np.arange(m.sample_batch_size),
                                  mesh, m.importance_weights)
    step = make_aux_step(acfg, cfg, optimizer, float(m.beta), mesh=mesh, batch_example=example,
                         accum_steps=m.accum_steps, sample_tokens=m.sample_tokens)
    meter = Throughput(desc, tokens_per_step=m.sample_batch_size * length,
                       flops_per_token=aux_update_flops_per_token(acfg, cfg, length),
                       peak_flops=peak_flops(config, mesh), every=config.log_every, total_steps=num_steps)
    ckpt = None
    if workdir and m.checkpoint_every > 0:
        ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints", desc),
                               fingerprint=run_fingerprint(config, desc, NADO_KEYS))
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="labeler")
    compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compiler")
    writer = None
    try:
        if ckpt is not None and not m.resume:
            ckpt.delete_all()
        resume_step = ckpt.latest_step() if ckpt is not None else None
        if resume_step is not None:
            ckpt.restore_meta(resume_step)  # a checkpoint of another config is refused before compiling
        compiled = compiler.submit(lambda: step.lower(like, base_params, example).compile())  # meanwhile: samples
        if resume_step is not None:
            run = restore_run(ckpt, resume_step, RunState(llm=None, aux=like, frozen=Frozen(), samples=None))
            print(f"{desc}: resumed from {ckpt.directory} at aux step {run.step}/{num_steps}", flush=True)
        else:
            samples, mean_label = bootstrap_samples(sampler, base_params)  # iteration 1's, R starts ≡ mean label
            run = RunState(llm=None, aux=init_aux(base_params, mean_label), frozen=Frozen(), samples=samples)
        sets = SampleSets(sampler, base_params, run, mesh, pool)
        writer = MetricsWriter(workdir, desc, run.history)
        done = list(run.history)
        end = num_steps if stop_after is None else min(stop_after, num_steps)

        def save(at: int, state, history: list) -> None:
            if at == stop_after and at < num_steps:
                return  # the simulated preemption: nothing saved there
            sets.complete()
            run.aux, run.step, run.history = state, at, done + history
            save_run(ckpt, run)

        aux_fn = compiled.result()
        state, history = run_steps(lambda state, batch: aux_fn(state, base_params, batch), run.aux, sets,
                                   steps=end, desc=desc, start=min(run.step, end),
                                   save=save if ckpt is not None else None, save_every=m.checkpoint_every,
                                   meter=meter, log=writer.write)
    finally:
        if writer is not None:
            writer.close()
        pool.shutdown(cancel_futures=True)
        compiler.shutdown()
        if ckpt is not None:
            ckpt.close()
    if end < num_steps:
        return None
    history = done + history
    info = {"aux_updates": num_steps, "samples_drawn": m.iterations * m.samples_per_iteration}
    if history:
        history[-1].update({"seconds": time.time() - start_time, "label_wait_s": run.label_wait})
        info.update({"aux_loss": history[-1]["aux_loss"], "mean_R": history[-1]["mean_R"]})
    return Trained(base_params, history, guidance=AuxGuidance(acfg), guidance_params=state.params, info=info)
