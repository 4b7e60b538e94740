"""Train state and the plain LM (SFT) step: pure functions of pytrees, jitted with shardings.

    state = init_train_state(cfg, params, optimizer)
    step = jit_sharded(functools.partial(sft_step, cfg, optimizer), mesh, cfg, optimizer, batch)
    state, metrics = step(state, batch)

Batches are dicts of [batch, seq] arrays: "tokens" (int32) and "loss_mask" (1 where the next
token is a training target), and for document attention over packed rows "segment_ids" and
"positions" (`models.packed_inputs`; see `train.loop.corpus_keys`). The state is donated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from regft_jax import sharding as shd
from regft_jax.errors import UserInputError
from regft_jax.losses import lm_loss
from regft_jax.models import ModelConfig, abstract_params, forward, lora, packed_inputs, param_logical_axes


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def make_optimizer(learning_rate: float | Callable = 3e-4, *, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, grad_clip: float = 1.0,
                   warmup_steps: int = 0, total_steps: int = 0,
                   only_lora: bool = False) -> optax.GradientTransformation:
    """AdamW with optional global-norm clipping and linear-warmup + cosine schedule. only_lora: the
    LoRA factors alone are updated (clipped by their own norm; no moments and no decay elsewhere)."""
    lr = learning_rate
    if total_steps and not callable(lr):
        lr = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(total_steps, warmup_steps + 1),
                                                end_value=0.1 * lr)
    chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    chain.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    if only_lora:
        return optax.multi_transform({"lora": optax.chain(*chain), "frozen": optax.set_to_zero()}, lora.labels)
    return optax.chain(*chain)


def init_train_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def train_state_shardings(mesh, cfg: ModelConfig, optimizer, rules=None) -> TrainState:
    """Shardings of a TrainState for `cfg`: optimizer moments follow their parameters."""
    abstract = abstract_params(cfg)
    params = shd.param_shardings(mesh, param_logical_axes(cfg), abstract, rules)
    return TrainState(step=shd.replicated(mesh), params=params,
                      opt_state=shd.opt_state_shardings(optimizer, abstract, params, mesh))


def sft_loss(cfg: ModelConfig, params: Any, batch: dict) -> tuple[jax.Array, dict]:
    """Next-token LM loss of a packed batch (tokens [b, s+1] → predict tokens[:, 1:]). With
    "segment_ids" in the batch, attention and RoPE stay within each packed document."""
    tokens = batch["tokens"]
    logits = forward(cfg, params, **packed_inputs(batch))
    loss, count = lm_loss(logits, tokens[:, 1:], batch["loss_mask"][:, 1:])
    return loss, {"lm_loss": loss, "tokens": count}


def guarded_update(state: TrainState, optimizer: optax.GradientTransformation, grads: Any, loss: jax.Array,
                   metrics: dict) -> tuple[TrainState, dict]:
    """Apply `grads` unless the loss or a gradient is NaN/Inf; then the state is kept as it was
    (metrics["skipped"] = 1) so non-finite values never reach the parameters or a checkpoint."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(state: TrainState) -> TrainState:
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return dataclasses.replace(state, step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                   opt_state=opt_state)

    # A branch, not a select between the new and the old state: the select reads every old buffer of the
    # donated state after the update has overwritten it, so XLA copies parameters and moments first
    # (~4% of a CPU SFT step; bench/RESULTS.md).
    new = jax.lax.cond(finite, apply, lambda state: state, state)
    return new, {**metrics, "loss": loss, "grad_norm": grad_norm, "skipped": 1.0 - finite.astype(jnp.float32)}


COUNT_METRICS = ("tokens", "aux_tokens", "aux_weight")  # summed over microbatches; the others are weighted


def target_count(batch: dict) -> jax.Array:
    """The normalizer of `lm_loss` on a packed batch: the number of counted targets Σ loss_mask[:, 1:]."""
    return batch["loss_mask"][:, 1:].astype(jnp.float32).sum()


def accumulated_value_and_grad(objective: Callable, params: Any, batch: dict, accum_steps: int,
                               weight_fn: Callable, key: str = "accum_steps"):
    """`jax.value_and_grad(objective, has_aux=True)(params, batch)` in `accum_steps` microbatches.

    Microbatch j holds the strided rows j::accum_steps of every batch array (so rows of a domain
    that are contiguous in the batch stay contiguous, and each data shard splits locally); a
    `lax.scan` runs them one at a time. With w_j = weight_fn(microbatch j), the normalizer of a
    ratio loss Σ(...)/w, the result is exact: loss = Σ w_j L_j / Σ w_j, grads likewise (weight_fn may
    also be the name of a metric of the objective holding w_j, for normalizers computed inside it). Metrics:
    `COUNT_METRICS` are summed, the others weighted by w_j (exact for ratios over w, a weighted
    mean of per-microbatch ratios otherwise). accum_steps == 1 is the plain call."""
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if accum_steps == 1:
        return grad_fn(params, batch)
    rows = {x.shape[0] for x in jax.tree.leaves(batch)}
    if accum_steps < 1 or any(n % accum_steps for n in rows):
        raise UserInputError(f"{key}={accum_steps}: must be ≥ 1 and divide the batch size {sorted(rows)}")
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, accum_steps, *x.shape[1:]), 0, 1), batch)

    def weighted(mb):
        (loss, metrics), grads = grad_fn(params, mb)
        w = (metrics[weight_fn] if isinstance(weight_fn, str) else weight_fn(mb)).astype(jnp.float32)
        metrics = {k: v if k in COUNT_METRICS else w * v for k, v in metrics.items()}
        return w, w * loss, metrics, jax.tree.map(lambda g: w * g.astype(jnp.float32), grads)

    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                         jax.eval_shape(weighted, jax.tree.map(lambda x: x[0], micro)))
    (w, loss, metrics, grads), _ = jax.lax.scan(lambda acc, mb: (jax.tree.map(jnp.add, acc, weighted(mb)), None),
                                                zeros, micro)
    w = jnp.where(w > 0, w, 1.0)  # no counted target anywhere: every term is 0, like the plain loss
    metrics = {k: v if k in COUNT_METRICS else v / w for k, v in metrics.items()}
    return (loss / w, metrics), jax.tree.map(lambda g, p: (g / w).astype(p.dtype), grads, params)


def sft_step(cfg: ModelConfig, optimizer: optax.GradientTransformation, state: TrainState,
             batch: dict, accum_steps: int = 1) -> tuple[TrainState, dict]:
    """One AdamW step on the LM loss (its gradient accumulated over `accum_steps` microbatches)."""
    (loss, metrics), grads = accumulated_value_and_grad(functools.partial(sft_loss, cfg), state.params, batch,
                                                        accum_steps, target_count)
    return guarded_update(state, optimizer, grads, loss, metrics)


def jit_sharded(step_fn: Callable, mesh, state_shardings: Any, batch_example: Any, *, rules=None,
                donate: bool = True) -> Callable:
    """jit `step_fn(state, batch) -> (state, metrics)` with explicit in/out shardings on `mesh`.

    Activation constraints in model code (`sharding.constrain`) are active while tracing.
    """

    def traced(state, batch):
        with shd.use_mesh(mesh, rules):
            return step_fn(state, batch)

    batch_shardings = shd.tree_batch_shardings(mesh, batch_example, rules)
    return jax.jit(
        traced,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=(0,) if donate else (),
    )
