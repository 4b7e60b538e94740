"""The method's train steps: `llm_step` (L = L_LM + λ_d Ω_d), and `joint_step`, which computes and
applies both the LLM's and the auxiliary model's updates in ONE jitted, mesh-sharded function.

    spec = MethodSpec.from_config(config.method, toxic=(False, True), domain_rows=(10, 6))
    step = make_joint_step(llm_cfg, aux_cfg, spec, llm_opt, aux_opt, mesh, ...)
    llm_state, aux_state, metrics = step(llm_state, aux_state, frozen, corpus_batch, sample_batch)

Batches: corpus {"tokens" [b, s+1], "loss_mask" [b, s+1], "domain" [b]} (shifted inside, like
`sft_loss`); samples {"tokens" [n, t], "loss_mask" [n, t] (generated tokens), "label" [n]}
(see `regft_jax.train.aux`). `Frozen` holds the parameters that do not train: the anchor
(p_anchor of Ω_keep, the base model) and, for p_ref="snapshot", the reference LLM.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from regft_jax import sharding as shd
from regft_jax.errors import UserInputError
from regft_jax.losses import (ANCHOR, CLOSED_FORM, NONE, closed_form_regularizer, domain_regularizers,
                              regularized_lm_loss)
from regft_jax.models import ModelConfig, abstract_params, forward, packed_inputs, param_logical_axes
from regft_jax.models.aux import aux_logits
from regft_jax.train.aux import aux_state_shardings, aux_step, sample_window
from regft_jax.train.steps import (TrainState, accumulated_value_and_grad, guarded_update, target_count,
                                   train_state_shardings)

P_REF = ("current", "snapshot")


@struct.dataclass
class Frozen:
    anchor: Any = None  # base-model params (needed by the "anchor" regularizer)
    snapshot: Any = None  # reference-LLM params (needed by p_ref="snapshot")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Static description of the objective: per-domain regularizer kinds and weights, p_ref, β.

    domain_rows: rows per domain id when corpus batches hold the domains in contiguous slot
    ranges in id order, dealt over `shards` row blocks (`MixtureBatcher(shuffle_slots=False,
    shards=...)`, `data.batching.dealt_order`); then the extra forwards (the anchor for Ω_keep, the
    auxiliary model and a snapshot for Ω_tox) run only on a window of each block's rows that
    covers the rows that need them (`rows`). None: on every row.
    shards: the data-parallel size of the batch axis (`sharding.batch_shards`; 1 off a mesh). The
    windows are sliced per shard (`sharding.shard_window`), so the extra forwards stay sharded.
    accum_steps: microbatches per step (`accumulated_value_and_grad`, strided rows), for the LLM's
    and, in `joint_step`, the auxiliary model's update; shards · accum_steps must divide the batch.
    split: set by `microbatch` (the strided microbatches the batch came from).
    sample_tokens: the generated columns at the end of each sample row (`aux_step`); None: any column.
    sample_lambda: weight of Ω_tox at the prefixes of sampled continuations (`sample_regularizer`;
    0: corpus positions only).
    """

    kinds: tuple[str, ...]
    lambdas: tuple[float, ...]
    p_ref: str = "current"
    beta: float = 1.0
    domain_rows: Optional[tuple[int, ...]] = None
    accum_steps: int = 1
    sample_tokens: Optional[int] = None
    sample_lambda: float = 0.0
    shards: int = 1
    split: int = 1

    def __post_init__(self):
        if self.p_ref not in P_REF:
            raise UserInputError(f"config.method.p_ref={self.p_ref!r}: expected one of {P_REF}")
        groups = self.shards * self.accum_steps * self.split
        if self.accum_steps < 1 or self.shards < 1 or sum(self.domain_rows or ()) % max(groups, 1):
            raise UserInputError(f"config.method.accum_steps={self.accum_steps}: must be ≥ 1 and, times the "
                                 f"data-parallel size {self.shards}, divide config.method.batch_size="
                                 f"{sum(self.domain_rows or ())} (domain rows {self.domain_rows})")

    @property
    def microbatch(self) -> "MethodSpec":
        """The spec of one of the `accum_steps` microbatches (rows j::accum_steps of a batch)."""
        return dataclasses.replace(self, accum_steps=1, split=self.split * self.accum_steps)

    @classmethod
    def from_config(cls, method, toxic: tuple[bool, ...], domain_rows=None, shards: int = 1) -> "MethodSpec":
        """`method.reg_prefixes` says where Ω_tox applies: "corpus" (the corpus positions of its
        domains), "samples" (the prefixes of sampled continuations, weight `lambda_samples`; the
        corpus keeps its Ω_keep domains, if adaptive) or "both"."""
        kinds, lambdas = domain_regularizers(method.adaptive, toxic, method.lambda_toxic, method.lambda_keep)
        prefixes = method.get("reg_prefixes", "corpus")
        if prefixes == "samples":
            kinds = tuple(NONE if k == CLOSED_FORM else k for k in kinds)
        return cls(kinds, tuple(float(x) for x in lambdas), method.p_ref, float(method.beta),
                   None if domain_rows is None else tuple(int(n) for n in domain_rows),
                   int(method.get("accum_steps", 1)),
                   None if method.get("sample_tokens") is None else int(method.sample_tokens),
                   float(method.get("lambda_samples", method.lambda_toxic)) if prefixes != "corpus" else 0.0,
                   shards=shards)

    def rows(self, kind: str, batch: int) -> tuple[int, int]:
        """The (static) window lo..hi−1 of each shard's batch / shards rows that covers every row whose
        domain uses regularizer `kind` (rows of other domains inside it are computed, then masked).

        Row k of a shard holds slot k·G + c of the full batch's contiguous domain order, for an offset
        c in [0, G), G = shards · split (the deal, then the strided microbatches), so the slots lo..hi−1
        of those domains fall in rows floor(lo / G) .. ceil(hi / G) − 1 of every shard: exactly their
        rows when G divides the domain boundaries, at most one extra row per end otherwise."""
        if self.domain_rows is None:
            return 0, batch // self.shards
        ends = np.cumsum((0,) + self.domain_rows)
        ids = [d for d, k in enumerate(self.kinds) if k == kind and self.domain_rows[d] > 0]
        if not ids:
            return 0, 0
        g = self.shards * self.split
        return int(ends[min(ids)]) // g, -(-int(ends[max(ids) + 1]) // g)

    @property
    def needs_anchor(self) -> bool:
        return ANCHOR in self.kinds

    @property
    def needs_aux(self) -> bool:
        """Whether corpus positions need z (the auxiliary model's logits)."""
        return CLOSED_FORM in self.kinds


def llm_objective(llm_cfg: ModelConfig, aux_cfg: ModelConfig, spec: MethodSpec, params, aux_params,
                  frozen: Frozen, batch: dict):
    """L(θ) on a corpus batch: LM loss + λ_d Ω_d at every counted position (see `regularized_lm_loss`).

    p_ref = stop_gradient(current logits) ("current": no extra forward) or the snapshot's logits;
    z = the auxiliary model's logits (not trained by this loss); the anchor's logits for Ω_keep.
    Each extra forward runs on the window of every shard's rows that needs it (`MethodSpec.rows`),
    zeros elsewhere: sliced per shard, it stays sharded over the batch (see `sharding.shard_window`)."""
    inputs = packed_inputs(batch)  # with segment ids: attention and RoPE within each packed document
    logits = forward(llm_cfg, params, **inputs)
    b, n = logits.shape[0], spec.shards

    def on_rows(kind, fn):
        lo, hi = spec.rows(kind, b)
        if (lo, hi) == (0, b // n):
            return jax.lax.stop_gradient(fn(dict(inputs)))
        out = jax.lax.stop_gradient(fn({k: shd.shard_window(v, lo, hi, n) for k, v in inputs.items()}))
        return shd.constrain(shd.unshard_window(out, lo, hi, b // n, n), ("batch", "length", "vocab"))

    ref_logits = z = anchor_logits = None
    if spec.needs_aux:
        ref_logits = (jax.lax.stop_gradient(logits) if spec.p_ref == "current"
                      else on_rows(CLOSED_FORM, lambda x: forward(llm_cfg, frozen.snapshot, **x)))
        z = on_rows(CLOSED_FORM, lambda x: aux_logits(aux_cfg, aux_params, x.pop("input_ids"), **x))
    if spec.needs_anchor:
        anchor_logits = on_rows(ANCHOR, lambda x: forward(llm_cfg, frozen.anchor, **x))
    return regularized_lm_loss(logits, batch["tokens"][:, 1:], batch["loss_mask"][:, 1:], batch["domain"],
                               kinds=spec.kinds, lambdas=spec.lambdas, ref_logits=ref_logits, z=z,
                               anchor_logits=anchor_logits)


def sample_regularizer(llm_cfg: ModelConfig, aux_cfg: ModelConfig, spec: MethodSpec, params, aux_params,
                       frozen: Frozen, samples: dict):
    """λ_s · mean Ω_tox(θ; h) over the prefixes h of sampled continuations (the prefix before each
    generated token, prompt included), q = p_ref · R at those prefixes. Sample rows as in `aux_step`
    (left-padded prompt + continuation, loss_mask on the generated tokens); the vocabulary
    projections run on the continuation's slots only (`sample_window`)."""
    start = sample_window(samples, spec.sample_tokens)
    tokens, attention = samples["tokens"], samples.get("attention_mask")
    logits = forward(llm_cfg, params, tokens, attention_mask=attention, from_slot=start)
    ref = (jax.lax.stop_gradient(logits) if spec.p_ref == "current"
           else forward(llm_cfg, frozen.snapshot, tokens, attention_mask=attention, from_slot=start))
    z = jax.lax.stop_gradient(aux_logits(aux_cfg, aux_params, tokens, attention, from_slot=start))
    prefix = samples["loss_mask"][:, start + 1:].astype(jnp.float32)  # slot t predicts generated token t + 1
    omega = closed_form_regularizer(jax.lax.stop_gradient(ref), z, logits)[:, :-1]
    mean = jnp.where(prefix > 0, omega, 0.0).sum() / jnp.maximum(prefix.sum(), 1.0)
    return spec.sample_lambda * mean, {"omega_samples": mean}


def llm_step(llm_cfg, aux_cfg, spec: MethodSpec, optimizer, state: TrainState, aux_params, frozen: Frozen,
             batch: dict, sample_batch: Optional[dict] = None):
    """One guarded optimizer step of the LLM on L(θ) with the auxiliary model `aux_params` fixed, its
    gradient accumulated over `spec.accum_steps` microbatches (exact: L is a ratio over `target_count`);
    with `spec.sample_lambda` > 0, plus `sample_regularizer` on `sample_batch` (one pass, not
    microbatched)."""
    objective = lambda params, mb: llm_objective(llm_cfg, aux_cfg, spec.microbatch, params, aux_params, frozen, mb)
    (loss, metrics), grads = accumulated_value_and_grad(objective, state.params, batch, spec.accum_steps,
                                                        target_count, key="config.method.accum_steps")
    if spec.sample_lambda > 0:
        (reg, reg_metrics), reg_grads = jax.value_and_grad(
            lambda p: sample_regularizer(llm_cfg, aux_cfg, spec, p, aux_params, frozen, sample_batch),
            has_aux=True)(state.params)
        loss, grads = loss + reg, jax.tree.map(jnp.add, grads, reg_grads)
        metrics = {**metrics, **reg_metrics, "reg_loss": metrics["reg_loss"] + reg}
    return guarded_update(state, optimizer, grads, loss, metrics)


def joint_step(llm_cfg, aux_cfg, spec: MethodSpec, llm_opt, aux_opt, llm_state: TrainState,
               aux_state: TrainState, frozen: Frozen, corpus_batch: dict, sample_batch: dict):
    """Both updates from the same starting states (the parallel scheme): the LLM trains against the
    auxiliary model as it was, the auxiliary model against the LLM as it was (or the snapshot)."""
    ref = frozen.snapshot if spec.p_ref == "snapshot" else llm_state.params
    new_llm, llm_metrics = llm_step(llm_cfg, aux_cfg, spec, llm_opt, llm_state, aux_state.params, frozen,
                                    corpus_batch, sample_batch)
    new_aux, aux_metrics = aux_step(aux_cfg, llm_cfg, aux_opt, spec.beta, aux_state, ref, sample_batch,
                                    spec.accum_steps, spec.sample_tokens)
    metrics = {**{f"llm/{k}": v for k, v in llm_metrics.items()}, **{f"aux/{k}": v for k, v in aux_metrics.items()},
               "llm/aux_version": aux_state.step.astype(jnp.float32)}  # aux updates behind the LLM's R
    return new_llm, new_aux, metrics


# ------------------------------------------------------------------------------ jitting on a mesh


def frozen_shardings(mesh, llm_cfg: ModelConfig, frozen: Frozen, rules=None) -> Frozen:
    params = shd.param_shardings(mesh, param_logical_axes(llm_cfg), abstract_params(llm_cfg), rules)
    return Frozen(anchor=None if frozen.anchor is None else params,
                  snapshot=None if frozen.snapshot is None else params)


def make_joint_step(llm_cfg, aux_cfg, spec: MethodSpec, llm_opt, aux_opt, mesh, frozen: Frozen,
                    corpus_example: dict, sample_example: dict, rules=None, donate: bool = True):
    """`joint_step` jitted as fn(llm_state, aux_state, frozen, corpus_batch, sample_batch) ->
    (llm_state, aux_state, metrics) with explicit shardings; both states are donated."""

    def traced(llm_state, aux_state, frozen, corpus_batch, sample_batch):
        with shd.use_mesh(mesh, rules):
            return joint_step(llm_cfg, aux_cfg, spec, llm_opt, aux_opt, llm_state, aux_state, frozen,
                              corpus_batch, sample_batch)

    llm_sh = train_state_shardings(mesh, llm_cfg, llm_opt, rules)
    aux_sh = aux_state_shardings(mesh, aux_cfg, aux_opt, rules)
    return jax.jit(traced,
                   in_shardings=(llm_sh, aux_sh, frozen_shardings(mesh, llm_cfg, frozen, rules),
                                 shd.tree_batch_shardings(mesh, corpus_example, rules),
                                 shd.tree_batch_shardings(mesh, sample_example, rules)),
                   out_shardings=(llm_sh, aux_sh, shd.replicated(mesh)),
                   donate_argnums=(0, 1) if donate else ())


def make_llm_step(llm_cfg, aux_cfg, spec: MethodSpec, llm_opt, aux_opt, mesh, frozen: Frozen,
                  corpus_example: dict, sample_example: dict, rules=None):
    """`llm_step` jitted: fn(llm_state, aux_params, frozen, batch, sample_batch) -> (llm_state, metrics)
    (`sample_batch` is read only when `spec.sample_lambda` > 0)."""

    def traced(llm_state, aux_params, frozen, batch, sample_batch):
        with shd.use_mesh(mesh, rules):
            return llm_step(llm_cfg, aux_cfg, spec, llm_opt, llm_state, aux_params, frozen, batch, sample_batch)

    llm_sh = train_state_shardings(mesh, llm_cfg, llm_opt, rules)
    aux_sh = aux_state_shardings(mesh, aux_cfg, aux_opt, rules)
    return jax.jit(traced, in_shardings=(llm_sh, aux_sh.params, frozen_shardings(mesh, llm_cfg, frozen, rules),
                                         shd.tree_batch_shardings(mesh, corpus_example, rules),
                                         shd.tree_batch_shardings(mesh, sample_example, rules)),
                   out_shardings=(llm_sh, shd.replicated(mesh)), donate_argnums=(0,))
