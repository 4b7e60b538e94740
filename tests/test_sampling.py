"""The KV-cache sampler vs HF `generate`, teacher-forced log-probs, filters, guidance, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from regft_jax import models, sampling, sharding
from tests.hf_reference import VOCAB, make_hf_model

PROMPTS = [[5, 17, 3, 9, 44, 2, 8], [11, 60], [7, 7, 31, 90], [1]]


@pytest.fixture(scope="module", params=["llama_gqa", "falcon_7b_mqa"])
def converted(request, tmp_path_factory):
    hf = make_hf_model(request.param, seed=3)
    path = str(tmp_path_factory.mktemp(request.param))
    hf.save_pretrained(path)
    cfg, params = models.load_hf(path)
    return hf, cfg, params


def _hf_greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_hf_generate(converted):
    hf, cfg, params = converted
    n = 40  # the decode loop in 3 parts over a growing KV cache (`sampling.decode_part_ends`)
    assert len(sampling.decode_part_ends(n, 3)) == 3
    ours = sampling.generate(cfg, params, PROMPTS, max_new_tokens=n, decode_parts=3)  # one left-padded batch
    for prompt, got in zip(PROMPTS, ours):
        assert got == _hf_greedy(hf, prompt, n)


def test_greedy_equals_hf_generate_in_a_three_quarter_length_bucket(converted):
    """Prompts of 17-24 tokens pad to 24 slots (`sampling.bucket`), not a power of two: still HF's tokens."""
    hf, cfg, params = converted
    prompts = [[(7 * i + 3) % (VOCAB - 1) + 1 for i in range(21)], [11, 60, 5]]
    assert sampling.bucket(21) == 24
    for prompt, got in zip(prompts, sampling.generate(cfg, params, prompts, max_new_tokens=14)):
        assert got == _hf_greedy(hf, prompt, 14)


def test_greedy_stops_at_eos_per_row(converted):
    hf, cfg, params = converted
    n = 12
    full = [_hf_greedy(hf, p, n) for p in PROMPTS]
    eos = full[0][3]  # a token the first row emits at step 4
    ours = sampling.generate(cfg, params, PROMPTS, max_new_tokens=n, eos_id=eos)
    for ref, got in zip(full, ours):
        expected = ref[:ref.index(eos) + 1] if eos in ref else ref
        assert got == expected
    assert len(ours[0]) == 4


def _teacher_forced(cfg, params, prompts, continuations):
    """Raw next-token logits for every continuation token, from one full forward per row."""
    out = []
    for p, c in zip(prompts, continuations):
        ids = jnp.asarray([list(p) + list(c)])
        logits = np.asarray(models.forward(cfg, params, ids))[0]
        out.append(logits[len(p) - 1:len(p) - 1 + len(c)])
    return out


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9), (1.3, 0, 0.5)])
def test_sampled_logprobs_equal_teacher_forced(converted, temperature, top_k, top_p):
    _, cfg, params = converted
    conts, logps = sampling.generate(cfg, params, PROMPTS, max_new_tokens=10, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=1, return_logprobs=True)
    for logits, cont, (logp, ref) in zip(_teacher_forced(cfg, params, PROMPTS, conts), conts, logps):
        assert len(cont) == 10
        idx = np.arange(len(cont))
        np.testing.assert_allclose(ref, jax.nn.log_softmax(logits)[idx, cont], atol=1e-4)
        proc = sampling.processed_logprobs(jnp.asarray(logits), temperature, top_k,
                                           top_p if top_p < 1 else None)
        np.testing.assert_allclose(logp, np.asarray(proc)[idx, cont], atol=1e-4)
        assert np.all(np.isfinite(logp))  # every sampled token is inside the top-k/top-p set


def _hf_processed(logits, temperature, top_k, top_p):
    procs = transformers.LogitsProcessorList([transformers.TemperatureLogitsWarper(temperature)])
    if top_k:
        procs.append(transformers.TopKLogitsWarper(top_k))
    if top_p < 1:
        procs.append(transformers.TopPLogitsWarper(top_p))
    out = procs(None, torch.tensor(logits)).numpy()
    return np.isfinite(out), out


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 5, 1.0), (0.5, 0, 0.8), (2.0, 30, 0.95), (1.0, 0, 0.05)])
def test_filters_match_hf_logits_warpers(temperature, top_k, top_p):
    logits = np.random.RandomState(0).randn(6, VOCAB).astype(np.float32) * 3
    keep_ref, warped = _hf_processed(logits, temperature, top_k, top_p)
    ours = np.asarray(sampling.processed_logprobs(jnp.asarray(logits), temperature, top_k,
                                                  top_p if top_p < 1 else None))
    keep = ours > -1e20
    np.testing.assert_array_equal(keep, keep_ref)
    ref = jax.nn.log_softmax(jnp.where(keep_ref, warped, -jnp.inf), axis=-1)
    np.testing.assert_allclose(ours[keep], np.asarray(ref)[keep], atol=1e-5)


def _rows(vocab: int) -> np.ndarray:
    """Probability rows [n, vocab] float32: flat (a random model's), peaked, with exact zeros (after top-k),
    with tied values, and one-hot."""
    rng = np.random.RandomState(0)
    logits = [rng.randn(vocab) * 0.02, rng.randn(vocab) * 3, -2.0 * np.log(rng.permutation(vocab) + 1.0)]
    zeros = rng.randn(vocab) * 2
    zeros[rng.rand(vocab) < 0.7] = -np.inf
    ties = np.repeat(rng.randn(vocab // 8 + 1) * 2, 8)[:vocab]
    logits += [zeros, ties, np.where(np.arange(vocab) == 3, 0.0, -np.inf)]
    return np.asarray(jax.nn.softmax(jnp.asarray(np.stack(logits), jnp.float32), axis=-1))


@pytest.mark.parametrize("vocab", [97, 4096])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999, 1.0])
def test_nucleus_equals_brute_force(vocab, top_p):
    """The bisected mask equals the definition evaluated token by token: v is kept iff the mass of the
    tokens more probable than v is below top_p (float64 sums; a token whose mass above lies within float32
    rounding of top_p is not compared, since there the order of summation decides)."""
    probs = _rows(vocab)
    above = np.array([[row[row > x].sum(dtype=np.float64) for x in row] for row in probs])
    clear = np.abs(above - top_p) > 1e-5
    assert clear.mean() > 0.6  # most tokens are compared (at top_p = 1, the zeros of the masked rows are not)
    nucleus = jax.jit(sampling.nucleus)
    keep = np.asarray(nucleus(jnp.asarray(probs), jnp.float32(top_p)))
    np.testing.assert_array_equal(keep[clear], (above < top_p)[clear])
    # each row alone (the bisection stops when every row of the batch has converged)
    alone = np.concatenate([nucleus(jnp.asarray(row[None]), jnp.float32(top_p)) for row in probs])
    np.testing.assert_array_equal(alone, keep)
    assert keep.any(-1).all()  # the most probable token is always kept


@dataclasses.dataclass(frozen=True)
class TokenBias:
    """Guidance adding params["bias"] [vocab] at every step; its state counts consumed tokens."""

    def init(self, params, batch, max_len):
        return jnp.zeros((batch,), jnp.int32)

    def __call__(self, params, state, tokens, token_mask):
        state = state + token_mask.sum(-1)
        return jnp.broadcast_to(params["bias"], (tokens.shape[0], params["bias"].shape[0])), state


def test_guidance_logits_are_added_at_every_step(converted):
    _, cfg, params = converted
    banned = sampling.generate(cfg, params, PROMPTS, max_new_tokens=8)[0][0]
    bias = jnp.zeros(cfg.vocab_size).at[banned].set(-1e9).at[42].set(2.0)
    conts, logps = sampling.generate(cfg, params, PROMPTS, max_new_tokens=8, temperature=0.9, seed=4,
                                     guidance=TokenBias(), guidance_params={"bias": bias}, return_logprobs=True)
    assert all(banned not in c for c in conts)
    for logits, cont, (logp, ref) in zip(_teacher_forced(cfg, params, PROMPTS, conts), conts, logps):
        idx = np.arange(len(cont))
        guided = sampling.processed_logprobs(jnp.asarray(logits) + bias, 0.9)
        np.testing.assert_allclose(logp, np.asarray(guided)[idx, cont], atol=1e-4)
        np.testing.assert_allclose(ref, jax.nn.log_softmax(logits)[idx, cont], atol=1e-4)
    greedy = sampling.generate(cfg, params, PROMPTS, max_new_tokens=5, guidance=TokenBias(),
                               guidance_params={"bias": jnp.zeros(cfg.vocab_size).at[42].set(1e9)})
    assert greedy == [[42] * 5] * len(PROMPTS)


def test_sharded_sampling_equals_single_device(converted):
    _, cfg, params = converted
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    sh = sharding.param_shardings(mesh, models.param_logical_axes(cfg), models.abstract_params(cfg))
    sharded = sharding.shard_tree(params, sh)
    kw = dict(max_new_tokens=30, temperature=0.8, top_p=0.9, seed=2, return_logprobs=True)
    assert len(sampling.decode_part_ends(30, 4)) == 2  # the decode loop in 2 parts
    single, single_lp = sampling.generate(cfg, params, PROMPTS * 2, **kw)
    multi, multi_lp = sampling.generate(cfg, sharded, PROMPTS * 2, mesh=mesh, **kw)
    assert multi == single
    for (a, b), (c, d) in zip(single_lp, multi_lp):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=5e-5)
        np.testing.assert_allclose(b, d, rtol=1e-5, atol=5e-5)


def test_bucket_is_the_smallest_rung_of_the_ladder():
    """Brute force against the ladder written out: powers of two from `minimum` and their 3/4 points."""
    for minimum in (1, 16):
        powers = [minimum << k for k in range(16)]
        ladder = sorted(set(powers) | {3 * p // 4 for p in powers if 3 * p // 4 >= minimum})
        for n in range(0, 3000):
            assert sampling.bucket(n, minimum) == min(r for r in ladder if r >= n), (n, minimum)
            assert sampling.bucket(n, minimum, midpoints=False) == min(p for p in powers if p >= n), (n, minimum)
    assert [sampling.bucket(n) for n in (1, 16, 17, 24, 25, 33, 49, 65, 97)] == [16, 16, 24, 24, 32, 48, 64, 96, 128]
    for n in range(17, 3000):  # at most a third of a padded length is padding
        assert 3 * (sampling.bucket(n) - n) < sampling.bucket(n)


def test_no_recompilation_within_a_bucket(converted):
    _, cfg, params = converted
    fn = sampling.make_sampler(cfg, max_new_tokens=6, greedy=True)
    sampling.generate(cfg, params, PROMPTS, max_new_tokens=6)
    before = fn._cache_size()
    sampling.generate(cfg, params, [[3, 4, 5], [9] * 11, [2]], max_new_tokens=6)  # same buckets
    assert fn._cache_size() == before == 1


def test_bad_arguments_fail_clearly(converted):
    _, cfg, params = converted
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sampling.generate(cfg, params, [[1], []], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        sampling.generate(cfg, params, [[1]], max_new_tokens=cfg.max_seq_len + 1)
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(cfg, params, [[1]], max_new_tokens=3, temperature=1.0, top_p=0.0)


def test_inverse_cdf_categorical_matches_probabilities():
    logp = jax.nn.log_softmax(jnp.asarray([[0.0, 1.0, -1.0, 2.0, -30.0], [3.0, -1e30, 0.0, 0.0, 1.0]]))
    n = 100_000
    draws = jax.vmap(lambda k: sampling.categorical(k, logp))(jax.random.split(jax.random.key(1), n))
    for row in range(2):
        freq = np.bincount(np.asarray(draws[:, row]), minlength=5) / n
        p = np.exp(np.asarray(logp[row]))
        assert np.all(np.abs(freq - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9), (freq, p)  # 4 sigma


@pytest.mark.parametrize("vocab", [1, 2, 37, 4096])
def test_two_level_categorical_matches_probabilities_and_skips_zeros(vocab):
    """Blocks of ~sqrt(V) (and a ragged last block): frequencies within 4 sigma of p, and tokens of
    probability 0 (scattered, at block ends, a whole block) are never drawn."""
    rng = np.random.default_rng(vocab)
    logits = rng.normal(size=(2, vocab)) * 2
    logits[:, rng.random(vocab) < 0.3] = -np.inf  # scattered zeros
    logits[1, : vocab // 2] = -np.inf  # whole blocks of zeros in row 1
    logits[:, -1] = 5.0 if vocab < 40 else 0.0  # at least one token; the last slot of the ragged block
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
    n = 50_000
    draws = np.asarray(jax.vmap(lambda k: sampling.categorical(k, logp))(jax.random.split(jax.random.key(2), n)))
    for row in range(2):
        p = np.exp(np.asarray(logp[row], np.float64))
        counts = np.bincount(draws[:, row], minlength=vocab)
        assert np.all(counts[p == 0] == 0)
        # Pearson's chi-square over the tokens expected >= 5 times, the rest pooled into one bin; the
        # threshold is the 1 - 1e-4 quantile (Wilson-Hilferty).
        big = n * p >= 5
        observed = np.append(counts[big], counts[~big].sum())
        expected = np.append(n * p[big], n * p[~big].sum())
        keep = expected > 0
        chi2 = (((observed - expected) ** 2)[keep] / expected[keep]).sum()
        df = keep.sum() - 1
        threshold = df * (1 - 2 / (9 * df) + 3.72 * np.sqrt(2 / (9 * df))) ** 3 if df else 0.0
        assert chi2 <= threshold, (chi2, df, threshold)


def test_decode_part_ends_cover_every_step_in_near_equal_parts():
    for n in range(1, 120):
        steps = n - 1
        for parts in range(1, 7):
            ends = sampling.decode_part_ends(n, parts, min_steps=12)
            lengths = np.diff([0] + ends)
            assert ends[-1] == steps and len(ends) <= parts
            assert lengths.max() - lengths.min() <= 1
            if len(ends) > 1:
                assert lengths.min() >= 12
            # as many parts as allowed: one more would be too many or too short
            assert len(ends) == parts or steps // (len(ends) + 1) < 12


@dataclasses.dataclass(frozen=True)
class StopAfter:
    """Guidance forcing `eos` once a row has consumed params["stop"][row] tokens (prompt included)."""
    eos: int

    def init(self, params, batch, max_len):
        return jnp.zeros((batch,), jnp.int32)

    def __call__(self, params, state, tokens, token_mask):
        state = state + token_mask.sum(-1)
        force = (state >= params["stop"])[:, None] & (jnp.arange(VOCAB) == self.eos)
        return jnp.where(force, 1e9, 0.0), state


@pytest.mark.parametrize("unstacked", [False, True])
def test_decode_in_parts_equals_one_loop(converted, unstacked):
    """The decode loop in parts over a growing KV cache samples what one loop over the full-length
    cache does: the same tokens (top-p sampling) and log-probs to float rounding, with rows that stop
    at EOS in different parts, and with every row stopped in the first part (the later parts' loops
    run no step)."""
    _, cfg, params = converted
    n = 40
    assert sampling.decode_part_ends(n, 3) == [13, 26, 39]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, VOCAB, k).tolist() for k in (3, 7, 5, 1, 6, 2)]
    tokens, mask = sampling.pad_prompts(prompts, 8, 6)

    def run(parts, eos_id=None, guidance=None, guidance_params=None):
        return jax.jit(lambda p, t, m: sampling.sample(
            cfg, p, t, m, jax.random.key(4), max_new_tokens=n, temperature=0.9, top_p=0.95, eos_id=eos_id,
            unstacked=unstacked, decode_parts=parts, guidance=guidance, guidance_params=guidance_params))(
            params, tokens, mask)

    def assert_same(one, three):
        np.testing.assert_array_equal(np.asarray(one.tokens), np.asarray(three.tokens))
        np.testing.assert_array_equal(np.asarray(one.mask), np.asarray(three.mask))
        np.testing.assert_allclose(np.asarray(one.logprobs), np.asarray(three.logprobs), atol=1e-5)
        np.testing.assert_allclose(np.asarray(one.ref_logprobs), np.asarray(three.ref_logprobs), atol=1e-5)

    free = np.asarray(run(1).tokens)
    first = lambda token: np.asarray([(row == token).argmax() if (row == token).any() else n for row in free])
    # EOS: a token row 0 first emits in the second part (steps 13-25) while another row runs on past it
    eos = next(int(t) for t in free[0, 13:26] if 13 <= first(t)[0] < 26 and first(t).max() >= 26)
    one = run(1, eos)
    np.testing.assert_array_equal(np.asarray(one.mask).sum(1), np.minimum(first(eos) + 1, n))
    assert_same(one, run(3, eos))
    # every row stops within the first part, after 3-8 new tokens
    stop = {"stop": jnp.asarray([len(p) + 2 + i for i, p in enumerate(prompts)])}
    one = run(1, 7, StopAfter(7), stop)
    np.testing.assert_array_equal(np.asarray(one.mask).sum(1), np.arange(3, 9))
    assert_same(one, run(3, 7, StopAfter(7), stop))


@pytest.mark.parametrize("per_layer", [False, True])
def test_grow_cache_keeps_the_filled_slots(per_layer):
    cfg = models.ModelConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
                             mlp_dim=32, max_seq_len=16)
    params = models.init_params(cfg, jax.random.key(0))
    if per_layer:
        params = models.unstack_layers(params)
    cache = models.init_cache(cfg, 2, 5, per_layer=per_layer)
    _, cache = models.forward_cached(cfg, params, jnp.asarray([[3, 4, 5], [6, 7, 8]]), cache,
                                     jnp.asarray([[1, 1, 1], [0, 1, 1]]))
    grown = models.grow_cache(cache, 9)
    for name in ("k", "v"):
        for old, new in zip(*(jax.tree.leaves(c[name]) for c in (cache, grown))):
            assert new.shape == (*old.shape[:-2], 9, old.shape[-1])  # [.., slots, head_dim]
            np.testing.assert_array_equal(np.asarray(new[..., :5, :]), np.asarray(old))
            assert not np.asarray(new[..., 5:, :]).any() and np.asarray(old[..., 1:3, :]).any()
    np.testing.assert_array_equal(np.asarray(grown["valid"]), [[1, 1, 1, 0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0, 0, 0]])
    assert int(grown["index"]) == 3 and grown["positions"].tolist() == [3, 2]
    with pytest.raises(ValueError, match="max_len=3"):
        models.grow_cache(cache, 3)


def test_argmax_is_first_maximum():
    x = jnp.asarray([[0.0, 3.0, 3.0, 1.0], [-jnp.inf, -jnp.inf, -1.0, -jnp.inf], [2.0, 2.0, 2.0, 2.0]])
    np.testing.assert_array_equal(np.asarray(sampling.argmax(x)), np.asarray(jnp.argmax(x, axis=-1)))
    big = jax.random.normal(jax.random.key(0), (64, 4096))
    np.testing.assert_array_equal(np.asarray(sampling.argmax(big)), np.asarray(jnp.argmax(big, axis=-1)))


def test_unstacked_layers_equal_the_scanned_stack(converted):
    """Decoding on per-layer buffers (`unstack_layers`, per-layer KV cache) computes what the scanned
    stack does: the same sampled tokens and log-probs, and the same full-pass logits."""
    _, cfg, params = converted
    rng = np.random.default_rng(0)
    tokens, mask = sampling.pad_prompts([rng.integers(1, VOCAB, k).tolist() for k in (3, 7, 5)], 8, 4)
    outs = [jax.jit(lambda p, t, m, unstacked=unstacked: sampling.sample(
        cfg, p, t, m, jax.random.key(1), max_new_tokens=6, temperature=0.8, top_p=0.9, unstacked=unstacked))(
        params, tokens, mask) for unstacked in (False, True)]
    np.testing.assert_array_equal(np.asarray(outs[0].tokens), np.asarray(outs[1].tokens))
    np.testing.assert_allclose(np.asarray(outs[0].logprobs), np.asarray(outs[1].logprobs), atol=1e-5)
    np.testing.assert_allclose(np.asarray(outs[0].ref_logprobs), np.asarray(outs[1].ref_logprobs), atol=1e-5)
    unstacked = models.unstack_layers(params)
    assert len(unstacked["layers"]) == cfg.num_layers and models.unstack_layers(unstacked) is unstacked
    np.testing.assert_allclose(np.asarray(models.forward(cfg, unstacked, jnp.asarray(tokens), attention_mask=mask)),
                               np.asarray(models.forward(cfg, params, jnp.asarray(tokens), attention_mask=mask)),
                               atol=1e-5)
