"""Jitted, batched, mesh-sharded autoregressive sampling with the KV cache.

    out = sample(cfg, params, prompt_tokens, prompt_mask, rng, max_new_tokens=32,
                 temperature=0.7, top_p=0.9, eos_id=2)          # traceable; SampleOutput
    fn = make_sampler(cfg, mesh, max_new_tokens=32, top_p=0.9)   # jitted once per shape bucket
    ids = generate(cfg, params, [[1, 5, 7], [1, 9]], max_new_tokens=16)   # lists in, lists out

The prompt batch is left-padded (`prompt_mask` 1 = real token), prefilled in one call, then a
`lax.while_loop` emits one token per iteration for all rows (no per-token Python dispatch) and
stops early once every row has produced `eos_id`. The loop runs in a few parts whose KV cache grows
between them, so early steps read fewer of the empty slots that later steps fill (`decode_part_ends`).
Per step, the next-token logits are

    logits = logits_model + guidance_logits              (guidance: e.g. NADO's log σ(z_aux))
    logits / temperature  →  top-k  →  top-p  →  sample  (temperature 0: argmax, greedy)

and the returned log-probs are those of the chosen token under that processed distribution
(`logprobs`; 0 for greedy) and under the unmodified model at temperature 1 (`ref_logprobs`).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from regft_jax import multihost, sharding as shd
from regft_jax.errors import UserInputError
from regft_jax.models import ModelConfig, forward_cached, grow_cache, init_cache, unstack_layers
from regft_jax.models.decoder import rope_tables

NEG_INF = -1e30


class Guidance(Protocol):
    """Adds logits to the model's at every step, with its own state (e.g. an auxiliary model's
    KV cache). Must be hashable (it is a static argument of the jitted sampler); its arrays come
    in through `params`."""

    def init(self, params: Any, batch: int, max_len: int) -> Any:
        """The initial state for `batch` rows and `max_len` cache slots."""

    def __call__(self, params: Any, state: Any, tokens: jax.Array, token_mask: jax.Array) -> tuple[jax.Array, Any]:
        """Consume tokens [b, s] (like `forward_cached`) → (logits to add for the last slot [b, vocab], state)."""


@struct.dataclass
class SampleOutput:
    tokens: jax.Array  # [b, n] int32 continuation; `pad_id` after a row's end
    mask: jax.Array  # [b, n] int32: 1 for generated tokens (the EOS included)
    logprobs: jax.Array  # [b, n] float32 log-prob under the sampling distribution (0 where masked)
    ref_logprobs: jax.Array  # [b, n] float32 log-prob under the unmodified model (0 where masked)

    @property
    def lengths(self) -> jax.Array:
        return self.mask.sum(-1)


def processed_logprobs(logits: jax.Array, temperature: jax.Array, top_k: int = 0,
                       top_p: Optional[jax.Array] = None) -> jax.Array:
    """Log-probs of the sampling distribution: logits / T, then top-k, then top-p (nucleus).

    top-k keeps the k largest (ties at the k-th value kept); top-p keeps the smallest prefix of
    the descending-sorted distribution whose mass reaches `top_p` (at least one token).
    """
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, NEG_INF, scaled)
    if top_p is not None:
        scaled = jnp.where(nucleus(jax.nn.softmax(scaled, axis=-1), top_p), scaled, NEG_INF)
    return jax.nn.log_softmax(scaled, axis=-1)


def nucleus(probs: jax.Array, top_p) -> jax.Array:
    """Top-p mask [b, V]: token v is kept iff the mass of the tokens more probable than v is
    below `top_p` (the smallest set, in descending order, whose mass reaches top_p).

    No sort (slow on CPU and not needed): that condition is monotone in p_v, so the kept set is
    {p_v >= τ} and τ is found exactly by bisection over the bit patterns of non-negative
    float32s (which order like the floats), between the row's least and most probable tokens: one
    masked sum over the vocabulary per halving, until every row's bracket is a single pattern
    (log2 of the rows' widest range: ~20 passes for a flat distribution, ~30 for a peaked one).
    """
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)

    def kept_at(threshold_bits):  # is a token with probability `threshold` kept?
        above = jnp.where(bits > threshold_bits[:, None], probs, 0.0).sum(-1)
        return above < top_p

    def bisect(lo_hi):
        lo, hi = lo_hi  # invariant: kept_at(hi), and lo is below every token or not kept_at(lo)
        mid = lo + (hi - lo) // 2
        ok = kept_at(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    hi = bits.max(-1)  # the most probable token is always kept
    lo = bits.min(-1) - 1  # below every token
    _, hi = jax.lax.while_loop(lambda lo_hi: jnp.any(lo_hi[1] - lo_hi[0] > 1), bisect, (lo, hi))
    return bits >= hi[:, None]


def categorical(rng: jax.Array, logp: jax.Array) -> jax.Array:
    """One token per row from log-probs [b, V], by inverting the CDF with one uniform per row
    (cheaper than Gumbel-max, which draws b x V random numbers). Two levels, so no prefix sum runs
    over the whole vocabulary (slow on CPU): the CDF of ~sqrt(V) blocks' masses picks a block, the
    CDF inside that block picks the token. Tokens of probability 0 are never drawn."""
    b, vocab = logp.shape
    width = 1 << max(0, (vocab - 1).bit_length() // 2)  # block size ~ sqrt(V), a power of two
    blocks = -(-vocab // width)
    probs = jnp.pad(jnp.exp(logp), ((0, 0), (0, blocks * width - vocab))).reshape(b, blocks, width)
    mass = probs.sum(-1)  # [b, blocks]
    cdf = jnp.cumsum(mass, axis=-1)
    u = jax.random.uniform(rng, (b, 1), minval=1e-7) * cdf[:, -1:]
    block = jnp.minimum((cdf < u).sum(-1), blocks - 1)  # the first block whose CDF reaches u
    before = jnp.take_along_axis(cdf - mass, block[:, None], axis=-1)  # mass of the earlier blocks
    inner = jnp.cumsum(jnp.take_along_axis(probs, block[:, None, None], axis=1)[:, 0], axis=-1)  # [b, width]
    rest = jnp.minimum(u - before, inner[:, -1:])  # in (0, the block's mass]
    index = jnp.minimum((inner < rest).sum(-1), width - 1)
    return jnp.minimum(block * width + index, vocab - 1).astype(jnp.int32)


def argmax(logits: jax.Array) -> jax.Array:
    """The first index of each row's maximum [b, V] → [b] int32, as two plain reductions (XLA on CPU
    runs `jnp.argmax`'s (value, index) reduction several times slower)."""
    vocab = logits.shape[-1]
    top = logits.max(-1, keepdims=True)
    first = jnp.where(logits == top, jnp.arange(vocab, dtype=jnp.int32), vocab).min(-1)
    return jnp.minimum(first, vocab - 1)  # a row of NaNs → the last token


def _pick(logp: jax.Array, rows: jax.Array, tokens: jax.Array) -> jax.Array:
    return logp[rows, tokens]


def sample(cfg: ModelConfig, params, prompt_tokens: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *,
           max_new_tokens: int, temperature=1.0, top_k: int = 0, top_p=None, eos_id: Optional[int] = None,
           pad_id: int = 0, guidance: Optional[Guidance] = None, guidance_params: Any = None,
           unstacked: bool = True, decode_parts: int = 4) -> SampleOutput:
    """Sample `max_new_tokens` continuations of a left-padded prompt batch (traceable, jit it).

    temperature: a float (traced is fine); exactly 0.0 (a Python float) means greedy.
    top_p: None (off) or a float in (0, 1] (traced is fine).
    unstacked: decode with per-layer weight and KV-cache buffers (`models.unstack_layers`: one copy of
    the weights per call, 1.1-1.5x faster on CPU and on an H200, bench/RESULTS.md) rather than scanning
    the stacked layers (XLA copies a layer's slice of each stacked weight and cache at every step);
    False saves the copy's memory.
    decode_parts: the decode loop runs in up to this many parts (`decode_part_ends`: 1 part below 25
    new tokens, 4 from 49), each over a KV cache only as long as its last step needs; the cache grows
    (one copy) between parts. With 4 parts a step reads about p + 5n/8 slots of the cache instead of
    p + n (5-15% faster with 64 new tokens on CPU, bench/RESULTS.md), for one compiled loop body per
    part (twice the compile time) and, while the cache grows, the old and the new one side by side (up
    to 1.75x the full cache's memory; 1 part allocates the full cache once). Guidance keeps its own
    full-length state.
    """
    if max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens={max_new_tokens}: expected >= 1")
    greedy = isinstance(temperature, (int, float)) and temperature == 0.0
    b, p = prompt_tokens.shape
    n = max_new_tokens
    rows = jnp.arange(b)
    ends = decode_part_ends(n, decode_parts)
    # Step i writes slot p + i: the cache of a part ending at step `end` holds p + end slots.
    cache = shd.constrain_kv_cache(init_cache(cfg, b, p + ends[0], per_layer=unstacked))
    if unstacked:
        params = unstack_layers(params)  # each layer's weights and KV cache in buffers of their own
    logits, cache = forward_cached(cfg, params, prompt_tokens, cache, prompt_mask, last_only=True)
    # The rotary tables of every decode step, computed once before the loop (not a table per step): a live
    # row's i-th new token sits at position prompt length + i (a finished row's slots are never attended).
    step_rope = rope_tables(cfg, cache["positions"][:, None] + jnp.arange(n))
    gstate, extra = None, jnp.zeros((), jnp.float32)
    if guidance is not None:
        gstate = guidance.init(guidance_params, b, p + n)
        extra, gstate = guidance(guidance_params, gstate, prompt_tokens, prompt_mask)

    def choose(logits, extra, done, rng):
        """Next token per row from model logits [b, V] (+ guidance); finished rows emit pad."""
        guided = logits + extra
        if greedy:
            token = argmax(guided)
            logp = jnp.zeros((b,), jnp.float32)
        else:
            proc = processed_logprobs(guided, temperature, top_k, top_p)
            token = categorical(rng, proc)
            logp = _pick(proc, rows, token)
        ref = _pick(logits, rows, token) - jax.nn.logsumexp(logits, axis=-1)
        live = ~done
        token = jnp.where(live, token, pad_id)
        new_done = done if eos_id is None else done | (token == eos_id)
        return token, jnp.where(live, logp, 0.0), jnp.where(live, ref, 0.0), live, new_done

    out = SampleOutput(tokens=jnp.full((b, n), pad_id, jnp.int32), mask=jnp.zeros((b, n), jnp.int32),
                       logprobs=jnp.zeros((b, n), jnp.float32), ref_logprobs=jnp.zeros((b, n), jnp.float32))

    def write(out, i, token, logp, ref, live):
        col = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v[:, None].astype(a.dtype), i, axis=1)
        return SampleOutput(tokens=col(out.tokens, token), mask=col(out.mask, live),
                            logprobs=col(out.logprobs, logp), ref_logprobs=col(out.ref_logprobs, ref))

    def body(carry):
        i, logits, extra, cache, gstate, done, rng, out = carry
        rng, step_rng = jax.random.split(rng)
        token, logp, ref, live, done = choose(logits, extra, done, step_rng)
        out = write(out, i, token, logp, ref, live)
        feed_mask = live[:, None].astype(jnp.int32)
        rope = tuple(jax.lax.dynamic_slice_in_dim(t, i, 1, axis=1) for t in step_rope)
        logits, cache = forward_cached(cfg, params, token[:, None], cache, feed_mask, rope=rope)
        if guidance is not None:
            extra, gstate = guidance(guidance_params, gstate, token[:, None], feed_mask)
        return i + 1, logits[:, -1], extra, cache, gstate, done, rng, out

    carry = (jnp.int32(0), logits[:, -1], extra, cache, gstate, jnp.zeros((b,), bool), rng, out)
    for part, end in enumerate(ends):
        if part:
            carry = (*carry[:3], shd.constrain_kv_cache(grow_cache(carry[3], p + end)), *carry[4:])
        carry = jax.lax.while_loop(lambda c, end=end: (c[0] < end) & ~jnp.all(c[5]), body, carry)
    i, logits, extra, _, _, done, rng, out = carry
    # The last token needs no forward pass after it.
    token, logp, ref, live, _ = choose(logits, extra, done, jax.random.split(rng)[1])
    return write(out, i, token, logp, ref, live)


def decode_part_ends(max_new_tokens: int, parts: int, min_steps: int = 12) -> list[int]:
    """Where the decode loop's parts end: part k runs the steps before ends[k] (of the n - 1 steps
    that feed a token back; the n-th token needs no forward pass). At most `parts` parts of
    near-equal length, none shorter than `min_steps` unless there is only one (a short loop gains
    little from a shorter cache and would compile a loop body per part)."""
    steps = max_new_tokens - 1
    parts = max(1, min(parts, steps // max(min_steps, 1)))
    return [steps * (k + 1) // parts for k in range(parts)]


def make_sampler(cfg: ModelConfig, mesh=None, *, max_new_tokens: int, greedy: bool = False, top_k: int = 0,
                 use_top_p: bool = False, eos_id: Optional[int] = None, pad_id: int = 0,
                 guidance: Optional[Guidance] = None, decode_parts: int = 4):
    """The jitted sampler: fn(params, guidance_params, prompt_tokens, prompt_mask, rng, temperature, top_p)
    -> SampleOutput. Compiled once per prompt shape; temperature and top_p are traced values.
    The same arguments return the same function (and its compilations).

    With a mesh, the batch is sharded over the data-parallel axes (pass the prompt arrays as global
    jax.Arrays, `multihost.to_global`, as `generate` does: required with more than one process),
    params keep the shardings they come with, and activation/cache constraints in model code are active.
    decode_parts: as in `sample`.
    """
    return _make_sampler(cfg, mesh, max_new_tokens, greedy, top_k, use_top_p, eos_id, pad_id, guidance,
                         decode_parts)


@functools.lru_cache(maxsize=64)
def _make_sampler(cfg, mesh, max_new_tokens, greedy, top_k, use_top_p, eos_id, pad_id, guidance, decode_parts):
    rules = None

    def fn(params, guidance_params, prompt_tokens, prompt_mask, rng, temperature, top_p):
        with shd.use_mesh(mesh, rules):
            return sample(cfg, params, prompt_tokens, prompt_mask, rng, max_new_tokens=max_new_tokens,
                          temperature=0.0 if greedy else temperature, top_k=top_k,
                          top_p=top_p if use_top_p else None, eos_id=eos_id, pad_id=pad_id,
                          guidance=guidance, guidance_params=guidance_params, decode_parts=decode_parts)

    if mesh is None:
        return jax.jit(fn)
    batch = shd.batch_sharding(mesh, 2, rules)
    out = SampleOutput(tokens=batch, mask=batch, logprobs=batch, ref_logprobs=batch)
    return jax.jit(fn, in_shardings=(None, None, batch, batch, shd.replicated(mesh), None, None),
                   out_shardings=out)


def bucket(n: int, minimum: int = 16, midpoints: bool = True) -> int:
    """The padded size for n, so few shapes compile: the smallest power of two (at least `minimum`) that
    holds n, or with `midpoints` the smallest of those and their 3/4 points (16, 24, 32, 48, 64, 96, ...
    for minimum 16): at most a third of a padded length is padding instead of half, for at most twice the
    compiled shapes. Prompt lengths 17-24 pad to 24, not 32: a quarter less prefill and fewer cache slots
    for every decode step to read (bench/RESULTS.md)."""
    power = max(minimum, 1 << max(n - 1, 0).bit_length())
    three_quarters = 3 * power // 4
    if midpoints and three_quarters >= minimum and n <= three_quarters:
        return three_quarters
    return power


def pad_prompts(prompts: Sequence[Sequence[int]], length: int, batch: int, pad_id: int = 0):
    """Left-pad token lists into [batch, length] arrays (extra rows are 1-token dummies)."""
    tokens = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i, prompt in enumerate(prompts):
        if len(prompt):
            tokens[i, length - len(prompt):] = prompt
            mask[i, length - len(prompt):] = 1
    mask[len(prompts):, -1] = 1  # dummy rows hold one token so no row attends to nothing
    return tokens, mask


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: Optional[int] = None, pad_id: int = 0, mesh=None, batch_size: int = 64,
             guidance: Optional[Guidance] = None, guidance_params: Any = None,
             return_logprobs: bool = False, decode_parts: int = 4):
    """Continue each prompt (a list of token ids); returns the new token ids per prompt (cut after
    EOS, which is kept). temperature 0.0 = greedy. With `return_logprobs`, also returns per-prompt
    (logprobs, ref_logprobs) lists as numpy arrays.

    Prompts are processed in batches of `batch_size`, padded to `bucket` lengths (powers of two and their
    3/4 points) and power-of-two batch sizes (multiples of the mesh's data-parallel size), so repeated
    calls reuse compilations.
    decode_parts: as in `sample` (1: the full KV cache at once, the least memory).
    """
    if not prompts:
        return ([], []) if return_logprobs else []
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise UserInputError(f"generate: prompt {empty[0]} is empty (start it with a BOS token)")
    if not 0.0 < top_p <= 1.0:
        raise UserInputError(f"generate: top_p={top_p} must be in (0, 1]")
    if temperature < 0:
        raise UserInputError(f"generate: temperature={temperature} must be >= 0")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise UserInputError(f"generate: prompt length {longest} + max_new_tokens {max_new_tokens} "
                             f"exceeds the model's max_seq_len {cfg.max_seq_len}")
    dp = 1 if mesh is None else shd.batch_shards(mesh)
    fn = make_sampler(cfg, mesh, max_new_tokens=max_new_tokens, greedy=temperature == 0.0, top_k=top_k,
                      use_top_p=top_p < 1.0, eos_id=eos_id, pad_id=pad_id, guidance=guidance,
                      decode_parts=decode_parts)
    rng = jax.random.key(seed)
    results, logps = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        rows = -(-bucket(len(chunk), 1, midpoints=False) // dp) * dp
        tokens, mask = pad_prompts(chunk, bucket(max(len(p) for p in chunk)), rows, pad_id)
        rng, key = jax.random.split(rng)
        if mesh is not None:  # global arrays (each process places its own rows)
            tokens, mask = (multihost.to_global(a, shd.batch_sharding(mesh, 2)) for a in (tokens, mask))
        out = multihost.to_host(fn(params, guidance_params, tokens, mask, key,
                                   jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p)))
        for i in range(len(chunk)):
            length = int(out.mask[i].sum())
            results.append(out.tokens[i, :length].tolist())
            logps.append((out.logprobs[i, :length], out.ref_logprobs[i, :length]))
    return (results, logps) if return_logprobs else results
