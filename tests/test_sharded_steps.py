"""Sharding-safe steps: the row-sliced extra forwards (anchor logits, z) of the joint step stay sharded
over the batch on 8 devices whatever the domain split, with the same update as one device; dealt
batches put every domain's rows inside its per-shard window (brute force); batch sizes that do not
split over the data-parallel shards are refused with the config keys named."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from regft_jax import sharding
from regft_jax.config_utils import ConfigError
from regft_jax.data.batching import MixtureBatcher, dealt_order
from regft_jax.data.packing import PackedRows
from regft_jax.losses import ANCHOR, CLOSED_FORM, NONE
from regft_jax.models import ModelConfig, init_params
from regft_jax.models.aux import aux_config, init_aux_params
from regft_jax.train import method as method_mod
from regft_jax.train.method import Frozen, MethodSpec, joint_step, make_joint_step
from regft_jax.train.steps import init_train_state

CFG = ModelConfig(family="llama", vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, max_seq_len=64)
ACFG = aux_config(CFG, 1)
B, S, QUOTAS = 16, 8, (10, 6)  # 10 general rows (Ω_keep), 6 toxic (Ω_tox): neither a multiple of 8


def _windows(spec, domain, accum):
    """Brute force: per microbatch (strided rows j::accum), the domain ids inside each kind's window."""
    out = []
    for j in range(accum):
        micro = domain[j::accum]
        for kind in (ANCHOR, CLOSED_FORM):
            lo, hi = spec.microbatch.rows(kind, micro.size)
            inside = np.asarray(sharding.shard_window(jnp.asarray(micro), lo, hi, spec.shards))
            out.append((kind, micro, inside))
    return out


@pytest.mark.parametrize("quotas,kinds", [((10, 6), (ANCHOR, CLOSED_FORM)), ((19, 13), (ANCHOR, CLOSED_FORM)),
                                          ((8, 8), (ANCHOR, CLOSED_FORM)), ((3, 7, 6), (ANCHOR, NONE, CLOSED_FORM)),
                                          ((5, 5, 6), (CLOSED_FORM, ANCHOR, CLOSED_FORM))])
def test_dealt_windows_cover_every_row_of_their_kind(quotas, kinds):
    batch = sum(quotas)
    for shards in (1, 2, 4, 8):
        for accum in (1, 2, 4):
            if batch % (shards * accum):
                continue
            spec = MethodSpec(kinds, (1.0,) * len(kinds), domain_rows=quotas, shards=shards, accum_steps=accum)
            domain = np.repeat(np.arange(len(quotas)), quotas)[dealt_order(batch, shards)]
            for kind, micro, inside in _windows(spec, domain, accum):
                wanted = [d for d, k in enumerate(kinds) if k == kind]
                # every row of the kind is in the window (rows of other domains may be too, then masked)
                assert np.isin(micro, wanted).sum() == np.isin(inside, wanted).sum(), (shards, accum, kind)
                span = np.arange(min(wanted), max(wanted) + 1)  # the domains of the slot range lo..hi-1
                span_rows = np.isin(micro, span).sum()
                if all(e % (shards * accum) == 0 for e in np.cumsum(quotas)):  # aligned: exactly those rows
                    assert inside.size == span_rows and np.isin(inside, span).all()
                assert inside.size <= span_rows + 2 * shards  # else at most one extra row per end and shard


def test_dealt_mixture_batches_hold_the_same_rows_in_shard_blocks():
    rng = np.random.default_rng(0)
    rows = {d: PackedRows(*(rng.integers(0, 50, (n, 6)).astype(np.int32) for _ in range(4)))
            for d, n in (("general", 30), ("toxic", 20))}
    props = {"general": 0.6, "toxic": 0.4}
    plain = MixtureBatcher(rows, props, B, seed=3, shuffle_slots=False).batch(5)
    dealt = MixtureBatcher(rows, props, B, seed=3, shuffle_slots=False, shards=8).batch(5)
    order = dealt_order(B, 8)
    for k in plain:
        np.testing.assert_array_equal(dealt[k], plain[k][order])
    # each shard's block of 2 rows: its general rows, then its toxic rows
    blocks = dealt["domain"].reshape(8, 2)
    assert (np.diff(blocks, axis=1) >= 0).all() and (blocks == 0).sum() == 10


def _setup():
    rng = np.random.default_rng(0)
    params = init_params(CFG, jax.random.key(0))
    aux_params = init_aux_params(ACFG, jax.random.key(2), mean_label=0.7, llm_params=params)
    aux_params["head"]["kernel"] = 0.3 * jax.random.normal(jax.random.key(9), aux_params["head"]["kernel"].shape)
    frozen = Frozen(anchor=init_params(CFG, jax.random.key(1)))
    corpus = {"tokens": rng.integers(0, 61, (B, S + 1)).astype(np.int32),
              "loss_mask": (rng.random((B, S + 1)) < 0.9).astype(np.int32),
              "domain": np.repeat(np.arange(2), QUOTAS).astype(np.int32)}  # contiguous domains
    samples = {"tokens": jnp.asarray(rng.integers(0, 61, (8, 10)), jnp.int32),
               "loss_mask": jnp.asarray([[0] * 4 + [1] * 6] * 8, jnp.int32),
               "attention_mask": jnp.ones((8, 10), jnp.int32),
               "label": jnp.asarray([1.0, 0.0, 1.0, np.nan, 0.2, 0.9, 0.0, 1.0], jnp.float32)}
    method = ml_collections.ConfigDict({"adaptive": True, "lambda_toxic": 2.0, "lambda_keep": 0.5,
                                        "p_ref": "current", "beta": 1.0})
    return params, aux_params, frozen, corpus, samples, method


def _batch_shards_seen(monkeypatch, step, *args) -> list:
    """Compile `step` and return (rows, shards of its batch axis) of every LLM and auxiliary-model
    output inside the objective (the main logits, the anchor logits, z), read from the compiled
    shardings (jax.debug.inspect_array_sharding)."""
    seen = []

    def record(fn):
        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            if out.ndim == 3:  # [rows, seq, vocab]: not the cache-returning calls
                jax.debug.inspect_array_sharding(
                    out, callback=lambda s, n=out.shape: seen.append((n[0], n[0] // s.shard_shape(n)[0])))
            return out
        return wrapped

    monkeypatch.setattr(method_mod, "forward", record(method_mod.forward))
    monkeypatch.setattr(method_mod, "aux_logits", record(method_mod.aux_logits))
    step.lower(*args).compile()
    monkeypatch.undo()
    return seen


def test_anchor_logits_and_z_stay_sharded_on_8_devices(monkeypatch):
    params, aux_params, frozen, corpus, samples, method = _setup()
    opt = optax.sgd(0.5, momentum=0.9)
    llm, aux = init_train_state(params, opt), init_train_state(aux_params, opt)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    assert sharding.batch_shards(mesh) == 8
    contiguous = MethodSpec.from_config(method, (False, True), domain_rows=QUOTAS)
    dealt = MethodSpec.from_config(method, (False, True), domain_rows=QUOTAS, shards=8)
    order = dealt_order(B, 8)
    dealt_corpus = {k: v[order] for k, v in corpus.items()}

    # Before: one global row range per kind (rows 0-9, 10-15) cannot stay sharded 8 ways.
    old = make_joint_step(CFG, ACFG, contiguous, opt, opt, mesh, frozen, corpus, samples, donate=False)
    seen = _batch_shards_seen(monkeypatch, old, llm, aux, frozen, corpus, samples)
    assert (10, 1) in seen and (6, 1) in seen  # the anchor logits and z: replicated on every device

    # Dealt: per-shard windows (anchor: both rows of every shard, z: the toxic row of every shard).
    new = make_joint_step(CFG, ACFG, dealt, opt, opt, mesh, frozen, dealt_corpus, samples, donate=False)
    seen = _batch_shards_seen(monkeypatch, new, llm, aux, frozen, dealt_corpus, samples)
    assert (8, 8) in seen  # z on 8 rows (one per shard)
    assert seen.count((16, 8)) >= 2  # main and anchor logits
    assert all(shards == 8 for _, shards in seen), seen

    # The same update as one device on the contiguous batch (the loss is a sum over rows).
    single = jax.jit(functools.partial(joint_step, CFG, ACFG, contiguous, opt, opt))
    s_llm, s_aux, s_m = single(llm, aux, frozen, jax.tree.map(jnp.asarray, corpus), samples)
    m_llm, m_aux, m_m = new(llm, aux, frozen, dealt_corpus, samples)
    for a, b in zip(jax.tree.leaves((m_llm.params, m_aux.params, m_m)), jax.tree.leaves((s_llm.params, s_aux.params, s_m))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=5e-5)
    assert float(m_m["llm/omega_anchor"]) > 0 and float(m_m["llm/omega_closed_form"]) > 0


def _method_config(**method):
    from configs import tiny

    config = tiny.get_config()
    config.method.update(method)
    return config


@pytest.mark.parametrize("key,value,accum,expected", [
    ("sample_batch_size", 4, 1, "config.method.sample_batch_size=4: expected a multiple of the data-parallel size 8"),
    ("samples_per_iteration", 12, 1, "config.method.samples_per_iteration=12: expected a multiple of the "
                                     "data-parallel size 8"),
    ("batch_size", 8, 2, "config.method.batch_size=8: expected a multiple of the data-parallel size 8 × "
                         "config.method.accum_steps=2 (config.mesh={'data': 2, 'fsdp': 4, 'tensor': 1}: data × fsdp)"),
])
def test_batch_sizes_that_do_not_split_over_the_shards_are_refused(key, value, accum, expected):
    from regft_jax.train.schedules import check_method_config

    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    ok = _method_config(batch_size=16, sample_batch_size=16, samples_per_iteration=64, accum_steps=accum)
    check_method_config(ok, mesh)
    check_method_config(_method_config(**{key: value, "accum_steps": accum}))  # no mesh: no shard check
    with pytest.raises(ConfigError) as e:
        check_method_config(_method_config(**{key: value, "accum_steps": accum}), mesh)
    assert expected in str(e.value)


def test_main_refuses_a_bad_sample_batch_size_before_training():
    from regft_jax.main import _validate

    config = _method_config(sample_batch_size=6)
    config.stage = "detox"  # tiny's mesh: every device (8) on fsdp
    with pytest.raises(ConfigError, match=r"config.method.sample_batch_size=6: expected a multiple of the "
                                          r"data-parallel size 8"):
        _validate(config)
