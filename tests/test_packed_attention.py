"""Document attention on packed rows: each packed document is computed exactly as if alone."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ml_collections

from regft_jax import models, sharding
from regft_jax.data.batching import MixtureBatcher
from regft_jax.data.packing import pack_documents
from regft_jax.eval.perplexity import perplexity
from regft_jax.models.aux import aux_config, init_aux_params
from regft_jax.models.aux import aux_logits as _aux_logits
from regft_jax.train.base_model import train_lm
from regft_jax.train.loop import corpus_keys
from regft_jax.train.steps import sft_loss

V, PAD, BOS, EOS = 64, 0, 1, 2
LLAMA = models.ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                           head_dim=8, mlp_dim=48, init_std=0.1, max_seq_len=64)
FALCON = models.ModelConfig(family="falcon", vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                            num_kv_heads=1, head_dim=8, mlp_dim=64, norm="layer", activation="gelu",
                            parallel_block=True, num_block_norms=1, qkv_layout="falcon_mqa",
                            tie_embeddings=True, init_std=0.1, max_seq_len=64)
CONFIGS = {"llama": LLAMA, "falcon": FALCON}
forward = jax.jit(models.forward, static_argnums=0)
aux_logits = jax.jit(_aux_logits, static_argnums=0, static_argnames="from_slot")


@functools.lru_cache(maxsize=None)
def _params(family):
    return jax.jit(models.init_params, static_argnums=0)(CONFIGS[family], jax.random.key(0))


def _rows(seq_len=12, lengths=(4, 4, 2, 2, 6, 2, 2, 4)):
    """Packed rows with several documents per row, one spanning rows (the 6), and a padded last row.
    Every piece has 4 or 6 tokens (with BOS/EOS), so the documents alone compile only two shapes."""
    rng = np.random.RandomState(0)
    docs = [rng.randint(3, V, n) for n in lengths]
    return pack_documents(docs, seq_len, pad_id=PAD, bos_id=BOS, eos_id=EOS)


def _pieces(rows):
    """(row, slots) of every document piece of every row (the tokens of one segment)."""
    for r in range(rows.num_rows):
        for k in range(1, rows.segment_ids[r].max() + 1):
            yield r, np.nonzero(rows.segment_ids[r] == k)[0]


def test_rows_have_several_documents_per_row():
    rows = _rows()
    assert rows.num_rows == 4 and (rows.segment_ids.max(1) >= 3).any() and (rows.segment_ids[-1] == 0).any()
    assert rows.segment_ids[1, -1] == 3 and rows.segment_ids[2, 0] == 1  # a document continues in the next row
    np.testing.assert_array_equal(models.segment_positions(jnp.asarray(rows.segment_ids)), rows.positions)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_packed_logits_equal_each_document_alone(family):
    cfg = CONFIGS[family]
    params = _params(family)
    rows = _rows()
    tokens, seg = rows.tokens, rows.segment_ids
    packed = np.asarray(forward(cfg, params, tokens, segment_ids=seg))
    explicit = np.asarray(forward(cfg, params, tokens, segment_ids=seg, positions=rows.positions))
    np.testing.assert_array_equal(packed, explicit)  # default positions = the rows' per-segment positions
    stream = np.asarray(forward(cfg, params, tokens))
    for r, slots in _pieces(rows):
        alone = np.asarray(forward(cfg, params, tokens[r:r + 1, slots]))[0]
        np.testing.assert_allclose(packed[r, slots], alone, atol=1e-5, rtol=0)
        if slots[0] > 0:  # without segment_ids a later document attends the earlier ones
            assert np.abs(stream[r, slots] - alone).max() > 1e-3


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_aux_logits_per_document(family):
    acfg = aux_config(CONFIGS[family], num_layers=1)
    aux = init_aux_params(acfg, jax.random.key(1), mean_label=0.5)
    aux["head"]["kernel"] = 0.3 * jax.random.normal(jax.random.key(2), aux["head"]["kernel"].shape)
    rows = _rows()
    tokens, seg, pos = rows.tokens, rows.segment_ids, rows.positions
    z = np.asarray(aux_logits(acfg, aux, tokens, segment_ids=seg, positions=pos))
    stream = np.asarray(aux_logits(acfg, aux, tokens))
    differs = False
    for r, slots in _pieces(rows):
        alone = np.asarray(aux_logits(acfg, aux, tokens[r:r + 1, slots]))[0]
        np.testing.assert_allclose(z[r, slots], alone, atol=1e-5, rtol=0)
        differs |= slots[0] > 0 and np.abs(stream[r, slots] - alone).max() > 1e-3
    assert differs
    # the same through packed_inputs (input slicing of a [b, s+1] corpus batch) and from_slot
    x = models.packed_inputs(rows.take(np.arange(rows.num_rows)), True)
    real = rows.segment_ids[:, 3:-1] > 0  # (padding queries attend no key: their output is arbitrary)
    np.testing.assert_allclose(np.asarray(aux_logits(acfg, aux, x.pop("input_ids"), from_slot=3, **x))[real],
                               z[:, 3:-1][real], atol=1e-6, rtol=0)


def _piece_nll(cfg, params, rows):
    """Σ NLL and count of the counted targets of every document piece, each computed alone."""
    nll, count = 0.0, 0
    for r, slots in _pieces(rows):
        piece, mask = rows.tokens[r, slots], rows.loss_mask[r, slots]
        if piece.size < 2:
            continue
        logp = jax.nn.log_softmax(forward(cfg, params, piece[None])[0, :-1])  # shapes as above
        for t in range(piece.size - 1):
            if mask[t + 1]:
                nll -= float(logp[t, piece[t + 1]])
                count += 1
    return nll, count


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_sft_loss_is_token_weighted_mean_of_document_losses(family):
    cfg = CONFIGS[family]
    params = _params(family)
    rows = _rows()
    batch = {k: jnp.asarray(v) for k, v in rows.take(np.arange(rows.num_rows)).items()}
    nll, count = _piece_nll(cfg, params, rows)
    loss, metrics = jax.jit(functools.partial(sft_loss, cfg))(params, batch)
    assert int(metrics["tokens"]) == count
    np.testing.assert_allclose(float(loss), nll / count, rtol=1e-5)
    # without segment_ids (document_attention=False: keys not selected) it is one stream per row
    stream, _ = sft_loss(cfg, params, {k: batch[k] for k in corpus_keys(False)})
    assert abs(float(stream) - nll / count) > 1e-4


def test_perplexity_scores_each_document_alone():
    cfg, params = LLAMA, _params("llama")
    rows = _rows()
    nll, count = _piece_nll(cfg, params, rows)
    got = perplexity(cfg, params, rows, batch_size=3)  # a padded last batch
    np.testing.assert_allclose(got, np.exp(nll / count), rtol=1e-5)
    assert abs(perplexity(cfg, params, rows, batch_size=3, document_attention=False) - got) > 1e-4


def test_packed_inputs_and_corpus_keys():
    rows = _rows()
    batch = rows.take(np.arange(2))
    x = models.packed_inputs(batch, True)
    assert sorted(x) == ["input_ids", "positions", "segment_ids"]
    for k, v in x.items():
        np.testing.assert_array_equal(v, batch["tokens" if k == "input_ids" else k][:, :-1])
    assert sorted(models.packed_inputs(batch, False)) == ["input_ids"]
    assert sorted(models.packed_inputs({"tokens": batch["tokens"]})) == ["input_ids"]
    no_pos = models.packed_inputs({"tokens": batch["tokens"], "segment_ids": batch["segment_ids"]})
    np.testing.assert_array_equal(no_pos["positions"], batch["positions"][:, :-1])
    with pytest.raises(KeyError, match="segment_ids"):
        models.packed_inputs({"tokens": batch["tokens"]}, True)
    assert corpus_keys(True, ("domain",)) == ("tokens", "loss_mask", "segment_ids", "positions", "domain")
    assert corpus_keys(False) == ("tokens", "loss_mask")


def test_train_lm_steps_on_packed_documents():
    """The SFT / base-model path selects segment_ids and positions: its first loss is the
    document-attention loss of batch 0 (train_lm's sharded, jitted step on a 2-device mesh)."""
    cfg, params = LLAMA, _params("llama")
    rows = _rows()
    batcher = MixtureBatcher({"a": rows}, {"a": 1.0}, global_batch_size=2, seed=0)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, devices=jax.devices()[:2])
    optim = ml_collections.ConfigDict({"learning_rate": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0,
                                       "warmup_steps": 0})
    _, history = train_lm(cfg, params, mesh, batcher, optim, steps=2, desc="t", document_attention=True)
    expected, _ = sft_loss(cfg, params, batcher.batch(0))
    np.testing.assert_allclose(history[0]["lm_loss"], float(expected), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_backward_equals_autodiff_of_its_forward(dtype):
    """`decoder.attend`'s hand-written backward vs JAX autodiff of the same forward, with grouped KV
    heads (3 query heads per KV head), a random mask and one fully masked query row (its gradient is
    zero in both)."""
    from regft_jax.models import decoder

    rng = np.random.default_rng(0)
    b, kv, g, s, t, hd = 2, 2, 3, 5, 7, 8
    q, k, v = (jnp.asarray(rng.normal(size=shape), dtype)
               for shape in [(b, kv, g, s, hd), (b, kv, t, hd), (b, kv, t, hd)])
    mask = jnp.asarray(rng.random((b, s, t)) > 0.4).at[0, 1].set(False)
    weights = jnp.asarray(rng.normal(size=(b, kv, g, s, hd)), jnp.float32)

    def objective(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v, mask).astype(jnp.float32) * weights)

    ours = jax.grad(objective(decoder.attend), (0, 1, 2))(q, k, v)
    reference = jax.grad(objective(lambda *a: decoder._attend_forward(*a)[0]), (0, 1, 2))(q, k, v)
    assert float(jnp.abs(ours[0][0, :, :, 1]).max()) == 0.0  # the fully masked row
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, r in zip(ours, reference):
        assert a.dtype == r.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(r, np.float32), rtol=tol, atol=tol)
