"""The method's drivers: sample → label → train, in the `sequential` or `parallel` schedule.

sequential, iteration t:  ref ← θ;  samples ~ ref, labeled by the oracle (waited for);
                          N_aux aux steps on them;  N_llm LLM steps with q = p_ref · R_φ.
parallel, iteration t:    samples ~ θ_{t-1} are generated (device) and labeled in a background
                          thread while `joint_step`s run on the samples of the iteration before;
                          each joint step trains the LLM against the auxiliary model as it was and
                          the auxiliary model on those samples. The oracle is never waited for
                          inside an iteration; labels switch at iteration boundaries (one
                          iteration of lag, reported as `sample_lag`), which keeps runs
                          deterministic and resumable.

Samples are continuations of prompts drawn from the training split (never the evaluation
prompts); the oracle scores the continuation (`label_text="continuation"`) or prompt +
continuation (`"full"`).

Checkpoints (`<workdir>/checkpoints/<name>/`, every `method.checkpoint_every` LLM steps and at the
end) hold both train states, the snapshot, the sample buffers and the schedule position; a run
started again in the same work directory resumes from the latest one (`method.resume`) and
reaches the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from regft_jax import sampling
from regft_jax.checkpoint import RunCheckpointer
from regft_jax import sharding as shd
from regft_jax.data.batching import MixtureBatcher
from regft_jax.data.pipeline import Corpus
from regft_jax.errors import UserInputError
from regft_jax.models.aux import aux_config, init_aux_params
from regft_jax.train.loop import NonFiniteLossError, global_batches
from regft_jax.train.aux import aux_state_shardings, make_aux_step
from regft_jax.train.method import Frozen, MethodSpec, frozen_shardings, make_joint_step, make_llm_step
from regft_jax.train.steps import init_train_state, make_optimizer, train_state_shardings
from regft_jax.train.tensorboard import SummaryWriter

SCHEDULES = ("parallel", "sequential")


@dataclasses.dataclass
class Samples:
    """One labeled sample set: arrays for the aux step plus the texts (for logs)."""

    tokens: np.ndarray  # [n, P + N] left-padded prompt + continuation
    loss_mask: np.ndarray  # [n, P + N] 1 on generated tokens
    attention_mask: np.ndarray  # [n, P + N] 1 on real tokens
    label: np.ndarray  # [n] C(x) = 1 − P(violation); NaN = oracle failure (masked)
    iteration: int  # the LLM iteration that produced them

    def arrays(self) -> dict:
        return {"tokens": self.tokens, "loss_mask": self.loss_mask, "attention_mask": self.attention_mask,
                "label": self.label}

    @classmethod
    def empty(cls, n: int, length: int, iteration: int) -> "Samples":
        """A buffer of the right shapes (the restore target of a checkpointed one)."""
        z = np.zeros((n, length), np.int32)
        return cls(tokens=z, loss_mask=z.copy(), attention_mask=z.copy(), label=np.zeros(n, np.float32),
                   iteration=iteration)

    def batch(self, k: int, size: int) -> dict:
        """The k-th batch of `size` rows, cycling over the set."""
        rows = (np.arange(size) + k * size) % self.label.shape[0]
        return {"tokens": self.tokens[rows], "loss_mask": self.loss_mask[rows],
                "attention_mask": self.attention_mask[rows], "label": self.label[rows]}


class Sampler:
    """Prompts from the training split → continuations from an LLM (on device) → oracle labels."""

    def __init__(self, cfg, corpus: Corpus, oracle, method, mesh, seed: int, prompt_words: int):
        self.cfg, self.corpus, self.oracle, self.method, self.mesh = cfg, corpus, oracle, method, mesh
        tok = corpus.tokenizer
        texts = [" ".join(e.text.split()[:prompt_words]) for d in method.sample_domains for e in corpus.train[d]]
        ids = tok.encode_batch(texts, add_bos=tok.bos_id is not None)
        # One padded prompt length for every sample batch (one compilation): the 99th percentile,
        # so a few pathological prompts (a 6-"word" URL can be 200 tokens) do not pad all the rest;
        # longer prompts keep their last tokens.
        self.prompt_len = sampling.bucket(int(np.percentile([len(i) for i in ids], 99)), 8)
        self.prompts = [i[-self.prompt_len:] for i in ids]
        self.fn = sampling.make_sampler(cfg, mesh, max_new_tokens=method.sample_tokens, use_top_p=method.sample_top_p < 1,
                                        eos_id=tok.eos_id, pad_id=tok.pad_id or 0)
        self.seed = seed

    def generate(self, params, iteration: int):
        """Dispatch generation (asynchronous: returns device arrays at once). The prompts and the
        sampling key are functions of (seed, iteration) only, so resumed runs draw the same."""
        chosen = np.random.default_rng((self.seed, iteration)).choice(len(self.prompts), self.method.samples_per_iteration, replace=False)
        tokens, mask = sampling.pad_prompts([self.prompts[i] for i in chosen], self.prompt_len,
                                            self.method.samples_per_iteration, self.corpus.tokenizer.pad_id or 0)
        out = self.fn(params, None, tokens, mask, jax.random.key(self.seed * 100_003 + iteration),
                      jnp.float32(self.method.sample_temperature), jnp.float32(self.method.sample_top_p))
        return tokens, mask, out, iteration

    def label(self, generated) -> Samples:
        """Wait for the tokens, decode, score with the oracle (host work; runs in a thread)."""
        tokens, mask, out, iteration = generated
        out = jax.device_get(out)
        cont = [row[:m.sum()] for row, m in zip(out.tokens, out.mask)]
        tok = self.corpus.tokenizer
        texts = tok.decode_batch(cont)
        if self.method.label_text == "full":
            texts = [p + t for p, t in zip(tok.decode_batch([r[m > 0] for r, m in zip(tokens, mask)]), texts)]
        label = 1.0 - np.asarray(self.oracle.score(texts), np.float32)  # C(x): NaN stays NaN
        return Samples(tokens=np.concatenate([tokens, out.tokens], 1).astype(np.int32),
                       loss_mask=np.concatenate([np.zeros_like(mask), out.mask], 1).astype(np.int32),
                       attention_mask=np.concatenate([mask, out.mask], 1).astype(np.int32),
                       label=label, iteration=iteration)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


class MetricsWriter:
    """Per-step metrics to <workdir>/metrics_<name>.jsonl and TensorBoard (<workdir>/tb/<name>),
    process 0 only. `history`: metrics of steps already done (a resumed run) written first."""

    def __init__(self, workdir: Optional[str], name: str, history=()):
        self.f = self.tb = None
        if workdir and jax.process_index() == 0:
            self.f = open(os.path.join(workdir, f"metrics_{name}.jsonl"), "w")
            self.tb = SummaryWriter(os.path.join(workdir, "tb", name))
            for i, h in enumerate(history):
                self.f.write(json.dumps({"step": i + 1, **h}) + "\n")

    def write(self, step: int, metrics: dict) -> None:
        if self.f:
            self.f.write(json.dumps({"step": step, **{k: round(float(v), 6) for k, v in metrics.items()}}) + "\n")
            self.tb.scalars(metrics, step)

    def close(self):
        if self.f:
            self.f.close()
            self.tb.close()


RESUME_NEUTRAL = ("resume", "checkpoint_every")  # method keys that may change between a run and its resume


def run_fingerprint(config, name: str) -> str:
    """What a checkpoint must agree on to be resumed: everything that determines the run's results
    (not the mesh: a run may resume on another topology; orbax reshards)."""
    parts = {"name": name, "seed": config.seed, "model": config.model.to_dict(), "data": config.data.to_dict(),
             "base": config.base.to_dict(),
             "method": {k: v for k, v in config.method.to_dict().items() if k not in RESUME_NEUTRAL}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_method(config, mesh, corpus: Corpus, cfg, base_params, oracle, *, workdir: Optional[str] = None,
               desc: str = "ours", stop_after: Optional[int] = None):
    """Fine-tune `base_params` with the method; returns (llm params, aux params, aux config, history).

    With a `workdir`, checkpoints go to <workdir>/checkpoints/<desc>/ and an existing one is resumed.
    `stop_after`: return None after that many LLM steps, without a final checkpoint (a simulated
    preemption, for tests)."""
    method = config.method
    if method.schedule not in SCHEDULES:
        raise UserInputError(f"config.method.schedule={method.schedule!r}: expected one of {SCHEDULES}")
    domains = corpus.domains
    batcher = MixtureBatcher(corpus.packed("train", config.data.seq_len), dict(method.proportions),
                             method.batch_size, seed=config.seed + 7, domain_ids={d: i for i, d in enumerate(domains)},
                             shuffle_slots=False)  # contiguous domain rows: extra forwards only where needed
    spec = MethodSpec.from_config(method, tuple(d == config.data.toxic_domain for d in domains),
                                  domain_rows=tuple(batcher.quotas.get(d, 0) for d in domains))
    num_steps, per_iteration = method.iterations * method.llm_steps, method.llm_steps
    llm_opt = make_optimizer(method.learning_rate, weight_decay=method.weight_decay, grad_clip=1.0,
                             warmup_steps=method.warmup_steps, total_steps=num_steps)
    aux_opt = make_optimizer(method.aux_learning_rate, grad_clip=1.0)
    acfg = aux_config(cfg, method.aux_layers)
    sampler = Sampler(cfg, corpus, oracle, method, mesh, config.seed, config.data.prompt_words)
    ckpt = None
    if workdir and method.checkpoint_every > 0:
        ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints", desc), fingerprint=run_fingerprint(config, desc))
    resume_step = ckpt.latest_step() if ckpt is not None and method.resume else None
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="labeler")
    start = time.time()

    samples, mean_label = None, 0.5
    if resume_step is None:
        samples = sampler.label(sampler.generate(base_params, 0))  # bootstrap from the base model
        mean_label = float(np.nanmean(samples.label)) if np.isfinite(samples.label).any() else 0.5
    aux_params = init_aux_params(acfg, jax.random.key(config.seed + 1), mean_label=mean_label,
                                 llm_params=base_params if method.aux_init == "llm" else None)
    aux_state = jax.jit(functools.partial(init_train_state, optimizer=aux_opt),
                        out_shardings=aux_state_shardings(mesh, acfg, aux_opt))(aux_params)
    llm_state = jax.jit(functools.partial(init_train_state, optimizer=llm_opt),
                        out_shardings=train_state_shardings(mesh, cfg, llm_opt))(base_params)
    frozen = Frozen(anchor=base_params if spec.needs_anchor else None,
                    snapshot=_copy(base_params) if spec.p_ref == "snapshot" else None)
    step, history, next_samples, label_wait = 0, [], None, 0.0
    if resume_step is not None:
        meta = ckpt.restore_meta(resume_step)
        buffers = {k: Samples.empty(**v) for k, v in meta["buffers"].items()}
        target = {"llm": llm_state, "aux": aux_state, **{k: b.arrays() for k, b in buffers.items()}}
        if frozen.snapshot is not None:
            target["snapshot"] = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                              frozen.snapshot, frozen_shardings(mesh, cfg, frozen).snapshot)
        state = ckpt.restore_state(resume_step, target)
        llm_state, aux_state = state["llm"], state["aux"]
        frozen = dataclasses.replace(frozen, snapshot=state.get("snapshot"))
        samples, next_samples = (None if k not in buffers else Samples(**state[k], iteration=buffers[k].iteration)
                                 for k in ("current", "next"))
        step, history, label_wait = meta["step"], meta["history"], meta["label_wait_s"]
        print(f"{desc}: resumed from {ckpt.directory} at LLM step {step}/{num_steps}", flush=True)

    def save():
        if ckpt is None:
            return
        bufs = {"current": samples, "next": next_samples}
        state = {"llm": llm_state, "aux": aux_state, **{k: b.arrays() for k, b in bufs.items() if b is not None}}
        if frozen.snapshot is not None:
            state["snapshot"] = frozen.snapshot
        ckpt.save(step, state, {"step": step, "history": history, "label_wait_s": label_wait, "buffers": {
            k: {"n": b.label.shape[0], "length": b.tokens.shape[1], "iteration": b.iteration}
            for k, b in bufs.items() if b is not None}})

    batches = global_batches(batcher, mesh, keys=("tokens", "loss_mask", "domain"))
    sample_batch = lambda s, k: s.batch(k, method.sample_batch_size)
    writer = MetricsWriter(workdir, desc, history)
    bar = tqdm(total=num_steps, initial=step, desc=f"{desc} ({method.schedule})", disable=not sys.stderr.isatty(),
               leave=False)
    tokens_per_step = method.batch_size * config.data.seq_len
    last = [time.time()]

    def record(metrics_list, extra):
        """Fetch the metrics of the steps since the last call (waits for them) and log them."""
        metrics_list = jax.device_get(metrics_list)
        now = time.time()
        extra = {**extra, "tokens_per_s": len(metrics_list) * tokens_per_step / max(now - last[0], 1e-9)}
        last[0] = now
        for m in metrics_list:
            h = {k: float(np.asarray(v)) for k, v in m.items()}
            h.update(extra)
            history.append(h)
            writer.write(len(history), h)
        loss = history[-1].get("llm/loss")
        if loss is not None and not np.isfinite(loss):
            raise NonFiniteLossError(f"{desc}: non-finite LLM loss at step {len(history)}")

    every = method.checkpoint_every if method.checkpoint_every > 0 else num_steps

    def checkpoint_due(pending, extra) -> bool:
        """After each LLM step: log, and checkpoint every `checkpoint_every` steps and at the end."""
        if step % every == 0 or step == num_steps:
            if pending:
                record(pending, extra)
                pending.clear()
            return True
        return False

    def stopped():
        return stop_after is not None and step >= stop_after

    if method.schedule == "parallel":
        joint = make_joint_step(cfg, acfg, spec, llm_opt, aux_opt, mesh, frozen, batches(0), sample_batch(samples, 0))
        for it in range(step // per_iteration + 1, method.iterations + 1):
            first = step - (it - 1) * per_iteration
            if first == 0 and spec.p_ref == "snapshot":  # ref ← θ_{t-1}: what R is trained against this iteration
                frozen = dataclasses.replace(frozen, snapshot=_copy(llm_state.params))
            future = None  # the next iteration's samples: ~ θ_{t-1}, labeled in the background
            if next_samples is not None:
                future, next_samples = pool.submit(lambda s=next_samples: s), None
            elif it < method.iterations:
                future = pool.submit(sampler.label, sampler.generate(llm_state.params, it))
            pending, extra = [], {"iteration": it, "sample_lag": it - samples.iteration}
            for _ in range(first, per_iteration):
                llm_state, aux_state, m = joint(llm_state, aux_state, frozen, batches(step), sample_batch(samples, step))
                pending.append(m)
                step += 1
                bar.update(1)
                if stopped():
                    break
                if step % per_iteration and checkpoint_due(pending, extra) and ckpt is not None:
                    if future is not None:  # the checkpoint holds the in-flight samples too
                        t0 = time.time()
                        next_samples = future.result()
                        label_wait += time.time() - t0
                    save()
                    next_samples = None
            if stopped():
                break
            if pending:
                record(pending, extra)
            if future is not None:  # labels of this iteration's generation: used from the next on
                t0 = time.time()
                samples = future.result()
                label_wait += time.time() - t0
            if checkpoint_due([], extra):
                save()
    else:
        llm_fn = make_llm_step(cfg, acfg, spec, llm_opt, aux_opt, mesh, frozen, batches(0))
        aux_fn = make_aux_step(acfg, cfg, aux_opt, spec.beta, mesh=mesh, batch_example=sample_batch(samples, 0),
                               accum_steps=spec.accum_steps)
        for it in range(step // per_iteration + 1, method.iterations + 1):
            first = step - (it - 1) * per_iteration
            extra = {"iteration": it, "sample_lag": 0}
            if first == 0:  # a new iteration: samples from θ_{t-1}, then the auxiliary model's steps
                if it > 1:
                    t0 = time.time()
                    samples = sampler.label(sampler.generate(llm_state.params, it))
                    label_wait += time.time() - t0
                ref = llm_state.params if spec.p_ref == "current" else _copy(llm_state.params)
                if spec.p_ref == "snapshot":
                    frozen = dataclasses.replace(frozen, snapshot=ref)
                aux_metrics = []
                for k in range(method.aux_steps):
                    aux_state, m = aux_fn(aux_state, ref, sample_batch(samples, k))
                    aux_metrics.append(m)
                if aux_metrics:
                    extra.update({f"aux/{k}": float(v) for k, v in jax.device_get(aux_metrics[-1]).items()})
            pending = []
            for _ in range(first, per_iteration):
                llm_state, m = llm_fn(llm_state, aux_state.params, frozen, batches(step))
                pending.append({f"llm/{k}": v for k, v in m.items()})
                step += 1
                bar.update(1)
                if stopped():
                    break
                if checkpoint_due(pending, extra):
                    save()
            if stopped():
                break
            if pending:
                record(pending, extra)
    jax.block_until_ready(llm_state)
    bar.close()
    writer.close()
    pool.shutdown()
    if ckpt is not None:
        ckpt.close()
    if stopped() and step < num_steps:
        return None
    if history:
        history[-1].update({"seconds": time.time() - start, "label_wait_s": label_wait})
    return llm_state.params, aux_state.params, acfg, history
