"""Training the auxiliary model on labeled samples: a pure step, jitted with shardings and donation.

    optimizer = make_optimizer(1e-3)
    state = init_train_state(init_aux_params(aux_cfg, rng, mean_label=0.7), optimizer)
    step = make_aux_step(aux_cfg, llm_cfg, optimizer, beta=1.0, mesh=mesh, batch_example=batch)
    state, metrics = step(state, ref_params, batch)

batch: "tokens" [b, s] int32 (prompt + continuation, left-padded prompts allowed), "loss_mask" [b, s]
(1 where tokens[:, t] is a generated token), "label" [b] float32 C(x) (NaN = unknown, masked),
optional "attention_mask" [b, s] and "proposal_logp" [b]: log proposal(y) of each continuation (the
distribution it was sampled from, up to a constant common to the sample set). With it, each sequence
is weighted by p_ref(y)/proposal(y) (self-normalized), p_ref(y) from the reference logits the step
computes anyway: this corrects tempered or guided sampling and a stale sampling LLM (a top-p
proposal never draws the tokens it cuts: no weight restores those).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from regft_jax import sharding as shd
from regft_jax.losses import aux_loss, importance_weights, sequence_log_prob
from regft_jax.models import ModelConfig, abstract_params, forward, param_logical_axes
from regft_jax.models.aux import aux_abstract_params, aux_logical_axes, aux_logits
from regft_jax.train.steps import TrainState, accumulated_value_and_grad, guarded_update


def aux_objective(aux_cfg: ModelConfig, aux_params: dict, batch: dict, ref_logits: jax.Array,
                  beta: float, from_slot: int = 0) -> tuple[jax.Array, dict]:
    """L_aux of `batch` given the reference LLM's logits on the same tokens ([b, s − from_slot, V]):
    both are taken from slot `from_slot` on, which leaves the loss unchanged when no target lies
    at or before it (loss_mask[:, :from_slot + 1] = 0, see `sample_window`)."""
    tokens, mask = batch["tokens"][:, from_slot:], batch["loss_mask"][:, from_slot:]
    z = aux_logits(aux_cfg, aux_params, batch["tokens"], batch.get("attention_mask"), from_slot=from_slot)
    weights = None
    if "proposal_logp" in batch:
        weights = importance_weights(sequence_log_prob(ref_logits, tokens, mask), batch["proposal_logp"])
    loss, metrics = aux_loss(z, tokens, batch["label"], mask, ref_logits, beta=beta, weights=weights)
    if weights is not None:  # effective sample size of the batch, as a fraction of its valid rows
        w = jnp.where(jnp.isfinite(batch["label"]), weights, 0.0)
        w = w / jnp.maximum(w.max(), 1e-30)  # (w² of unscaled weights can overflow float32)
        metrics["ess"] = w.sum() ** 2 / jnp.maximum((w ** 2).sum() * jnp.isfinite(batch["label"]).sum(), 1e-30)
    return loss, metrics


def sample_window(batch: dict, sample_tokens: Optional[int]) -> int:
    """The first slot whose z the loss reads, for samples = left-padded prompt + the last
    `sample_tokens` columns generated (None: every slot, 0). Slots before it only feed attention,
    so the two vocabulary projections (aux head, p_ref's LM head) skip them."""
    return 0 if sample_tokens is None else max(batch["tokens"].shape[1] - sample_tokens - 1, 0)


def aux_step(aux_cfg: ModelConfig, llm_cfg: ModelConfig, optimizer: optax.GradientTransformation, beta: float,
             state: TrainState, ref_params: Any, batch: dict, accum_steps: int = 1,
             sample_tokens: Optional[int] = None) -> tuple[TrainState, dict]:
    """One optimizer step of the auxiliary model; p_ref = the frozen LLM `ref_params`. The gradient is
    accumulated over `accum_steps` microbatches (exact: each weighted by its normalizer "aux_weight"). `sample_tokens`:
    the batch's last columns that are generated, the rest a prompt without targets (`sample_window`)."""
    start = sample_window(batch, sample_tokens)

    def objective(params, batch):
        ref_logits = jax.lax.stop_gradient(forward(llm_cfg, ref_params, batch["tokens"],
                                                   attention_mask=batch.get("attention_mask"), from_slot=start))
        return aux_objective(aux_cfg, params, batch, ref_logits, beta, start)

    (loss, metrics), grads = accumulated_value_and_grad(objective, state.params, batch, accum_steps,
                                                        "aux_weight")  # Σ_i w m_i, the loss's normalizer
    return guarded_update(state, optimizer, grads, loss, metrics)


def aux_state_shardings(mesh, aux_cfg: ModelConfig, optimizer, rules=None) -> TrainState:
    """Shardings of the aux TrainState (optimizer moments follow their parameters)."""
    abstract = aux_abstract_params(aux_cfg)
    params = shd.param_shardings(mesh, aux_logical_axes(aux_cfg), abstract, rules)
    return TrainState(step=shd.replicated(mesh), params=params,
                      opt_state=shd.opt_state_shardings(optimizer, abstract, params, mesh))


def make_aux_step(aux_cfg: ModelConfig, llm_cfg: ModelConfig, optimizer, beta: float, *, mesh=None,
                  batch_example: Optional[dict] = None, rules=None, donate: bool = True, accum_steps: int = 1,
                  sample_tokens: Optional[int] = None):
    """`aux_step` jitted as fn(state, ref_params, batch) -> (state, metrics), the state donated.
    With a mesh: explicit shardings (state per `aux_state_shardings`, ref params per the LLM's
    logical axes, batch over the data axes; `batch_example` gives the batch's keys and ranks)."""
    step = functools.partial(aux_step, aux_cfg, llm_cfg, optimizer, beta, accum_steps=accum_steps,
                             sample_tokens=sample_tokens)
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)

    def traced(state, ref_params, batch):
        with shd.use_mesh(mesh, rules):
            return step(state, ref_params, batch)

    state_sh = aux_state_shardings(mesh, aux_cfg, optimizer, rules)
    ref_sh = shd.param_shardings(mesh, param_logical_axes(llm_cfg), abstract_params(llm_cfg), rules)
    batch_sh = shd.tree_batch_shardings(mesh, batch_example, rules)
    return jax.jit(traced, in_shardings=(state_sh, ref_sh, batch_sh),
                   out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=donate_argnums)
