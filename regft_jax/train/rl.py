"""The policy-gradient baselines (DESIGN.md section 3): `rl` (RLOO with a KL penalty to the base model)
and `dpo` (beyond the paper: DPO on oracle-ranked pairs of samples).

    trained = run_rl(config, mesh, corpus, cfg, base_params, oracle, workdir=workdir)    # config.rl
    trained = run_dpo(config, mesh, corpus, cfg, base_params, oracle, workdir=workdir)   # config.dpo

Both train the LLM for `method.iterations × method.llm_steps` steps with config.method's optimizer
(learning_rate, weight_decay, warmup_steps, accum_steps), each step on a corpus batch of config.method's
mixture (proportions, batch_size; the LM loss, weight `lm_coef`, 0 = none) plus a batch of the policy's own
samples: k continuations of each of some prompts drawn from the training split (`schedules.Sampler`:
method.sample_domains, never the evaluation prompts; method.sample_tokens, sample_temperature,
sample_top_p), scored by the training oracle, C(x) = 1 − P(violation) (method.oracle, method.label_text).

rl (on-policy RLOO): every step draws `rl.prompts_per_step × rl.k` fresh samples from the current θ and
takes one step on

    L(θ) = lm_coef · L_LM − (1/n) Σ_i A_i log p_θ(y_i) + kl_coef · (1/n) Σ_i Σ_t KL(p_θ ‖ p_base)(h_it)

with A the leave-one-out advantages of each prompt's k rewards (`losses.rloo_advantages`) and the KL exact
over the vocabulary at every sampled prefix h_it (the prefix before each generated token; `losses.policy_kl`;
its gradient flows through those next-token distributions, the prefixes' own dependence on θ enters through
the REINFORCE term only). Overlap: a step's samples are generated in `rl.chunks` sampler calls dispatched
at once; the oracle labels chunk j in a background thread while the device generates chunk j + 1 (the
step itself needs every label: on-policy, nothing of the next step can start before it).

dpo: a pair set per iteration, like ours draws samples per iteration: at the start of iteration t,
`dpo.prompts_per_iteration × dpo.k` samples from θ_{t−1}; per prompt, chosen = its highest-scored
continuation, rejected = its lowest (`preference_pairs`); a prompt whose scores tie (or with fewer than two
scored) gives no pair (masked). Step i of the iteration trains on the pairs of prompts (i·B .. i·B + B − 1)
mod G (B = dpo.pairs_per_step, G = prompts_per_iteration ≤ B · llm_steps: each prompt at least once) on

    L(θ) = lm_coef · L_LM + mean over pairs of −log σ(β [r(y_c) − r(y_r)]), r(y) = log p_θ(y) − log p_base(y)

(`losses.dpo_loss`, reference = the base model). The labels are computed in the background chunk by chunk
(`PendingLabels`): a step waits only for the prompts it trains on.

The step is one jitted function on the mesh, fn(state, base_params, corpus_batch, sample_batch) ->
(state, metrics), the state donated, non-finite updates skipped (`guarded_update`), both terms accumulated
over method.accum_steps microbatches. Samples are a function of (seed, step) and the parameters that draw
them, corpus batches of the step: checkpoints (`<workdir>/checkpoints/<desc>/`, every method.checkpoint_every
steps, at the end and at the step boundary after a SIGTERM/SIGINT; a dpo checkpoint mid-iteration holds the
labeled sample set) resume to bitwise the same parameters; method.resume=False starts over. Metrics:
<workdir>/metrics_<desc>.jsonl and tb/<desc> ("reward": mean C(x) of the step's samples; rl "pg_loss", "kl";
dpo "dpo_loss", "pair_accuracy", "reward_margin", "pairs").
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from regft_jax import multihost, preemption
from regft_jax import sharding as shd
from regft_jax.checkpoint import RunCheckpointer
from regft_jax.config_utils import require
from regft_jax.data.batching import MixtureBatcher
from regft_jax.data.pipeline import Corpus
from regft_jax.losses import dpo_loss, policy_gradient_loss, policy_kl, rloo_advantages, sequence_log_prob
from regft_jax.models import forward
from regft_jax.precision import check_update_precision
from regft_jax.sharding import abstract_on, tree_batch_shardings
from regft_jax.train.aux import sample_window
from regft_jax.train.baselines import Trained
from regft_jax.train.loop import corpus_keys, global_batches
from regft_jax.train.schedules import (MetricsWriter, PendingLabels, Sampler, Samples, check_method_config,
                                       run_fingerprint, run_guarded, step_boundary)
from regft_jax.train.steps import (accumulated_value_and_grad, guarded_update, init_train_state, make_optimizer,
                                   sft_loss, target_count, train_state_shardings)
from regft_jax.train.throughput import Throughput

# The `config.method` keys rl and dpo depend on (with their own block, config.rl / config.dpo).
METHOD_KEYS = ("learning_rate", "weight_decay", "warmup_steps", "iterations", "llm_steps", "batch_size",
               "proportions", "accum_steps", "sample_domains", "sample_tokens", "sample_temperature", "sample_top_p",
               "label_text", "oracle", "oracle_args", "sample_stop")


def check_rl_config(config, mesh=None, names=("rl", "dpo")) -> None:
    """The `config.rl` / `config.dpo` values (of the methods in `names`) and the config.method ones they
    share with ours; a bad one stops the run with one line naming the key. With the `mesh`: sample
    batches split evenly over its data-parallel shards (and method.accum_steps microbatches)."""
    check_method_config(config, mesh)
    m = config.method
    dp = 1 if mesh is None else shd.batch_shards(mesh)
    split = f"a multiple of the data-parallel size {dp}" + (
        f" × config.method.accum_steps={m.accum_steps}" if m.accum_steps > 1 else "")
    for name in names:
        c = config[name]
        require(config, f"{name}.k", c.k >= 2, "an integer >= 2 (samples per prompt: a baseline or a pair needs two)")
        require(config, f"{name}.lm_coef", c.lm_coef >= 0, ">= 0 (weight of the corpus LM loss; 0: none)")
        require(config, f"{name}.chunks", c.chunks >= 1, "an integer >= 1 (sampler calls per draw)")
        prompts = "prompts_per_step" if name == "rl" else "prompts_per_iteration"
        require(config, f"{name}.{prompts}", c[prompts] >= 1 and c[prompts] % c.chunks == 0,
                f"an integer >= 1, a multiple of config.{name}.chunks={c.chunks}")
        require(config, f"{name}.chunks", (c[prompts] // c.chunks * c.k) % dp == 0,
                f"a divisor of config.{name}.{prompts} such that each sampler call's {c[prompts]} / chunks × "
                f"k={c.k} rows are a multiple of the data-parallel size {dp}")
        if name == "rl":
            require(config, "rl.kl_coef", c.kl_coef >= 0, ">= 0 (weight of the KL penalty to the base model)")
            require(config, "rl.prompts_per_step", (c.prompts_per_step * c.k) % (dp * m.accum_steps) == 0,
                    f"such that prompts_per_step × k={c.k} is {split}")
        else:
            require(config, "dpo.beta", c.beta > 0, "> 0 (the DPO temperature)")
            require(config, "dpo.pairs_per_step", 1 <= c.pairs_per_step <= c.prompts_per_iteration,
                    f"an integer in [1, config.dpo.prompts_per_iteration={c.prompts_per_iteration}]")
            require(config, "dpo.pairs_per_step", c.pairs_per_step % (dp * m.accum_steps) == 0, split)
            require(config, "dpo.prompts_per_iteration", c.prompts_per_iteration <= c.pairs_per_step * m.llm_steps,
                    f"at most pairs_per_step × config.method.llm_steps = {c.pairs_per_step * m.llm_steps} (every "
                    "prompt's pair is trained on in its iteration)")


def preference_pairs(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DPO pairs of k scored continuations per prompt, labels [G, k] (C(x); NaN = not scored) →
    (chosen [G], rejected [G], is_pair [G]): the index of each prompt's highest-scored and of its
    lowest-scored continuation (the first one on ties), and whether they make a pair: at least two
    scored and the two scores differ (a tie says nothing about which is better)."""
    valid = np.isfinite(labels)
    high, low = np.where(valid, labels, -np.inf), np.where(valid, labels, np.inf)
    is_pair = (valid.sum(-1) >= 2) & (high.max(-1) > low.min(-1))
    return high.argmax(-1), low.argmin(-1), is_pair


# ----------------------------------------------------------------------------------------- the steps


def _sample_log_probs(cfg, params, rows: dict, sample_tokens: int):
    """(logits [b, w, V] of the sample rows' last w slots, log p(continuation) [b], loss mask [b, w]):
    rows = left-padded prompt + continuation (`Samples`), the vocabulary projection on the
    continuation's slots only (`sample_window`)."""
    start = sample_window(rows, sample_tokens)
    logits = forward(cfg, params, rows["tokens"], attention_mask=rows["attention_mask"], from_slot=start)
    mask = rows["loss_mask"][:, start:]
    return logits, sequence_log_prob(logits, rows["tokens"][:, start:], mask), mask


def rl_objective(cfg, kl_coef: float, sample_tokens: int, params, base_params, batch: dict):
    """−(1/n) Σ_i A_i log p_θ(y_i) + kl_coef · (1/n) Σ_i Σ_t KL(p_θ ‖ p_base)(h_it) on a sample batch
    ("tokens", "loss_mask", "attention_mask" [n, s], "advantage" [n])."""
    logits, logp, mask = _sample_log_probs(cfg, params, batch, sample_tokens)
    start = sample_window(batch, sample_tokens)
    base = jax.lax.stop_gradient(forward(cfg, base_params, batch["tokens"], attention_mask=batch["attention_mask"],
                                         from_slot=start))
    prefix = mask[:, 1:].astype(jnp.float32)  # slot t predicts the generated token t + 1
    kl = jnp.where(prefix > 0, policy_kl(logits[:, :-1], base[:, :-1]), 0.0).sum(-1)  # per sequence
    pg = policy_gradient_loss(logp, batch["advantage"])
    return pg + kl_coef * kl.mean(), {"pg_loss": pg, "kl": kl.mean(), "log_prob": logp.mean()}


def dpo_objective(cfg, beta: float, sample_tokens: int, params, base_params, batch: dict):
    """`dpo_loss` of a pair batch {"chosen": rows, "rejected": rows, "weight" [B]} (rows as in
    `rl_objective`; weight 0 = no pair), reference = `base_params`."""
    logp = {}
    for side in ("chosen", "rejected"):
        logp[side] = _sample_log_probs(cfg, params, batch[side], sample_tokens)[1]
        logp["ref_" + side] = jax.lax.stop_gradient(_sample_log_probs(cfg, base_params, batch[side], sample_tokens)[1])
    w = batch["weight"].astype(jnp.float32)
    loss = dpo_loss(logp["chosen"], logp["rejected"], logp["ref_chosen"], logp["ref_rejected"], beta, w)
    margin = beta * ((logp["chosen"] - logp["ref_chosen"]) - (logp["rejected"] - logp["ref_rejected"]))
    mean = lambda x: (w * x).sum() / jnp.maximum(w.sum(), 1.0)
    return loss, {"dpo_loss": loss, "pair_accuracy": mean((margin > 0).astype(jnp.float32)),
                  "reward_margin": mean(margin)}


def policy_step(cfg, optimizer, objective: Callable, weight_fn: Callable, lm_coef: float, accum_steps: int,
                state, base_params, corpus_batch: dict, sample_batch: dict):
    """One guarded AdamW step on lm_coef · L_LM(corpus_batch) + objective(params, base_params, sample_batch),
    each term's gradient accumulated over `accum_steps` microbatches (exact: `weight_fn` is the sample
    term's normalizer, `target_count` the LM loss's)."""
    key = "config.method.accum_steps"
    (loss, metrics), grads = accumulated_value_and_grad(lambda p, b: objective(p, base_params, b), state.params,
                                                        sample_batch, accum_steps, weight_fn, key=key)
    if lm_coef > 0:
        (lm, lm_metrics), lm_grads = accumulated_value_and_grad(functools.partial(sft_loss, cfg), state.params,
                                                                corpus_batch, accum_steps, target_count, key=key)
        loss = loss + lm_coef * lm
        grads = jax.tree.map(lambda g, h: g + lm_coef * h, grads, lm_grads)
        metrics = {**metrics, **lm_metrics}
    return guarded_update(state, optimizer, grads, loss, metrics)


def rl_step(cfg, optimizer, k: int, kl_coef: float, lm_coef: float, sample_tokens: int, accum_steps: int,
            state, base_params, corpus_batch: dict, sample_batch: dict):
    """`policy_step` with `rl_objective`; the sample batch holds k consecutive rows per prompt and their
    "label" (C(x), NaN = not scored), whose RLOO advantages are computed here, on the whole batch."""
    advantage = rloo_advantages(sample_batch["label"].reshape(-1, k)).reshape(-1)
    batch = {**{key: v for key, v in sample_batch.items() if key != "label"}, "advantage": advantage}
    rows = lambda mb: jnp.float32(mb["advantage"].shape[0])  # the sample term is a mean over rows
    objective = functools.partial(rl_objective, cfg, kl_coef, sample_tokens)
    state, metrics = policy_step(cfg, optimizer, objective, rows, lm_coef, accum_steps, state, base_params,
                                 corpus_batch, batch)
    return state, {**metrics, "abs_advantage": jnp.abs(advantage).mean()}


def dpo_step(cfg, optimizer, beta: float, lm_coef: float, sample_tokens: int, accum_steps: int,
             state, base_params, corpus_batch: dict, pair_batch: dict):
    """`policy_step` with `dpo_objective` (normalizer: the pairs, Σ weight)."""
    objective = functools.partial(dpo_objective, cfg, beta, sample_tokens)
    state, metrics = policy_step(cfg, optimizer, objective, lambda mb: mb["weight"].sum(), lm_coef, accum_steps,
                                 state, base_params, corpus_batch, pair_batch)
    return state, {**metrics, "pairs": pair_batch["weight"].sum()}


def jit_policy_step(step_fn: Callable, mesh, cfg, optimizer, corpus_example: dict, sample_example: dict,
                    rules=None) -> Callable:
    """`step_fn(state, base_params, corpus_batch, sample_batch) -> (state, metrics)` jitted with explicit
    shardings on `mesh` (state and base params per the LLM's logical axes, batches over the data axes);
    the state is donated."""

    def traced(state, base_params, corpus_batch, sample_batch):
        with shd.use_mesh(mesh, rules):
            return step_fn(state, base_params, corpus_batch, sample_batch)

    state_sh = train_state_shardings(mesh, cfg, optimizer, rules)
    return jax.jit(traced, in_shardings=(state_sh, state_sh.params, tree_batch_shardings(mesh, corpus_example, rules),
                                         tree_batch_shardings(mesh, sample_example, rules)),
                   out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=(0,))


# ----------------------------------------------------------------------------------------- the driver


@dataclasses.dataclass
class Draw:
    """The samples of one draw (k per prompt, consecutive rows), generated in chunks of `chunk_rows` rows;
    `pending`: each chunk's labels being computed in the background ([]: all known)."""

    samples: Samples
    chunk_rows: int
    pending: list = dataclasses.field(default_factory=list)

    def wait_rows(self, rows: np.ndarray) -> None:
        for j, labels in enumerate(self.pending):
            lo = j * self.chunk_rows
            mine = rows[(rows >= lo) & (rows < lo + self.chunk_rows)] - lo
            if mine.size:
                labels.wait_rows(mine)

    def complete(self) -> None:
        for labels in self.pending:
            labels.complete()


class PolicyRun:
    """One run of `rl` or `dpo` (see the module docstring): setup, resume, the loop, logging and
    checkpoints. Use `run_rl` / `run_dpo`."""

    def __init__(self, name: str, config, mesh, corpus: Corpus, cfg, base_params, oracle, *,
                 workdir: Optional[str], desc: str, stop_after: Optional[int]):
        check_rl_config(config, mesh, (name,))
        m, c = config.method, config[name]
        self.name, self.config, self.mesh, self.cfg, self.desc = name, config, mesh, cfg, desc
        self.stop_after = stop_after
        self.base_params, self.c, self.k = base_params, c, int(c.k)
        check_update_precision(config, base_params, ("method.learning_rate",))
        self.num_steps = m.iterations * m.llm_steps
        if name == "rl":  # fresh samples every step, all of them in the step's batch
            self.groups, self.batch_groups, self.refresh = int(c.prompts_per_step), int(c.prompts_per_step), 1
        else:  # a pair set per iteration, pairs_per_step of its prompts per step
            self.groups, self.batch_groups = int(c.prompts_per_iteration), int(c.pairs_per_step)
            self.refresh = m.llm_steps
        self.chunk_rows = self.groups // int(c.chunks) * self.k
        self.lm_coef = float(c.lm_coef)
        batcher = MixtureBatcher(corpus.packed("train", config.data.seq_len), dict(m.proportions), m.batch_size,
                                 seed=config.seed + 7)
        self.batches = global_batches(batcher, mesh, keys=corpus_keys(config.data.document_attention))
        self.optimizer = make_optimizer(m.learning_rate, weight_decay=m.weight_decay, grad_clip=1.0,
                                        warmup_steps=m.warmup_steps, total_steps=self.num_steps,
                                        only_lora=cfg.lora_rank > 0)
        self.sampler = Sampler(cfg, corpus, oracle, m, mesh, config.seed, config.data.prompt_words)
        self.length = self.sampler.prompt_len + m.sample_tokens
        self.ckpt = None
        if workdir and m.checkpoint_every > 0:
            extra = json.dumps({name: c.to_dict()}, sort_keys=True, default=str)
            self.ckpt = RunCheckpointer(os.path.join(workdir, "checkpoints", desc),
                                        fingerprint=run_fingerprint(config, desc + extra, METHOD_KEYS))
            if not m.resume:
                self.ckpt.delete_all()
        self.every = m.checkpoint_every if m.checkpoint_every > 0 else self.num_steps
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="labeler")
        self.compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compiler")
        self.start = time.time()
        self.draw, self.history, self.label_wait = None, [], 0.0
        try:
            self.compiling = self._restore_or_init()
        except BaseException:  # e.g. a checkpoint of another config: nothing left running
            self.compiler.shutdown(cancel_futures=True)
            if self.ckpt is not None:
                self.ckpt.close()
            raise
        self.writer = MetricsWriter(workdir, desc, self.history)
        self.bar = tqdm(total=self.num_steps, initial=self.step, desc=desc, disable=not sys.stderr.isatty(),
                        leave=False)
        self.meter = Throughput.from_config(config, desc, cfg, mesh, batch_size=m.batch_size,
                                            seq_len=config.data.seq_len, total_steps=self.num_steps)

    # -- state

    def _restore_or_init(self):
        """The train state (fresh, or the latest checkpoint's, with its draw mid-iteration); the step compiles
        in a background thread meanwhile (returned: a future)."""
        state_sh = train_state_shardings(self.mesh, self.cfg, self.optimizer)
        init = jax.jit(functools.partial(init_train_state, optimizer=self.optimizer), out_shardings=state_sh)
        like = abstract_on(jax.eval_shape(init, self.base_params), state_sh)
        latest = self.ckpt.latest_step() if self.ckpt is not None else None
        meta = None if latest is None else self.ckpt.restore_meta(latest)  # another config's: refused first
        example = self.batch(Draw(Samples.empty(self.groups * self.k, self.length, 0), self.chunk_rows), 0)[0]
        compiled = self.compiler.submit(self._compile, like, self.corpus_batch(0), example)
        if latest is None:
            self.step, self.state = 0, init(self.base_params)
            return compiled
        target = {"llm": like}
        if meta["draw"] is not None:
            target["samples"] = Samples.empty(**meta["draw"]).arrays()
        arrays = self.ckpt.restore_state(latest, target)
        self.step, self.state, self.history, self.label_wait = (meta["step"], arrays["llm"], meta["history"],
                                                                meta["label_wait_s"])
        if meta["draw"] is not None:
            self.draw = Draw(Samples(**arrays["samples"], step=meta["draw"]["step"]), self.chunk_rows)
        print(f"{self.desc}: resumed from {self.ckpt.directory} at step {self.step}/{self.num_steps}", flush=True)
        return compiled

    def _compile(self, like, corpus_example: dict, sample_example: dict):
        c, m = self.c, self.config.method
        if self.name == "rl":
            fn = functools.partial(rl_step, self.cfg, self.optimizer, self.k, float(c.kl_coef), self.lm_coef,
                                   m.sample_tokens, m.accum_steps)
        else:
            fn = functools.partial(dpo_step, self.cfg, self.optimizer, float(c.beta), self.lm_coef, m.sample_tokens,
                                   m.accum_steps)
        step = jit_policy_step(fn, self.mesh, self.cfg, self.optimizer, corpus_example, sample_example)
        return step.lower(like, self.base_params, corpus_example, sample_example).compile()

    # -- samples and batches

    def corpus_batch(self, step: int) -> dict:
        return self.batches(step) if self.lm_coef > 0 else {}

    def new_draw(self, index: int) -> Draw:
        """Draw `index`'s samples from the current θ: `chunks` sampler calls dispatched at once; each chunk's
        labels start in the background as soon as the device has generated it (the next chunk generates
        meanwhile). The sampling key of chunk j: draw index × chunks + j + 1."""
        chunks, params = int(self.c.chunks), self.state.params
        generated = [self.sampler.generate(params, index * chunks + j + 1, self.step, rows=self.chunk_rows,
                                           repeats=self.k) for j in range(chunks)]
        samples = Samples.empty(self.groups * self.k, self.length, self.step)
        draw = Draw(samples, self.chunk_rows)
        label_chunk = min(self.chunk_rows, self.batch_groups * self.k)
        for j, out in enumerate(generated):
            part, lo = Sampler.collect(out), j * self.chunk_rows
            view = Samples(**{key: getattr(samples, key)[lo:lo + self.chunk_rows] for key in Samples.ARRAYS},
                           step=self.step)  # views: the labels land in `samples`
            for key in Samples.ARRAYS:
                getattr(view, key)[:] = getattr(part, key)
            draw.pending.append(PendingLabels(view, self.sampler.label_rows, self.pool, label_chunk))
        return draw

    def batch(self, draw: Draw, i: int) -> tuple[dict, dict]:
        """The sample batch of step i of `draw` (global arrays; waits for its rows' labels) and host metrics.
        rl: every row with its label; dpo: the pairs of prompts (i·B .. i·B + B − 1) mod G."""
        k, s = self.k, draw.samples
        groups = (i * self.batch_groups + np.arange(self.batch_groups)) % self.groups
        rows = (groups[:, None] * k + np.arange(k)).reshape(-1)
        t0 = time.time()
        draw.wait_rows(rows)
        self.label_wait += time.time() - t0
        labels = s.label[rows]
        scored = np.isfinite(labels)
        extra = {"reward": float(labels[scored].mean()) if scored.any() else float("nan"),
                 "scored": float(scored.mean())}
        take = lambda r: {"tokens": s.tokens[r], "loss_mask": s.loss_mask[r], "attention_mask": s.attention_mask[r]}
        if self.name == "rl":
            out = {**take(rows), "label": labels}
        else:
            chosen, rejected, is_pair = preference_pairs(labels.reshape(-1, k))
            out = {"chosen": take(groups * k + chosen), "rejected": take(groups * k + rejected),
                   "weight": is_pair.astype(np.float32)}
        return multihost.tree_to_global(out, tree_batch_shardings(self.mesh, out)), extra

    # -- the loop

    def __call__(self) -> Optional[Trained]:
        run_guarded(self, self.loop, lambda: self.state)
        if self.stopped() and self.step < self.num_steps:
            return None
        if self.history:
            self.history[-1].update({"seconds": time.time() - self.start, "label_wait_s": self.label_wait})
        return Trained(self.state.params, self.history, info=self.info())

    def loop(self) -> None:
        step_fn, pending = None, []
        while self.step < self.num_steps:
            i = self.step % self.refresh
            extra = {}
            if i == 0 or self.draw is None:  # (a resumed run mid-draw has its draw back)
                self.draw = self.new_draw(self.step // self.refresh)
                extra["samples_drawn"] = float(self.groups * self.k)
            sample_batch, host = self.batch(self.draw, i)
            first = step_fn is None
            step_fn = step_fn or self.compiling.result()
            self.state, metrics = step_fn(self.state, self.base_params, self.corpus_batch(self.step), sample_batch)
            if self.name == "dpo" and i == self.refresh - 1:  # the pair set's last step: count its pairs
                self.draw.complete()  # (no wait: every prompt was trained on, G ≤ B · llm_steps)
                _, _, is_pair = preference_pairs(self.draw.samples.label.reshape(-1, self.k))
                extra.update({"iteration_pairs": float(is_pair.sum()),
                              "iteration_pairs_dropped": float((~is_pair).sum())})
            pending.append((metrics, {**host, **extra}))
            self.step += 1
            self.bar.update(1)
            if first:  # throughput windows start after the compiled step's first run
                jax.block_until_ready(metrics)
                self.meter.reset(self.step)
            if self.stopped():
                return
            self.log_and_checkpoint(pending)

    def stopped(self) -> bool:
        return self.stop_after is not None and self.step >= self.stop_after

    def log_and_checkpoint(self, pending: list) -> None:
        """At every step boundary: log every `log_every` steps; checkpoint every `checkpoint_every` steps, at
        the end and on preemption (with the draw's sample set, all labels waited for, when mid-draw); then a
        preemption raises `preemption.Preempted`."""
        stop, checkpoint = step_boundary(self.step, self.every, self.num_steps, self.meter, pending, self.history,
                                         self.writer, self.desc, "loss")
        if checkpoint and self.ckpt is not None:
            self.save()
        if stop:
            raise preemption.Preempted(self.step, self.desc, saved=self.ckpt is not None)

    def save(self) -> None:
        arrays, draw = {"llm": self.state}, None
        if self.step % self.refresh and self.draw is not None:  # mid-draw: the next steps train on it
            t0 = time.time()
            self.draw.complete()
            self.label_wait += time.time() - t0
            s = self.draw.samples
            arrays["samples"], draw = s.arrays(), {"n": s.label.shape[0], "length": s.tokens.shape[1], "step": s.step}
        self.ckpt.save(self.step, arrays, {"step": self.step, "history": self.history,
                                           "label_wait_s": self.label_wait, "draw": draw})

    def info(self) -> dict:
        """results.json extras: samples drawn, mean reward of the first and last tenth of the steps, and
        (dpo) the pairs the iterations' prompts gave and those dropped (tied or unscored scores)."""
        h = self.history
        tenth = max(1, len(h) // 10)
        reward = lambda part: float(np.nanmean([x.get("reward", np.nan) for x in part])) if part else float("nan")
        out = {"samples": float(sum(x.get("samples_drawn", 0.0) for x in h)), "reward_first": reward(h[:tenth]),
               "reward_last": reward(h[-tenth:])}
        if self.name == "dpo":
            out["pairs"] = float(sum(x.get("iteration_pairs", 0.0) for x in h))
            out["pairs_dropped"] = float(sum(x.get("iteration_pairs_dropped", 0.0) for x in h))
        return out


def run_rl(config, mesh, corpus: Corpus, cfg, base_params, oracle, *, workdir: Optional[str] = None,
           desc: str = "rl", stop_after: Optional[int] = None) -> Optional[Trained]:
    """The `rl` baseline (on-policy RLOO + KL to the base model + corpus LM loss, `config.rl`); returns
    `Trained(params, history, info={"samples", "reward_first", "reward_last"})`. With a `workdir`: checkpoints
    under <workdir>/checkpoints/<desc>/, resumed. `stop_after`: return None after that many steps, without a
    final checkpoint (a simulated preemption, for tests)."""
    return PolicyRun("rl", config, mesh, corpus, cfg, base_params, oracle, workdir=workdir, desc=desc,
                     stop_after=stop_after)()


def run_dpo(config, mesh, corpus: Corpus, cfg, base_params, oracle, *, workdir: Optional[str] = None,
            desc: str = "dpo", stop_after: Optional[int] = None) -> Optional[Trained]:
    """The `dpo` baseline (oracle-ranked pairs of the current policy's samples per iteration, reference = the
    base model, + corpus LM loss; `config.dpo`); info adds "pairs" and "pairs_dropped". Like `run_rl`."""
    return PolicyRun("dpo", config, mesh, corpus, cfg, base_params, oracle, workdir=workdir, desc=desc,
                     stop_after=stop_after)()
