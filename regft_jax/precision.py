"""Mixed precision: fp32 master parameters with bf16 compute, and a check for updates that round away.

The model keeps storage and compute apart (`ModelConfig.param_dtype` / `dtype`): parameters and the
AdamW moments (which follow them) are stored in `param_dtype`; every matmul casts its weight to `dtype`
inside the forward, so the gradients, the optimizer and the update stay in `param_dtype`. The 7B
configs use `param_dtype="float32"`, `dtype="bfloat16"`.

With narrow parameters the update itself rounds away: bf16 keeps 8 significant bits, so a step of
size lr leaves w unchanged when lr is below half an ulp of w (between |w|·2^-9 and |w|·2^-8); with
lr = 1e-5 a Llama weight of 0.02 never moves. `check_update_precision` measures, on the actual
parameters, the fraction of weights an lr-sized step changes, and refuses a config where more than
1% of them would stay put (`MIN_MOVABLE`); `config.model.allow_bf16_params=True` turns the refusal
into a warning.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from regft_jax.errors import UserInputError

MIN_MOVABLE = 0.99  # refuse when an lr-sized step leaves more than 1% of the weights unchanged
ALLOW_KEY = "model.allow_bf16_params"


class PrecisionError(UserInputError):
    """A config whose parameter dtype would round most optimizer updates away."""


@jax.jit
def _moved_fractions(params: Any, lrs: jax.Array) -> Any:
    """Per leaf and per lr: the fraction of the weights w that change when lr is added to or subtracted
    from them (in float32, rounded back to the leaf's dtype, as `optax.apply_updates` does). A mean,
    not a count: a stacked 40B-model tensor holds more than 2^31 weights."""
    def fraction(w):
        wide = w.astype(jnp.float32)
        step = lrs.reshape((-1,) + (1,) * w.ndim)
        moved = ((wide + step).astype(w.dtype) != w) | ((wide - step).astype(w.dtype) != w)
        return moved.reshape(lrs.shape[0], -1).mean(-1, dtype=jnp.float32)

    return jax.tree.map(fraction, params)


def movable_fraction(params: Any, lrs: Sequence[float]) -> tuple[np.ndarray, np.ndarray, int]:
    """For each lr: the fraction of all weights an update of size lr changes in their own dtype,
    the number of parameter tensors it leaves entirely unchanged, and the weight count."""
    from regft_jax import multihost

    leaves = jax.tree.leaves(params)
    per_leaf = np.stack(multihost.to_host(jax.tree.leaves(_moved_fractions(leaves, jnp.asarray(lrs, jnp.float32)))))
    sizes = np.array([x.size for x in leaves], np.float64)
    return sizes @ per_leaf / sizes.sum(), (per_leaf == 0).sum(0), int(sizes.sum())


def check_update_precision(config, params: Any, lr_keys: Sequence[str]) -> Optional[str]:
    """Refuse (PrecisionError) a run whose parameters are stored in a 16-bit dtype and whose learning
    rates (`lr_keys`, e.g. "method.learning_rate", read from `config`) would leave more than 1% of the
    weights unchanged by a step of that size; with `config.model.allow_bf16_params=True` the message is
    printed as a warning instead. Returns the message (None: nothing to report; fp32 params return at
    once). The aux learning rate is checked against the LLM's parameters (the aux trunk copies them).
    A step of size lr is the peak of AdamW's per-weight update, so this is the generous case."""
    dtypes = {jnp.dtype(x.dtype) for x in jax.tree.leaves(params)}
    if all(jnp.finfo(d).nmant >= 23 for d in dtypes):
        return None
    lrs = []
    for key in lr_keys:
        value = config
        for part in key.split("."):
            value = value[part]
        lrs.append(float(value))
    fractions, frozen_tensors, total = movable_fraction(params, lrs)
    bad = [(k, lr, f, z) for k, lr, f, z in zip(lr_keys, lrs, fractions, frozen_tensors) if f < MIN_MOVABLE]
    if not bad:
        return None
    n_tensors = len(jax.tree.leaves(params))
    moves = "; ".join(f"config.{k}={lr:g} changes only {100 * f:.1f}% of the {total / 1e6:,.1f}M weights "
                      f"({z} of {n_tensors} tensors not at all)" for k, lr, f, z in bad)
    names = "/".join(sorted(str(d) for d in dtypes))
    message = (f"config.model.param_dtype={config.model.param_dtype!r} ({names} parameters): an optimizer step "
               f"of size lr leaves a weight unchanged below half an ulp, so {moves}; use "
               f"--config.model.param_dtype=float32 --config.model.dtype=bfloat16 (fp32 master weights and moments, "
               f"bf16 compute), or --config.{ALLOW_KEY}=True to train anyway")
    if config.model.get("allow_bf16_params", False):
        print(f"warning: {message}", flush=True)
        return message
    raise PrecisionError(message)
