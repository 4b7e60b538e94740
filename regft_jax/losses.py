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


# ------------------------------------------------------------------ the closest feasible distribution


def guided_logits(ref_logits: jax.Array, z: jax.Array) -> jax.Array:
    """Unnormalized logits of q = p_ref · R / Σ_u p_ref(u) R(u):  logits_q = logits_ref + log σ(z)."""
    return ref_logits.astype(jnp.float32) + jax.nn.log_sigmoid(z.astype(jnp.float32))


def token_kl(target_logits: jax.Array, logits: jax.Array) -> jax.Array:
    """KL(q ‖ p) = Σ_v q(v) [log q(v) − log p(v)] per position [b, s], with q = softmax(target_logits)
    a fixed target (stop-gradient) and p = softmax(logits). Its gradient w.r.t. `logits` is p − q.
    Entries with q(v) = 0 contribute 0 (so −inf target logits are allowed).

    Computed as Σ_v q(v) (t_v − l_v) − logsumexp(t) + logsumexp(l) (t, l the two logits): log q and
    log p are never materialized, and logsumexp(l) and its gradient p are shared with the LM
    loss's cross-entropy (fewer passes over the vocabulary than two log-softmaxes)."""
    target_logits = jax.lax.stop_gradient(target_logits.astype(jnp.float32))
    logits = logits.astype(jnp.float32)
    lse_q = jax.nn.logsumexp(target_logits, axis=-1)
    q = jnp.exp(target_logits - lse_q[..., None])
    return jnp.where(q > 0, q * (target_logits - logits), 0.0).sum(-1) - lse_q + jax.nn.logsumexp(logits, axis=-1)


def closed_form_regularizer(ref_logits: jax.Array, z: jax.Array, logits: jax.Array) -> jax.Array:
    """Ω_tox(θ; h) = KL(q ‖ p_θ) with q = softmax(logits_ref + log σ(z)) (stop-gradient). [b, s]."""
    return token_kl(guided_logits(ref_logits, z), logits)


def anchor_regularizer(anchor_logits: jax.Array, logits: jax.Array) -> jax.Array:
    """Ω_keep(θ; h) = KL(p_anchor ‖ p_θ) (stop-gradient on the anchor): prevents forgetting. [b, s]."""
    return token_kl(anchor_logits, logits)


# ------------------------------------------------------------------------ the auxiliary model's loss


def bce_with_logits(z: jax.Array, label: jax.Array) -> jax.Array:
    """BCE(z, c) = −c log σ(z) − (1 − c) log σ(−z) = softplus(z) − c·z, on the LOGIT z (R = σ(z) can
    reach any value in (0, 1); BCE on log σ(z) would cap R at 0.5)."""
    return jax.nn.softplus(z) - label * z


def bernoulli_kl(log_a, log1m_a, log_b, log1m_b) -> jax.Array:
    """KL_Bern(a ‖ b) = a log(a/b) + (1 − a) log((1 − a)/(1 − b)), from logs of a, 1 − a, b, 1 − b."""
    return jnp.exp(log_a) * (log_a - log_b) + jnp.exp(log1m_a) * (log1m_a - log1m_b)


def lookahead_log_r(ref_logits: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log and log(1 −) of  R̄(h) = Σ_v p_ref(v|h) R(h, v)  (the one-step expectation), [b, s] each:
    log R̄ = logsumexp(logits_ref + log σ(z)) − logsumexp(logits_ref), same with log σ(−z)."""
    ref_logits, z = ref_logits.astype(jnp.float32), z.astype(jnp.float32)
    log_norm = jax.nn.logsumexp(ref_logits, axis=-1)
    log_r = jax.nn.log_sigmoid(z)  # and log σ(−z) = log σ(z) − z
    return (jax.nn.logsumexp(ref_logits + log_r, axis=-1) - log_norm,
            jax.nn.logsumexp(ref_logits + log_r - z, axis=-1) - log_norm)


def sequence_log_prob(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """log p(y) = Σ_t m_t log softmax(logits[:, t−1])[tokens[:, t]] per row [b]: the log-probability of
    the tokens marked by `mask` (unshifted inputs, like `aux_loss`: logits at slot t are read after
    tokens[:, :t+1])."""
    m = mask[:, 1:].astype(jnp.float32)
    return -(token_cross_entropy(logits[:, :-1], tokens[:, 1:]) * m).sum(-1)


MAX_LOG_WEIGHT = 60.0  # |log w| beyond this is clipped (exp(60) ≈ 1e26 keeps float32 sums finite)


def importance_weights(ref_log_prob: jax.Array, proposal_log_prob: jax.Array) -> jax.Array:
    """w(y) = p_ref(y) / proposal(y) per sequence [b], from the two sequence log-probs; the proposal's
    may carry any constant common to the sample set (the weights are self-normalized where they are
    used, see `aux_loss`). Log weights are clipped to ±MAX_LOG_WEIGHT; a stop-gradient constant."""
    log_w = jax.lax.stop_gradient(ref_log_prob - proposal_log_prob).astype(jnp.float32)
    return jnp.exp(jnp.clip(log_w, -MAX_LOG_WEIGHT, MAX_LOG_WEIGHT))


def aux_slot_weights(labels: jax.Array, mask: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """w m_i [b, s−1]: the weight of each target slot of `aux_loss` (0 on prompt, padding and rows
    whose label is unknown); its sum is the loss's normalizer."""
    w = jnp.where(jnp.isfinite(labels), 1.0 if weights is None else weights, 0.0).astype(jnp.float32)
    return mask[:, 1:].astype(jnp.float32) * w[:, None]


def aux_loss(z: jax.Array, tokens: jax.Array, labels: jax.Array, mask: jax.Array, ref_logits: jax.Array, *,
             beta: float, weights: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """L_aux = Σ_i w m_i BCE(z(h_{i−1})[y_i], c) + β Σ_i w m_i m_{i+1} KL_Bern(R(h_{i−1}, y_i) ‖ R̄(h_i)),
    divided by Σ_i w m_i, with R̄(h) = Σ_v p_ref(v|h) R(h, v) (see `lookahead_log_r`).

    Unshifted inputs (unlike `lm_loss`): z [b, s, V] and ref_logits [b, s, V] at slot t are read
    after tokens[:, :t+1]; mask [b, s] is 1 where tokens[:, t] is a generated token (t ≥ 1; the
    prompt and padding are 0); labels [b] = C(x) ∈ [0, 1], NaN = unknown (the row is masked).
    Consistency applies where the continuation goes on (m_i m_{i+1}); the last token's R is the
    label itself. Its lookahead side R̄(h_i) is a stop-gradient target (TD-style bootstrapping, as
    the BCE labels each slot directly): the term pulls the estimate at the shorter prefix toward
    the expectation one step later, never the other way.
    weights [b] (optional): importance ratios p_ref(y)/proposal(y) of each sequence, up to a
    common factor — they are self-normalized (Σ w m appears in both numerator and denominator).
    Returns (loss, metrics). A batch without any valid target gives loss 0.
    """
    valid = jnp.isfinite(labels)
    label = jnp.where(valid, labels, 0.0).astype(jnp.float32)
    m = aux_slot_weights(labels, mask, weights)  # weight of target slot t (= 1..s-1)
    m_next = jnp.pad(mask[:, 2:].astype(jnp.float32), ((0, 0), (0, 1)))
    z = z.astype(jnp.float32)
    z_y = jnp.take_along_axis(z[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]  # z(h_{t−1})[y_t]
    bce = bce_with_logits(z_y, label[:, None])
    log_b, log1m_b = jax.lax.stop_gradient(lookahead_log_r(ref_logits[:, 1:], z[:, 1:]))
    kl = bernoulli_kl(jax.nn.log_sigmoid(z_y), jax.nn.log_sigmoid(-z_y), log_b, log1m_b)
    total = m.sum()
    denom = jnp.where(total > 0, total, 1.0)
    bce_term = jnp.where(m > 0, m * bce, 0.0).sum() / denom
    consistency = jnp.where(m * m_next > 0, m * kl, 0.0).sum() / denom
    loss = bce_term + beta * consistency
    metrics = {"aux_loss": loss, "aux_bce": bce_term, "aux_consistency": consistency,
               "mean_R": (m * jax.nn.sigmoid(z_y)).sum() / denom,
               "mean_label": (m * label[:, None]).sum() / denom,
               "aux_tokens": (mask[:, 1:] * valid[:, None]).sum().astype(jnp.float32), "aux_weight": total}
    return loss, metrics


# ---------------------------------------------------------------------- the LLM's training objective

CLOSED_FORM, ANCHOR, NONE = "closed_form", "anchor", "none"


def domain_regularizers(adaptive: bool, toxic: tuple[bool, ...], lam_tox: float,
                        lam_keep: float) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """(kinds, lambdas) per domain id. Adaptive: toxic domains → (closed form, λ_tox), the others →
    (anchor KL, λ_keep). Not adaptive: closed form with λ_tox everywhere."""
    if not adaptive:
        return (CLOSED_FORM,) * len(toxic), (lam_tox,) * len(toxic)
    return (tuple(CLOSED_FORM if t else ANCHOR for t in toxic),
            tuple(lam_tox if t else lam_keep for t in toxic))


def regularized_lm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array, domains: jax.Array, *,
                        kinds: tuple[str, ...], lambdas, ref_logits: jax.Array | None = None,
                        z: jax.Array | None = None, anchor_logits: jax.Array | None = None,
                        reg_mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """L = L_LM + Σ_{b,t} r_bt λ_{d_b} Ω_{d_b}(θ; h_bt) / Σ r, with L_LM = `lm_loss` (mean over mask).

    Shifted like `lm_loss`: logits [b, s, V] at t predict targets[:, t]; ref_logits, z and
    anchor_logits are taken at the same prefixes. domains [b] int: the domain id of each row;
    kinds[d] ∈ {"closed_form" (Ω = KL(q ‖ p_θ), needs ref_logits and z), "anchor" (Ω = KL(p_anchor ‖
    p_θ), needs anchor_logits), "none"} and lambdas[d] give each domain's regularizer and weight
    (see `domain_regularizers`). reg_mask [b, s] (default: mask) marks the prefixes where Ω is
    applied. Returns (loss, metrics: lm_loss, reg_loss, omega_<kind> = mean Ω where that kind
    applies, tokens); empty masks give zeros, never NaN.
    """
    unknown = set(kinds) - {CLOSED_FORM, ANCHOR, NONE}
    if unknown:
        raise ValueError(f"regularized_lm_loss: unknown regularizer kinds {sorted(unknown)}")
    if len(lambdas) != len(kinds):
        raise ValueError(f"regularized_lm_loss: {len(kinds)} kinds but {len(lambdas)} lambdas")
    if CLOSED_FORM in kinds and (ref_logits is None or z is None):
        raise ValueError("regularized_lm_loss: a closed_form domain needs ref_logits and z")
    if ANCHOR in kinds and anchor_logits is None:
        raise ValueError("regularized_lm_loss: an anchor domain needs anchor_logits")
    lm, count = lm_loss(logits, targets, mask)
    r = (mask if reg_mask is None else reg_mask).astype(jnp.float32)
    kind_of_row = {k: jnp.asarray([kk == k for kk in kinds])[domains] for k in (CLOSED_FORM, ANCHOR)}
    lam = jnp.asarray(lambdas, jnp.float32)[domains]
    # One KL per position: select each row's target distribution first.
    target = None
    if CLOSED_FORM in kinds:
        target = guided_logits(ref_logits, z)
    if ANCHOR in kinds:
        anchor = anchor_logits.astype(jnp.float32)
        target = anchor if target is None else jnp.where(kind_of_row[ANCHOR][:, None, None], anchor, target)
    reg = jnp.zeros((), jnp.float32)
    metrics = {"lm_loss": lm, "tokens": count, f"omega_{CLOSED_FORM}": reg, f"omega_{ANCHOR}": reg}
    if target is not None:
        omega = token_kl(target, logits)
        applied = r * (kind_of_row[CLOSED_FORM] | kind_of_row[ANCHOR])[:, None]
        omega = jnp.where(applied > 0, omega, 0.0)
        reg = (lam[:, None] * applied * omega).sum() / jnp.maximum(r.sum(), 1.0)
        for k in (CLOSED_FORM, ANCHOR):
            rk = r * kind_of_row[k][:, None]
            metrics[f"omega_{k}"] = (rk * omega).sum() / jnp.maximum(rk.sum(), 1.0)
    metrics["reg_loss"] = reg
    return lm + reg, metrics


# ------------------------------------------------------- policy-gradient and preference baselines (RL, DPO)


def rloo_advantages(rewards: jax.Array) -> jax.Array:
    """REINFORCE leave-one-out advantages of k samples per prompt, rewards [P, k] → [P, k]:

        A_i = r_i − (1 / (n − 1)) Σ_{j ≠ i} r_j      (n = the prompt's known rewards)

    so the advantages of each prompt sum to 0. NaN = unknown (an oracle failure): that sample gets
    A = 0 and is left out of the others' baselines; a prompt with fewer than 2 known rewards gets 0.
    A stop-gradient constant."""
    rewards = jax.lax.stop_gradient(rewards).astype(jnp.float32)
    valid = jnp.isfinite(rewards)
    r = jnp.where(valid, rewards, 0.0)
    n = valid.sum(-1, keepdims=True)
    others = (r.sum(-1, keepdims=True) - r) / jnp.maximum(n - 1, 1)
    return jnp.where(valid & (n >= 2), r - others, 0.0)


def policy_gradient_loss(seq_log_prob: jax.Array, advantages: jax.Array) -> jax.Array:
    """The REINFORCE surrogate  L = −(1/n) Σ_i A_i log p_θ(y_i)  over n sampled sequences [n]; its gradient
    is the policy-gradient estimate −(1/n) Σ_i A_i ∇ log p_θ(y_i) (the advantages are constants)."""
    a = jax.lax.stop_gradient(advantages).astype(jnp.float32)
    return -(a * seq_log_prob.astype(jnp.float32)).mean()


def policy_kl(logits: jax.Array, ref_logits: jax.Array) -> jax.Array:
    """KL(p_θ ‖ p_ref) = Σ_v p_θ(v) [log p_θ(v) − log p_ref(v)] per position [b, s], exact over the
    vocabulary, with p_ref = softmax(ref_logits) fixed (stop-gradient) and the gradient through p_θ =
    softmax(logits) (the first argument, unlike `token_kl`): ∂KL/∂logits_u = p_θ(u) [log p_θ(u) −
    log p_ref(u) − KL]. Finite logits."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    log_ref = jax.nn.log_softmax(jax.lax.stop_gradient(ref_logits).astype(jnp.float32), axis=-1)
    return (jnp.exp(log_p) * (log_p - log_ref)).sum(-1)


def dpo_loss(policy_chosen_logp: jax.Array, policy_rejected_logp: jax.Array, ref_chosen_logp: jax.Array,
             ref_rejected_logp: jax.Array, beta: float, weights: jax.Array | None = None) -> jax.Array:
    """Direct preference optimization over pairs [n] (sequence log-probs of the chosen and rejected
    continuations under the policy and the reference):

        L = mean −log σ(β [(π_c − ref_c) − (π_r − ref_r)])

    (−log σ(x) = softplus(−x), stable). weights [n] (optional, e.g. 0 = no pair): Σ w ℓ / Σ w (0 when
    Σ w = 0). The reference log-probs are constants."""
    ref_margin = jax.lax.stop_gradient(ref_chosen_logp - ref_rejected_logp).astype(jnp.float32)
    margin = beta * ((policy_chosen_logp - policy_rejected_logp).astype(jnp.float32) - ref_margin)
    losses = jax.nn.softplus(-margin)
    if weights is None:
        return losses.mean()
    w = weights.astype(jnp.float32)
    total = w.sum()
    return jnp.where(total > 0, (w * losses).sum() / jnp.where(total > 0, total, 1.0), 0.0)
