"""Losses of regularized fine-tuning, each a small pure function of arrays.

Shapes: logits [b, s, vocab] (float32), targets / mask [b, s]. Position t's logits predict
targets[t] (callers shift: targets = tokens[:, 1:], logits from tokens[:, :-1]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """−log p(targets | prefix) per position: logsumexp(logits) − logits[target]. [b, s]."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def lm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked mean next-token cross-entropy  L_LM = Σ m_t CE_t / Σ m_t.

    Returns (loss, number of counted tokens). A batch with no counted token has loss 0.
    """
    mask = mask.astype(jnp.float32)
    count = mask.sum()
    return (token_cross_entropy(logits, targets) * mask).sum() / jnp.maximum(count, 1.0), count
