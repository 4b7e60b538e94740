"""The method's formulas (losses.py) vs brute-force numpy, autodiff vs closed-form gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regft_jax import losses

V = 7


def _rand(shape, seed, scale=2.0):
    return (scale * np.random.RandomState(seed).randn(*shape)).astype(np.float32)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, np.float64)))


# ------------------------------------------------------------------------------ regularizers


def test_closed_form_kl_equals_brute_force():
    ref, z, logits = _rand((2, 3, V), 0), _rand((2, 3, V), 1), _rand((2, 3, V), 2)
    got = np.asarray(losses.closed_form_regularizer(ref, z, logits))
    for b in range(2):
        for t in range(3):
            p_ref, p = _softmax(ref[b, t].astype(np.float64)), _softmax(logits[b, t].astype(np.float64))
            q = np.array([p_ref[v] * _sigmoid(z[b, t, v]) for v in range(V)])
            q /= q.sum()
            kl = sum(q[v] * (np.log(q[v]) - np.log(p[v])) for v in range(V))
            np.testing.assert_allclose(got[b, t], kl, rtol=1e-5, atol=1e-6)
    # guided logits are q's logits up to a constant
    np.testing.assert_allclose(jax.nn.softmax(losses.guided_logits(ref, z)),
                               _softmax(ref + np.log(_sigmoid(z))), atol=1e-6)


def test_constant_R_gives_q_equal_p_ref_and_no_regularization():
    ref = _rand((2, 4, V), 3)
    z = np.full((2, 4, V), 0.7, np.float32) + np.arange(8, dtype=np.float32).reshape(2, 4, 1)  # constant over v
    np.testing.assert_allclose(jax.nn.softmax(losses.guided_logits(ref, z)), jax.nn.softmax(ref), atol=1e-6)
    omega, grad = jax.value_and_grad(lambda l: losses.closed_form_regularizer(ref, z, l).sum())(jnp.asarray(ref))
    assert abs(float(omega)) < 1e-5
    np.testing.assert_allclose(grad, 0.0, atol=1e-6)


@pytest.mark.parametrize("which", ["closed_form", "anchor"])
def test_gradient_is_p_theta_minus_q(which):
    ref, z, logits = _rand((2, 3, V), 4), _rand((2, 3, V), 5), _rand((2, 3, V), 6)
    if which == "closed_form":
        fn = lambda l: losses.closed_form_regularizer(ref, z, l)
        q = _softmax(ref + np.log(_sigmoid(z)))
    else:
        fn = lambda l: losses.anchor_regularizer(ref, l)
        q = _softmax(ref.astype(np.float64))
        kl = (q * (np.log(q) - np.log(_softmax(logits.astype(np.float64))))).sum(-1)
        np.testing.assert_allclose(fn(logits), kl, rtol=1e-5, atol=1e-6)
    total = lambda l: fn(l).sum()
    grad = np.asarray(jax.grad(total)(jnp.asarray(logits)))
    np.testing.assert_allclose(grad, _softmax(logits.astype(np.float64)) - q, atol=1e-6)
    # finite differences (central, float32) on a few coordinates
    eps = 1e-2
    for idx in [(0, 0, 0), (1, 2, 3), (0, 1, 6)]:
        bump = np.zeros_like(logits)
        bump[idx] = eps
        fd = (float(total(logits + bump)) - float(total(logits - bump))) / (2 * eps)
        assert abs(fd - grad[idx]) < 2e-3
    # no gradient flows into the target
    g_target = jax.grad(lambda r: losses.anchor_regularizer(r, logits).sum())(jnp.asarray(ref))
    np.testing.assert_allclose(g_target, 0.0)


def test_token_kl_tolerates_zero_target_probabilities():
    target = np.array([[[0.0, -np.inf, 1.0]]], np.float32)
    logits = np.array([[[0.5, 0.1, -0.3]]], np.float32)
    kl, g = jax.value_and_grad(lambda l: losses.token_kl(target, l).sum())(jnp.asarray(logits))
    q = _softmax(np.array([0.0, -1e30, 1.0]))
    p = _softmax(logits[0, 0].astype(np.float64))
    np.testing.assert_allclose(kl, (q[[0, 2]] * np.log(q[[0, 2]] / p[[0, 2]])).sum(), rtol=1e-5)
    assert np.all(np.isfinite(g))


# ---------------------------------------------------------------------------------- aux loss


def _aux_inputs(b=3, s=6, seed=0):
    rng = np.random.RandomState(seed)
    z, ref = _rand((b, s, V), seed + 10), _rand((b, s, V), seed + 11)
    tokens = rng.randint(0, V, (b, s)).astype(np.int32)
    mask = np.zeros((b, s), np.int32)
    mask[0, 2:] = 1  # prompt of 2
    mask[1, 1:4] = 1  # ends early (EOS at 3, then padding)
    mask[2, 3:5] = 1
    labels = np.array([0.9, 0.0, 0.4], np.float32)
    return z, tokens, labels, mask, ref


def _manual_aux(z, tokens, labels, mask, ref, beta, weights=None):
    b, s, _ = z.shape
    w = np.ones(b) if weights is None else np.asarray(weights, np.float64)
    bce = kl = den = 0.0
    for i in range(b):
        if not np.isfinite(labels[i]):
            continue
        c = float(labels[i])
        for t in range(1, s):
            if not mask[i, t]:
                continue
            a = _sigmoid(z[i, t - 1, tokens[i, t]])
            bce += w[i] * -(c * np.log(a) + (1 - c) * np.log(1 - a))
            den += w[i]
            if t + 1 < s and mask[i, t + 1]:
                nxt = (_softmax(ref[i, t].astype(np.float64)) * _sigmoid(z[i, t])).sum()
                kl += w[i] * (a * np.log(a / nxt) + (1 - a) * np.log((1 - a) / (1 - nxt)))
    return (bce + beta * kl) / den, bce / den, kl / den


def test_aux_loss_matches_manual_bce_and_consistency():
    z, tokens, labels, mask, ref = _aux_inputs()
    for beta in (0.0, 0.5):
        loss, m = losses.aux_loss(z, tokens, labels, mask, ref, beta=beta)
        total, bce, kl = _manual_aux(z, tokens, labels, mask, ref, beta)
        np.testing.assert_allclose(loss, total, rtol=1e-5)
        np.testing.assert_allclose(m["aux_bce"], bce, rtol=1e-5)
        np.testing.assert_allclose(m["aux_consistency"], kl, rtol=1e-5)
        assert float(m["aux_tokens"]) == mask[:, 1:].sum()


def test_consistency_lookahead_side_is_a_stop_gradient_target():
    z, tokens, labels, mask, ref = _aux_inputs()
    g = jax.grad(lambda z: losses.aux_loss(z, tokens, labels, mask, ref, beta=1.0)[1]["aux_consistency"])(
        jnp.asarray(z))
    g = np.asarray(g)
    # the consistency term only moves z(h_{t−1})[y_t] (a single vocabulary entry per slot)
    assert np.count_nonzero(g[0, 2]) == 1 and g[0, 2, tokens[0, 3]] != 0
    assert np.count_nonzero(g[0, 5]) == 0  # the last slot is only ever a lookahead


def test_aux_bce_on_logits_can_push_R_above_one_half():
    """Training z on all-positive labels drives R = σ(z[y]) toward 1 (BCE on log σ(z) caps it at 0.5)."""
    _, tokens, _, mask, ref = _aux_inputs()
    labels = np.ones(3, np.float32)
    grad = jax.jit(jax.grad(lambda z: losses.aux_loss(z, tokens, labels, mask, ref, beta=0.0)[0]))
    z = jnp.zeros((3, 6, V))
    for _ in range(200):
        z = z - 5.0 * grad(z)
    _, m = losses.aux_loss(z, tokens, labels, mask, ref, beta=0.0)
    assert float(m["mean_R"]) > 0.9


def test_aux_importance_weights_are_self_normalized():
    z, tokens, labels, mask, ref = _aux_inputs()
    w = np.array([0.5, 2.0, 1.5], np.float32)
    loss, _ = losses.aux_loss(z, tokens, labels, mask, ref, beta=0.7, weights=w)
    np.testing.assert_allclose(loss, _manual_aux(z, tokens, labels, mask, ref, 0.7, w)[0], rtol=1e-5)
    scaled, _ = losses.aux_loss(z, tokens, labels, mask, ref, beta=0.7, weights=1e3 * w)
    np.testing.assert_allclose(scaled, loss, rtol=1e-5)
    # weight 2 == the row duplicated
    dup = lambda a: np.concatenate([a, a[:1]])
    w2, _ = losses.aux_loss(z, tokens, labels, mask, ref, beta=0.7, weights=np.array([2, 1, 1], np.float32))
    d, _ = losses.aux_loss(dup(z), dup(tokens), dup(labels), dup(mask), dup(ref), beta=0.7)
    np.testing.assert_allclose(w2, d, rtol=1e-5)


def test_aux_nan_labels_are_masked_and_empty_batches_are_finite():
    z, tokens, labels, mask, ref = _aux_inputs()
    nan_labels = labels.copy()
    nan_labels[1] = np.nan
    fn = lambda z, lab, m: losses.aux_loss(z, tokens, lab, m, ref, beta=1.0, weights=np.ones(3, np.float32))
    (loss, metrics), g = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(z), nan_labels, mask)
    keep = [0, 2]
    expected = _manual_aux(z[keep], tokens[keep], labels[keep], mask[keep], ref[keep], 1.0)[0]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[1] == 0)
    assert float(metrics["aux_tokens"]) == mask[keep, 1:].sum()
    for lab, m in [(np.full(3, np.nan, np.float32), mask), (labels, np.zeros_like(mask))]:
        (loss, metrics), g = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(z), lab, m)
        assert float(loss) == 0.0 and np.all(np.asarray(g) == 0)
        assert all(np.isfinite(float(v)) for v in metrics.values())


# --------------------------------------------------------------------- regularized LM objective


def _lm_inputs(b=4, s=5, seed=0):
    rng = np.random.RandomState(seed)
    logits, ref, z, anchor = (_rand((b, s, V), seed + k) for k in range(20, 24))
    targets = rng.randint(0, V, (b, s)).astype(np.int32)
    mask = (rng.rand(b, s) > 0.3).astype(np.int32)
    domains = np.array([0, 1, 1, 0], np.int32)  # 0 = toxic, 1 = general
    return logits, targets, mask, domains, ref, z, anchor


def test_domain_regularizers_adaptive_and_not():
    assert losses.domain_regularizers(True, (True, False), 0.5, 0.1) == (("closed_form", "anchor"), (0.5, 0.1))
    assert losses.domain_regularizers(False, (True, False), 0.5, 0.1) == (("closed_form",) * 2, (0.5, 0.5))


@pytest.mark.parametrize("adaptive", [True, False])
def test_regularized_lm_loss_per_domain(adaptive):
    logits, targets, mask, domains, ref, z, anchor = _lm_inputs()
    kinds, lambdas = losses.domain_regularizers(adaptive, (True, False), 0.5, 0.1)
    loss, m = losses.regularized_lm_loss(logits, targets, mask, domains, kinds=kinds, lambdas=lambdas,
                                         ref_logits=ref, z=z, anchor_logits=anchor)
    lm, _ = losses.lm_loss(logits, targets, mask)
    cf = np.asarray(losses.closed_form_regularizer(ref, z, logits))
    an = np.asarray(losses.anchor_regularizer(anchor, logits))
    omega = np.where((np.array(kinds)[domains] == "anchor")[:, None], an, cf)
    lam = np.array(lambdas)[domains][:, None]
    expected = float(lm) + (lam * mask * omega).sum() / mask.sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(m["lm_loss"], lm, rtol=1e-6)
    np.testing.assert_allclose(m["reg_loss"], expected - float(lm), rtol=1e-5)
    tox = mask * (domains == 0)[:, None]
    np.testing.assert_allclose(m["omega_closed_form"],
                               (tox * cf).sum() / tox.sum() if adaptive else (mask * cf).sum() / mask.sum(),
                               rtol=1e-5)
    if adaptive:
        gen = mask * (domains == 1)[:, None]
        np.testing.assert_allclose(m["omega_anchor"], (gen * an).sum() / gen.sum(), rtol=1e-5)
    # gradient of the regularizer part: λ_d r (p_θ − target) / Σ r
    g = jax.grad(lambda l: losses.regularized_lm_loss(l, targets, mask, domains, kinds=kinds, lambdas=lambdas,
                                                      ref_logits=ref, z=z, anchor_logits=anchor)[1]["reg_loss"])(
        jnp.asarray(logits))
    anchor_rows = (np.array(kinds)[domains] == "anchor")[:, None, None]
    q = np.where(anchor_rows, _softmax(anchor.astype(np.float64)), _softmax(ref + np.log(_sigmoid(z))))
    np.testing.assert_allclose(g, lam[..., None] * mask[..., None] * (_softmax(logits.astype(np.float64)) - q)
                               / mask.sum(), atol=1e-6)


def test_regularized_lm_loss_reg_mask_none_kind_and_empty_batches():
    logits, targets, mask, domains, ref, z, anchor = _lm_inputs()
    reg_mask = np.ones_like(mask)
    loss, m = losses.regularized_lm_loss(logits, targets, mask, domains, kinds=("closed_form", "none"),
                                         lambdas=(1.0, 7.0), ref_logits=ref, z=z, reg_mask=reg_mask)
    cf = np.asarray(losses.closed_form_regularizer(ref, z, logits))
    np.testing.assert_allclose(m["reg_loss"], (cf * (domains == 0)[:, None]).sum() / reg_mask.sum(), rtol=1e-5)
    assert float(m["omega_anchor"]) == 0.0
    empty = np.zeros_like(mask)
    fn = lambda l: losses.regularized_lm_loss(l, targets, empty, domains, kinds=("closed_form", "anchor"),
                                              lambdas=(1.0, 1.0), ref_logits=ref, z=z, anchor_logits=anchor)
    (loss, m), g = jax.value_and_grad(fn, has_aux=True)(jnp.asarray(logits))
    assert float(loss) == 0.0 and np.all(np.asarray(g) == 0)
    assert all(np.isfinite(float(v)) for v in m.values())
    no_rows = [a[:0] for a in (logits, targets, mask, domains, ref, z)]
    loss, m = losses.regularized_lm_loss(*no_rows[:4], kinds=("closed_form", "none"), lambdas=(1.0, 1.0),
                                         ref_logits=no_rows[4], z=no_rows[5])
    assert float(loss) == 0.0
    with pytest.raises(ValueError, match="unknown regularizer kinds"):
        losses.regularized_lm_loss(logits, targets, mask, domains, kinds=("closed", "none"), lambdas=(1, 1))
    with pytest.raises(ValueError, match="needs anchor_logits"):
        losses.regularized_lm_loss(logits, targets, mask, domains, kinds=("closed_form", "anchor"),
                                   lambdas=(1, 1), ref_logits=ref, z=z)
