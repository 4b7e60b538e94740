"""The method's drivers: sample → label → train, in the `sequential` or `parallel` schedule.

Iteration t = 1..T runs LLM steps (t−1)·L+1 .. t·L (L = `llm_steps`); θ_{t−1} is the LLM after
step (t−1)·L (θ_0 = the base model). In both schedules the auxiliary model of iteration t trains on
samples of θ_{t−1}, and every LLM step is regularized with q = p_ref · R_φ, φ = the auxiliary
model as it is at that step:

sequential, iteration t:  samples ~ θ_{t−1}, labeled (waited for); `aux_steps` aux steps on them;
                          then L LLM steps, all with that φ (trained on samples of θ_0..θ_{t−1}).
parallel, iteration t:    samples ~ θ_{t−1} (drawn at the iteration's start); L `joint_step`s,
                          each updating the LLM against φ as it was before the step and φ on the
                          samples of θ_{t−1}. The oracle's labels are computed in a background
                          thread chunk by chunk, so a step waits only for the rows it trains on.
                          The LLM step k uses the auxiliary model after k − 1 aux updates: at an
                          iteration's first step, the auxiliary model of iteration t − 1.

Metrics name the provenance of every update: `aux/samples_from_step` (the LLM step whose
parameters drew the samples of that aux update; 0 = the base model), `sample_lag_steps` (the
LLM steps between those parameters and the step's), `llm/aux_version` (the auxiliary model's update
count behind the LLM step's R).

Samples are continuations of prompts drawn from the training split (never the evaluation
prompts); the training oracle (`method.oracle`) scores the continuation (`label_text=
"continuation"`) or prompt and continuation decoded together (`"full"`). With
`method.importance_weights`, each sample is weighted by p_ref(y)/proposal(y) in the aux loss
(self-normalized, so consistent rather than unbiased): this corrects tempered, guided or stale
proposals; a nucleus (top-p < 1) proposal never draws the tokens it cuts, which no weight restores. With `method.reg_prefixes`
"samples" or "both", Ω_tox also applies at the prefixes of the sampled continuations.

Checkpoints (`<workdir>/checkpoints/<name>/`, every `method.checkpoint_every` LLM steps, at the end
and at the step boundary after a SIGTERM/SIGINT, `regft_jax.preemption`) hold both train states,
the snapshot, the labeled sample set and the schedule position; a run started again in the same
work directory resumes from the latest one and reaches the same parameters as an uninterrupted run
(`method.resume=False`: the checkpoints are deleted, the run starts over).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from regft_jax import multihost, preemption, sampling
from regft_jax.precision import check_update_precision
from regft_jax.checkpoint import RunCheckpointer
from regft_jax.data.batching import MixtureBatcher
from regft_jax.data.mixture import SPLIT_VERSION, prompt_of
from regft_jax.data.pipeline import Corpus, check_domains
from regft_jax.config_utils import require
from regft_jax.models.aux import aux_config, init_aux_params
from regft_jax.models.lora import merge_lora
from regft_jax.oracles.base import OracleError
from regft_jax import sharding as shd
from regft_jax.sharding import abstract_on, batch_sharding, tree_batch_shardings
from regft_jax.train.aux import aux_state_shardings, make_aux_step
from regft_jax.train.loop import NonFiniteLossError, corpus_keys, global_batches
from regft_jax.train.method import P_REF, Frozen, MethodSpec, make_joint_step, make_llm_step
from regft_jax.train.steps import TrainState, init_train_state, make_optimizer, train_state_shardings
from regft_jax.train.tensorboard import SummaryWriter
from regft_jax.train.throughput import Throughput

SCHEDULES = ("parallel", "sequential")
REG_PREFIXES = ("corpus", "samples", "both")  # where Ω_tox applies (DESIGN §1)


def check_method_config(config, mesh=None) -> None:
    """The `config.method` values a run depends on; a bad one stops it with one line naming the key.
    With the `mesh`: batch sizes split evenly over its data-parallel shards (and microbatches)."""
    m = config.method
    require(config, "method.schedule", m.schedule in SCHEDULES, f"one of {SCHEDULES}")
    require(config, "method.p_ref", m.p_ref in P_REF, f"one of {P_REF}")
    require(config, "method.aux_init", m.aux_init in ("llm", "fresh"), "'llm' or 'fresh'")
    require(config, "method.label_text", m.label_text in ("continuation", "full"), "'continuation' or 'full'")
    require(config, "method.reg_prefixes", m.reg_prefixes in REG_PREFIXES, f"one of {REG_PREFIXES}")
    require(config, "method.sample_stop", isinstance(m.get("sample_stop", ""), str), "a string ('' = none)")
    if m.reg_prefixes != "corpus":
        require(config, "method.lambda_samples", m.lambda_samples > 0,
                f"> 0 with reg_prefixes={m.reg_prefixes!r} (Ω_tox at the sampled prefixes)")
    for key in ("iterations", "llm_steps", "batch_size", "samples_per_iteration", "sample_batch_size",
                "sample_tokens", "aux_layers", "accum_steps"):
        require(config, f"method.{key}", m[key] >= 1, "an integer >= 1")
    if m.schedule == "sequential":
        require(config, "method.aux_steps", m.aux_steps >= 1,
                "an integer >= 1 with the sequential schedule (0 would leave R constant: no regularization)")
    require(config, "method.sample_temperature", m.sample_temperature > 0, "> 0 (samples must come from a distribution)")
    require(config, "method.sample_top_p", 0 < m.sample_top_p <= 1, "in (0, 1]")
    if mesh is not None:  # (domain rows need not: `MethodSpec.rows` windows cover uneven shares)
        dp, a = shd.batch_shards(mesh), m.accum_steps
        for key, accum in (("batch_size", True), ("sample_batch_size", True), ("samples_per_iteration", False)):
            require(config, f"method.{key}", m[key] % (dp * a if accum else dp) == 0,
                    f"a multiple of the data-parallel size {dp}" + (f" × config.method.accum_steps={a}" if accum
                    and a > 1 else "") + f" (config.mesh={dict(mesh.shape)}: data × fsdp)")


@dataclasses.dataclass
class Samples:
    """One sample set: the auxiliary model's training rows (and the LLM's sampled prefixes)."""

    tokens: np.ndarray  # [n, P + N] left-padded prompt + continuation
    loss_mask: np.ndarray  # [n, P + N] 1 on generated tokens
    attention_mask: np.ndarray  # [n, P + N] 1 on real tokens
    label: np.ndarray  # [n] C(x) = 1 − P(violation); NaN = oracle failure (masked) or not labeled yet
    proposal_logp: np.ndarray  # [n] log proposal(y) of the continuation, up to a constant of the set
    step: int  # provenance: the LLM step whose parameters drew them (0: the base model)

    ARRAYS = ("tokens", "loss_mask", "attention_mask", "label", "proposal_logp")

    def arrays(self, importance_weights: bool = True) -> dict:
        return {k: getattr(self, k) for k in self.ARRAYS if importance_weights or k != "proposal_logp"}

    @classmethod
    def empty(cls, n: int, length: int, step: int) -> "Samples":
        """A buffer of the right shapes (the restore target of a checkpointed one)."""
        z = np.zeros((n, length), np.int32)
        return cls(tokens=z, loss_mask=z.copy(), attention_mask=z.copy(), label=np.zeros(n, np.float32),
                   proposal_logp=np.zeros(n, np.float32), step=step)

    def rows(self, k: int, size: int) -> np.ndarray:
        """The rows of the k-th batch of `size`, cycling over the set."""
        return (np.arange(size) + k * size) % self.label.shape[0]


def oracle_labels(tokenizer, oracle, samples: Samples, lo: int, hi: int, label_text: str) -> np.ndarray:
    """C(x) = 1 − P(violation) of sample rows lo..hi−1: the oracle reads the continuation, or
    (`label_text="full"`) prompt and continuation decoded together, as one token sequence."""
    keep = (samples.loss_mask if label_text == "continuation" else samples.attention_mask)[lo:hi]
    texts = tokenizer.decode_batch([row[m > 0] for row, m in zip(samples.tokens[lo:hi], keep)])
    return 1.0 - np.asarray(oracle.score(texts), np.float32)  # NaN (a failure) stays NaN


class PendingLabels:
    """The oracle's labels of a sample set, computed in a background thread chunk by chunk (in row
    order), so that a step waits only for the rows it trains on, never for the whole set."""

    def __init__(self, samples: Samples, label_rows, pool, chunk: int):
        self.samples, self.chunk = samples, chunk
        n = samples.label.shape[0]
        self.futures = {j: pool.submit(label_rows, samples, lo, min(lo + chunk, n))
                        for j, lo in enumerate(range(0, n, chunk))}

    def wait_rows(self, rows: np.ndarray) -> None:
        """Wait for the chunks holding `rows`; each process computed its share of a chunk's labels, and
        every process gets them all (a collective: main thread, the same chunks in the same order)."""
        n = self.samples.label.shape[0]
        for j in sorted({int(r) // self.chunk for r in rows} & set(self.futures)):
            lo, hi = j * self.chunk, min((j + 1) * self.chunk, n)
            self.samples.label[lo:hi] = multihost.gather_computed_share(self.futures.pop(j).result, hi - lo)

    def complete(self) -> Samples:
        self.wait_rows(np.arange(self.samples.label.shape[0]))
        return self.samples


class Sampler:
    """Prompts from the training split → continuations from an LLM (on device) → oracle labels."""

    def __init__(self, cfg, corpus: Corpus, oracle, method, mesh, seed: int, prompt_words: int):
        self.cfg, self.corpus, self.oracle, self.method, self.mesh = cfg, corpus, oracle, method, mesh
        check_domains("config.method.sample_domains", method.sample_domains, corpus.domains)
        tok = corpus.tokenizer
        texts = [prompt_of(e.text, prompt_words) for d in method.sample_domains for e in corpus.train[d]]
        ids = tok.encode_batch(texts, add_bos=tok.bos_id is not None)
        # One padded prompt length for every sample batch (one compilation): the 95th percentile,
        # so the few long prompts (a 6-"word" URL can be 200 tokens) do not pad all the rest (the
        # sampler and the auxiliary update read every padded column); longer prompts keep their
        # BOS and their last tokens. A multiple of 8 (the sampler compiles for this one length).
        self.prompt_len = 8 * -(-int(np.percentile([len(i) for i in ids], 95)) // 8)
        keep_bos = tok.bos_id is not None
        self.prompts = [list(i) if len(i) <= self.prompt_len else
                        list(i[:1]) * keep_bos + list(i[len(i) - self.prompt_len + keep_bos:]) for i in ids]
        self.fn = sampling.make_sampler(cfg, mesh, max_new_tokens=method.sample_tokens,
                                        use_top_p=method.sample_top_p < 1, eos_id=tok.eos_id, pad_id=tok.pad_id or 0)
        self.seed = seed
        stop = method.get("sample_stop", "")
        self.stop_ids = tuple(tok.encode_batch([stop])[0]) if stop else ()

    def generate(self, params, iteration: int, step: int, rows: Optional[int] = None, repeats: int = 1):
        """Dispatch generation (asynchronous: returns device arrays at once). The prompts and the
        sampling key are functions of (seed, iteration) only, so resumed runs draw the same.
        `step`: the LLM step of `params` (the samples' provenance). `rows` (default
        `samples_per_iteration`) continuations of rows / `repeats` prompts, each continued `repeats`
        times in consecutive rows (k samples per prompt, e.g. RLOO; `repeats` must divide `rows`)."""
        n = self.method.samples_per_iteration if rows is None else rows
        m = n // repeats
        chosen = np.repeat(np.random.default_rng((self.seed, iteration)).choice(len(self.prompts), m,
                                                                                replace=m > len(self.prompts)),
                           repeats)
        tokens, mask = sampling.pad_prompts([self.prompts[i] for i in chosen], self.prompt_len, n,
                                            self.corpus.tokenizer.pad_id or 0)
        batch = batch_sharding(self.mesh, 2)
        out = self.fn(params, None, multihost.to_global(tokens, batch), multihost.to_global(mask, batch),
                      jax.random.key(self.seed * 100_003 + iteration),
                      jnp.float32(self.method.sample_temperature), jnp.float32(self.method.sample_top_p))
        return tokens, mask, out, step, self.stop_ids

    @staticmethod
    def collect(generated) -> Samples:
        """Wait for the generated tokens: the sample set, not labeled yet (labels NaN). A continuation ends
        before the first occurrence of the sampler's stop tokens (`method.sample_stop`; masked from there on)."""
        tokens, mask, out, step, stop_ids = generated
        out = multihost.to_host(out)  # whole, on every process
        kept = mask_from_stop(out.tokens, out.mask, stop_ids)
        # log proposal(y), shifted by the set's mean log weight under the sampling LLM (a constant
        # of the set, which self-normalized weights ignore) so that exp stays in range
        logp = (out.logprobs * kept).sum(-1)
        shift = float(np.mean((out.ref_logprobs * kept).sum(-1) - logp))
        return Samples(tokens=np.concatenate([tokens, out.tokens], 1).astype(np.int32),
                       loss_mask=np.concatenate([np.zeros_like(mask), kept], 1).astype(np.int32),
                       attention_mask=np.concatenate([mask, kept], 1).astype(np.int32),
                       label=np.full(tokens.shape[0], np.nan, np.float32),
                       proposal_logp=(logp + shift).astype(np.float32), step=step)

    def label_rows(self, samples: Samples, lo: int, hi: int) -> np.ndarray:
        """`oracle_labels` of this process's share (`multihost.share`) of rows lo..hi−1 (host work; runs in
        a thread); `multihost.gather_shares` joins the processes' shares."""
        a, b = multihost.share(hi - lo)
        if b <= a:
            return np.zeros(0, np.float32)
        return oracle_labels(self.corpus.tokenizer, self.oracle, samples, lo + a, lo + b, self.method.label_text)

    def label_all(self, samples: Samples) -> Samples:
        n = samples.label.shape[0]
        samples.label[:] = multihost.gather_computed_share(lambda: self.label_rows(samples, 0, n), n)
        return samples

    def draw(self, params, iteration: int, step: int) -> Samples:
        """Generate and label a whole sample set (waits for both)."""
        return self.label_all(self.collect(self.generate(params, iteration, step)))


def mask_from_stop(tokens: np.ndarray, mask: np.ndarray, stop_ids) -> np.ndarray:
    """`mask` [n, N] with each row's tokens from the first occurrence of the token sequence `stop_ids` on set to 0
    (unchanged without stop ids or occurrence)."""
    k = len(stop_ids)
    if not k or tokens.shape[1] < k:
        return mask
    windows = np.lib.stride_tricks.sliding_window_view(tokens, k, axis=1)  # [n, N − k + 1, k]
    hit = (windows == np.asarray(stop_ids)).all(-1)
    first = np.where(hit.any(1), hit.argmax(1), tokens.shape[1])
    return np.where(np.arange(tokens.shape[1]) < first[:, None], mask, 0).astype(mask.dtype)


def bootstrap_samples(sampler: Sampler, base_params) -> tuple[Samples, float]:
    """Iteration 1's labeled sample set, drawn from the base model θ_0, and its mean label (the auxiliary
    model's initial R); an oracle that scored none of them raises OracleError."""
    samples = sampler.draw(base_params, 1, 0)
    if not np.isfinite(samples.label).any():
        raise OracleError(f"config.method.oracle={sampler.method.oracle!r}: scored none of the "
                          f"{samples.label.shape[0]} bootstrap samples (every label failed)")
    return samples, float(np.nanmean(samples.label))


def global_sample_batch(samples: Samples, rows: np.ndarray, mesh, importance_weights: bool) -> dict:
    """Rows `rows` of a sample set as a global batch over the mesh's data axes, the auxiliary model's
    training batch ("proposal_logp" included iff `importance_weights`)."""
    batch = {key: v[rows] for key, v in samples.arrays(importance_weights).items()}
    return multihost.tree_to_global(batch, tree_batch_shardings(mesh, batch))


def aux_optimizer(method):
    """The auxiliary model's optimizer: AdamW at `method.aux_learning_rate`, gradients clipped at norm 1."""
    return make_optimizer(method.aux_learning_rate, grad_clip=1.0)


def aux_initializer(acfg, optimizer, mesh, method, seed: int, llm_cfg):
    """jit fn(llm_params, mean_label) -> the auxiliary model's initial TrainState on its shardings
    (`aux_state_shardings`): trunk copied from `llm_params` (`method.aux_init="llm"`; LoRA factors of
    `llm_cfg` merged first) or fresh, head R ≡ mean_label (a static float; `init_aux_params`)."""
    return jax.jit(lambda llm_params, mean_label: init_train_state(init_aux_params(
        acfg, jax.random.key(seed + 1), mean_label=mean_label,
        llm_params=merge_lora(llm_cfg, llm_params)[1] if method.aux_init == "llm" else None), optimizer),
        out_shardings=aux_state_shardings(mesh, acfg, optimizer), static_argnums=1)


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
                self.f.write(self._line(i + 1, h))

    @staticmethod
    def _line(step: int, metrics: dict) -> str:
        return json.dumps({"step": step, **{k: round(float(v), 6) for k, v in metrics.items()}}) + "\n"

    def write(self, step: int, metrics: dict) -> None:
        if self.f:
            self.f.write(self._line(step, metrics))
            self.tb.scalars(metrics, step)

    def close(self):
        if self.f:
            self.f.close()
            self.tb.close()


def record_metrics(step: int, pending: list, history: list, meter: Throughput, writer: MetricsWriter, desc: str,
                   loss_key: str) -> None:
    """Fetch the metrics of the steps since the last call (waits for them; `pending`: (device metrics,
    host metrics) per step, emptied), append them to `history` with the throughput of those steps and
    log them; print a throughput line every `log_every` steps; a non-finite `loss_key` raises."""
    fetched = jax.device_get(pending)
    pending.clear()
    throughput = meter.measure(step)  # tokens/s and MFU of the steps since the last call
    for m, extra in fetched:
        history.append({**{k: float(np.asarray(v)) for k, v in m.items()}, **extra, **throughput})
        writer.write(len(history), history[-1])
    if meter.due(len(history)) and multihost.is_primary():
        print(meter.line(len(history), history[-1], loss_key), flush=True)
    loss = history[-1].get(loss_key)
    if loss is not None and not np.isfinite(loss):
        raise NonFiniteLossError(f"{desc}: non-finite {loss_key} at step {len(history)}")


def step_boundary(step: int, every: int, num_steps: int, meter: Throughput, pending: list, history: list,
                  writer: MetricsWriter, desc: str, loss_key: str) -> tuple[bool, bool]:
    """At a step boundary of a driver: (preemption requested, checkpoint now). The metrics are recorded
    (`record_metrics`) every `log_every` steps and whenever a checkpoint is due: every `every` steps, at
    the end (`num_steps`) and on preemption (SIGTERM/SIGINT). The caller checkpoints, then raises
    `preemption.Preempted` if requested."""
    stop = preemption.requested()
    checkpoint = stop or step % every == 0 or step == num_steps
    if (checkpoint or meter.due(step)) and pending:
        record_metrics(step, pending, history, meter, writer, desc, loss_key)
    return stop, checkpoint


RESUME_NEUTRAL = ("resume", "checkpoint_every")  # method keys that may change between a run and its resume


def run_guarded(driver, body, result) -> None:
    """Run `body()` under the preemption guard (SIGTERM/SIGINT: checkpoint at the next step boundary,
    then `Preempted`), wait for `result()` (the trained state) to be computed, and always release
    the driver's progress bar, metrics writer, labeling pool, compiler thread and checkpointer."""
    try:
        with preemption.guard():
            body()
        jax.block_until_ready(result())
    finally:
        driver.bar.close()
        driver.writer.close()
        driver.pool.shutdown(cancel_futures=True)
        driver.compiler.shutdown()
        if driver.ckpt is not None:
            driver.ckpt.close()


def run_fingerprint(config, name: str, method_keys=None) -> str:
    """What a checkpoint must agree on to be resumed: everything that determines the run's results
    (not the mesh: a run may resume on another topology; orbax reshards). method_keys: the
    `config.method` keys the run depends on (default: all but `RESUME_NEUTRAL`)."""
    method = {k: v for k, v in config.method.to_dict().items()
              if (k in method_keys if method_keys is not None else k not in RESUME_NEUTRAL)}
    parts = {"name": name, "seed": config.seed, "model": config.model.to_dict(), "data": config.data.to_dict(),
             "base": config.base.to_dict(), "method": method, "split": SPLIT_VERSION}
    if config.get("stage") == "classify":  # its runs train on classification rows of this format
        parts["classify"] = {k: config.classify[k] for k in ("template", "labels")}
    if config.get("lora") is not None and config.lora.rank:  # (absent without LoRA: older checkpoints still match)
        parts["lora"] = config.lora.to_dict()
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclasses.dataclass
class RunState:
    """Everything a checkpoint holds: both train states, the frozen parameters, the labeled sample
    set of the current iteration and the position in the schedule."""

    llm: Optional[TrainState]  # None: nado_decoding (train/nado.py) trains the auxiliary model only
    aux: TrainState
    frozen: Frozen
    samples: Optional[Samples]
    step: int = 0
    history: list = dataclasses.field(default_factory=list)
    label_wait: float = 0.0  # seconds the host waited for the oracle


def save_run(ckpt: RunCheckpointer, run: RunState) -> None:
    arrays = {"llm": run.llm, "aux": run.aux, "samples": run.samples.arrays()}
    if run.frozen.snapshot is not None:
        arrays["snapshot"] = run.frozen.snapshot
    ckpt.save(run.step, arrays, {
        "step": run.step, "history": run.history, "label_wait_s": run.label_wait,
        "samples": {"n": run.samples.label.shape[0], "length": run.samples.tokens.shape[1],
                    "step": run.samples.step}})


def restore_run(ckpt: RunCheckpointer, step: int, like: RunState) -> RunState:
    """The RunState saved at `step`; `like` gives the train states and the snapshot as abstract
    arrays (shapes, dtypes, shardings: nothing is allocated before the restore)."""
    meta = ckpt.restore_meta(step)
    buffer = Samples.empty(**meta["samples"])
    target = {"llm": like.llm, "aux": like.aux, "samples": buffer.arrays()}
    if like.frozen.snapshot is not None:
        target["snapshot"] = like.frozen.snapshot
    arrays = ckpt.restore_state(step, target)
    return RunState(llm=arrays["llm"], aux=arrays["aux"],
                    frozen=dataclasses.replace(like.frozen, snapshot=arrays.get("snapshot")),
                    samples=Samples(**arrays["samples"], step=buffer.step), step=meta["step"],
                    history=meta["history"], label_wait=meta["label_wait_s"])


class MethodRun:
    """One run of the method: setup, resume, the two schedules, logging and checkpoints.
    Use `run_method`."""

    def __init__(self, config, mesh, corpus: Corpus, cfg, base_params, oracle, *, workdir: Optional[str], desc: str,
                 stop_after: Optional[int]):
        check_method_config(config, mesh)
        method = self.method = config.method
        self.config, self.mesh, self.cfg, self.desc, self.stop_after = config, mesh, cfg, desc, stop_after
        check_update_precision(config, base_params, ("method.learning_rate", "method.aux_learning_rate"))
        domains = corpus.domains
        batcher = MixtureBatcher(corpus.packed("train", config.data.seq_len), dict(method.proportions),
                                 method.batch_size, seed=config.seed + 7,
                                 domain_ids={d: i for i, d in enumerate(domains)},
                                 # contiguous domain rows in every data shard: extra forwards only where needed
                                 shuffle_slots=False, shards=shd.batch_shards(mesh))
        self.spec = MethodSpec.from_config(method, tuple(d == config.data.toxic_domain for d in domains),
                                           domain_rows=tuple(batcher.quotas.get(d, 0) for d in domains),
                                           shards=shd.batch_shards(mesh))
        self.num_steps = method.iterations * method.llm_steps
        self.llm_opt = make_optimizer(method.learning_rate, weight_decay=method.weight_decay, grad_clip=1.0,
                                      warmup_steps=method.warmup_steps, total_steps=self.num_steps,
                                      only_lora=cfg.lora_rank > 0)
        self.aux_opt = aux_optimizer(method)
        self.acfg = aux_config(cfg, method.aux_layers)
        self.sampler = Sampler(cfg, corpus, oracle, method, mesh, config.seed, config.data.prompt_words)
        self.batches = global_batches(batcher, mesh, keys=corpus_keys(config.data.document_attention,
                                                                      ("domain",)))
        self.ckpt = None
        if workdir and method.checkpoint_every > 0:
            self.ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints", desc),
                                        fingerprint=run_fingerprint(config, desc))
        self.every = method.checkpoint_every if method.checkpoint_every > 0 else self.num_steps
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="labeler")
        self.compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compiler")
        self.start = time.time()
        self.run = self._initial_state(base_params)
        self.writer = MetricsWriter(workdir, desc, self.run.history)
        self.bar = tqdm(total=self.num_steps, initial=self.run.step, desc=f"{desc} ({method.schedule})",
                        disable=not sys.stderr.isatty(), leave=False)
        self.meter = Throughput.from_config(config, desc, cfg, mesh, batch_size=method.batch_size,
                                            seq_len=config.data.seq_len, total_steps=self.num_steps)
        self.meter.reset(self.run.step)

    def _initial_state(self, base_params) -> RunState:
        """A fresh start (bootstrap samples from the base model), or the latest checkpoint. The
        schedule's steps compile in a background thread meanwhile (`self.steps`)."""
        method, mesh = self.method, self.mesh
        llm_sh = train_state_shardings(mesh, self.cfg, self.llm_opt)
        aux_sh = aux_state_shardings(mesh, self.acfg, self.aux_opt)
        init_llm = jax.jit(functools.partial(init_train_state, optimizer=self.llm_opt), out_shardings=llm_sh)
        init_aux = aux_initializer(self.acfg, self.aux_opt, mesh, method, self.config.seed, self.cfg)
        anchor = base_params if self.spec.needs_anchor else None
        snapshot = self.spec.p_ref == "snapshot"
        like = RunState(llm=abstract_on(jax.eval_shape(init_llm, base_params), llm_sh),
                        aux=abstract_on(jax.eval_shape(init_aux, base_params, 0.5), aux_sh),
                        frozen=Frozen(anchor, abstract_on(base_params, llm_sh.params) if snapshot else None),
                        samples=None)
        if self.ckpt is not None and not method.resume:
            self.ckpt.delete_all()
        resume_step = self.ckpt.latest_step() if self.ckpt is not None else None
        if resume_step is not None:
            self.ckpt.restore_meta(resume_step)  # a checkpoint of another config is refused before compiling
        self.steps = self.compiler.submit(self._compile_steps, like, self.batches(0), self.sample_batch(Samples.empty(
            method.sample_batch_size, self.sampler.prompt_len + method.sample_tokens, 0), 0))
        if resume_step is not None:  # restore onto abstract targets: no second copy of any state
            run = restore_run(self.ckpt, resume_step, like)
            print(f"{self.desc}: resumed from {self.ckpt.directory} at LLM step {run.step}/{self.num_steps}",
                  flush=True)
            return run
        samples, mean_label = bootstrap_samples(self.sampler, base_params)  # iteration 1's: from θ_0
        return RunState(llm=init_llm(base_params), aux=init_aux(base_params, mean_label),
                        frozen=Frozen(anchor, _copy(base_params) if snapshot else None), samples=samples)

    def _compile_steps(self, like: RunState, corpus_batch: dict, sample_batch: dict) -> dict:
        """The schedule's jitted steps, compiled ahead of time for `like`'s shapes and shardings
        (in a thread, overlapping the bootstrap sample or the restore)."""
        spec, mesh = self.spec, self.mesh
        if self.method.schedule == "parallel":
            joint = make_joint_step(self.cfg, self.acfg, spec, self.llm_opt, self.aux_opt, mesh, like.frozen,
                                    corpus_batch, sample_batch)
            return {"joint": joint.lower(like.llm, like.aux, like.frozen, corpus_batch, sample_batch).compile()}
        llm_fn = make_llm_step(self.cfg, self.acfg, spec, self.llm_opt, self.aux_opt, mesh, like.frozen,
                               corpus_batch, sample_batch)
        aux_fn = make_aux_step(self.acfg, self.cfg, self.aux_opt, spec.beta, mesh=mesh, batch_example=sample_batch,
                               accum_steps=spec.accum_steps, sample_tokens=spec.sample_tokens)
        return {"llm": llm_fn.lower(like.llm, like.aux.params, like.frozen, corpus_batch, sample_batch).compile(),
                "aux": aux_fn.lower(like.aux, like.llm.params, sample_batch).compile()}

    # -- logging and checkpoints

    def log_and_checkpoint(self, pending: list, labels: Optional[PendingLabels] = None) -> None:
        """At every step boundary. Every `log_every` steps: log; every `checkpoint_every` LLM steps, at
        the end and on preemption (SIGTERM/SIGINT): log and checkpoint (the sample set's labels still
        being computed by `labels` are waited for: the checkpoint holds them all); then a preemption
        raises `preemption.Preempted`."""
        run = self.run
        stop, checkpoint = step_boundary(run.step, self.every, self.num_steps, self.meter, pending, run.history,
                                         self.writer, self.desc, "llm/loss")
        if checkpoint and self.ckpt is not None:
            if labels is not None:
                self.wait(labels.complete)
            save_run(self.ckpt, run)
        if stop:
            raise preemption.Preempted(run.step, self.desc, saved=self.ckpt is not None)

    def wait(self, fn, *args):
        t0 = time.time()
        out = fn(*args)
        self.run.label_wait += time.time() - t0
        return out

    def stopped(self) -> bool:
        return self.stop_after is not None and self.run.step >= self.stop_after

    def sample_batch(self, samples: Samples, k: int, labels: Optional[PendingLabels] = None) -> dict:
        """The k-th sample batch of `samples` (waiting for its rows' labels if they are pending)."""
        rows = samples.rows(k, self.method.sample_batch_size)
        if labels is not None:
            self.wait(labels.wait_rows, rows)
        return global_sample_batch(samples, rows, self.mesh, self.method.importance_weights)

    def new_samples(self, iteration: int, background: bool) -> Optional[PendingLabels]:
        """The sample set of `iteration`, drawn from the current θ = θ_{iteration−1}, becomes the
        current one; its labels are computed now, or in the background (returned)."""
        run = self.run
        generated = self.sampler.generate(run.llm.params, iteration, run.step)
        if not background:
            run.samples = self.wait(self.sampler.label_all, Sampler.collect(generated))  # (waits for the oracle)
            return None
        run.samples = Sampler.collect(generated)
        return PendingLabels(run.samples, self.sampler.label_rows, self.pool, self.method.sample_batch_size)

    def provenance(self, it: int) -> dict:
        return {"iteration": it, "aux/samples_from_step": self.run.samples.step,
                "sample_lag_steps": self.run.step - self.run.samples.step}

    # -- the schedules

    def parallel(self) -> None:
        run, spec, per_iteration = self.run, self.spec, self.method.llm_steps
        joint, pending = self.steps.result()["joint"], []
        self.meter.reset(run.step)  # (compiled)
        for it in range(run.step // per_iteration + 1, self.method.iterations + 1):
            first = run.step - (it - 1) * per_iteration
            labels = None
            if first == 0:  # a new iteration: ref ← θ_{t-1}; samples ~ θ_{t-1}, labeled in the background
                if spec.p_ref == "snapshot":
                    run.frozen = dataclasses.replace(run.frozen, snapshot=_copy(run.llm.params))
                if it > 1:
                    labels = self.new_samples(it, background=True)
            for _ in range(first, per_iteration):
                extra = self.provenance(it)  # sample batch k of the iteration: its labels are computed first
                run.llm, run.aux, m = joint(run.llm, run.aux, run.frozen, self.batches(run.step),
                                            self.sample_batch(run.samples, run.step - (it - 1) * per_iteration,
                                                              labels))
                pending.append((m, extra))
                run.step += 1
                self.bar.update(1)
                if self.stopped():
                    return
                self.log_and_checkpoint(pending, labels)

    def sequential(self) -> None:
        run, spec, per_iteration = self.run, self.spec, self.method.llm_steps
        steps = self.steps.result()
        llm_fn, aux_fn, pending = steps["llm"], steps["aux"], []
        self.meter.reset(run.step)  # (compiled)
        for it in range(run.step // per_iteration + 1, self.method.iterations + 1):
            first = run.step - (it - 1) * per_iteration
            aux_metrics = {}
            if first == 0:  # a new iteration: samples from θ_{t-1}, then the auxiliary model's steps
                if it > 1:
                    self.new_samples(it, background=False)
                ref = run.llm.params if spec.p_ref == "current" else _copy(run.llm.params)
                if spec.p_ref == "snapshot":
                    run.frozen = dataclasses.replace(run.frozen, snapshot=ref)
                for k in range(self.method.aux_steps):
                    run.aux, m = aux_fn(run.aux, ref, self.sample_batch(run.samples, k))
                aux_metrics = {f"aux/{k}": v for k, v in m.items()}
            aux_version = jnp.copy(run.aux.step)  # (its state is donated by the next iteration's aux steps)
            for _ in range(first, per_iteration):
                extra = self.provenance(it)
                run.llm, m = llm_fn(run.llm, run.aux.params, run.frozen, self.batches(run.step),
                                    self.sample_batch(run.samples, run.step - (it - 1) * per_iteration))
                pending.append(({**aux_metrics, **{f"llm/{k}": v for k, v in m.items()},
                                 "llm/aux_version": aux_version}, extra))
                aux_metrics = {}
                run.step += 1
                self.bar.update(1)
                if self.stopped():
                    return
                self.log_and_checkpoint(pending)

    def __call__(self):
        run_guarded(self, getattr(self, self.method.schedule), lambda: self.run.llm)
        run = self.run
        if self.stopped() and run.step < self.num_steps:
            return None
        if run.history:
            run.history[-1].update({"seconds": time.time() - self.start, "label_wait_s": run.label_wait})
        return run.llm.params, run.aux.params, self.acfg, run.history


def run_method(config, mesh, corpus: Corpus, cfg, base_params, oracle, *, workdir: Optional[str] = None,
               desc: str = "ours", stop_after: Optional[int] = None):
    """Fine-tune `base_params` with the method; returns (llm params, aux params, aux config, history).

    With a `workdir`, checkpoints go to <workdir>/checkpoints/<desc>/ and an existing one is resumed.
    `stop_after`: return None after that many LLM steps, without a final checkpoint (a simulated
    preemption, for tests)."""
    return MethodRun(config, mesh, corpus, cfg, base_params, oracle, workdir=workdir, desc=desc,
                     stop_after=stop_after)()
