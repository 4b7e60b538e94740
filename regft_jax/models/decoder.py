"""One Flax NNX decoder covering Llama (1/2/3) and Falcon (7B / 40B-style) architectures.

Mesh-agnostic: every parameter carries `logical_axes` metadata (names such as "embed", "mlp",
"q_heads"), and activations are annotated through `regft_jax.sharding.constrain`, which is the
identity unless the caller activated a mesh. `regft_jax.sharding` maps logical → mesh axes.

Layers are stored stacked (leading "layers" axis) and applied with `lax.scan` (or unrolled when
`scan_layers=False`), optionally rematerialized. The KV cache is a pytree of stacked arrays.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from regft_jax import sharding
from regft_jax.models.config import ModelConfig

Array = jax.Array


def _dtype(name: str):
    return jnp.dtype(name)


def _param(rngs: nnx.Rngs, cfg: ModelConfig, shape, axes, init: str, stack: int,
           std: Optional[float] = None) -> nnx.Param:
    """A parameter of `shape` (with a leading `stack` axis for stacked layers) and logical axes;
    init "zeros", "ones" or "normal" (standard deviation `std`, default cfg.init_std)."""
    if stack:
        shape, axes = (stack, *shape), ("layers", *axes)
    dtype = _dtype(cfg.param_dtype)
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = ((cfg.init_std if std is None else std) * jax.random.normal(rngs.params(), shape, jnp.float32)
                 ).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


def _lora_factors(module: nnx.Module, rngs: nnx.Rngs, cfg: ModelConfig, name: str, in_dims, in_axes, out_dims,
                  out_axes, stack: int) -> None:
    """LoRA factors of projection `name` when it is a target: `{name}_lora_a` [*in, r] ~ N(0, 1/fan_in)
    and `{name}_lora_b` [r, *out] = 0, so a fresh adapter leaves the model unchanged."""
    if not cfg.lora_rank or name not in cfg.lora_targets:
        return
    setattr(module, f"{name}_lora_a", _param(rngs, cfg, (*in_dims, cfg.lora_rank), (*in_axes, "lora"), "normal", stack,
                                             std=1 / math.sqrt(math.prod(in_dims))))
    setattr(module, f"{name}_lora_b", _param(rngs, cfg, (cfg.lora_rank, *out_dims), ("lora", *out_axes), "zeros",
                                             stack))


def _with_lora(module: nnx.Module, name: str, y: Array, x: Array, down: str, up: str) -> Array:
    """y + (α / r) · (x A) B for a LoRA target `name` (einsum specs `down`: x, A → [.., r] and
    `up`: [.., r], B → y's layout); y unchanged otherwise."""
    if not hasattr(module, f"{name}_lora_a"):
        return y
    a = getattr(module, f"{name}_lora_a")[...].astype(x.dtype)
    b = getattr(module, f"{name}_lora_b")[...].astype(x.dtype)
    return y + (module.cfg.lora_scale * jnp.einsum(up, jnp.einsum(down, x, a), b)).astype(y.dtype)


# bf16 matmuls on the CPU sum in float32 (`token_matmul`); read when a function is traced
CPU_F32_ACCUMULATE = True


def token_matmul(x: Array, w: Array, preferred_element_type=None) -> Array:
    """x [..., i] @ w [i, o] as one [tokens, i] x [i, o] matrix multiply (leading dims flattened).

    Same values as `x @ w`, but its gradient w.r.t. `w` is a plain 2-D matmul over the tokens. Written
    over [b, s, i] directly, the weight gradient contracts batch and length separately, and XLA on CPU
    then transposes the activation gradient element by element before the matmul (2.3x slower SwiGLU
    MLP forward + backward; bench/RESULTS.md).

    bfloat16 operands on the CPU go through `matmul_f32_accumulate` (forward and backward), unless
    `CPU_F32_ACCUMULATE` is False (bench/bench_memory.py: CPU compilations standing in for accelerators)."""
    x2 = x.reshape(-1, x.shape[-1])

    def plain(a, b):
        return jnp.matmul(a, b, preferred_element_type=preferred_element_type)

    # (float16: XLA on CPU runs it in float32 either way, and a float16 cotangent would lose small gradients)
    bf16 = x.dtype == w.dtype == jnp.bfloat16
    if CPU_F32_ACCUMULATE and bf16 and preferred_element_type in (None, jnp.float32):
        out = x.dtype if preferred_element_type is None else jnp.float32
        y = jax.lax.platform_dependent(x2, w, cpu=lambda a, b: matmul_f32_accumulate(a, b, out), default=plain)
    else:
        y = plain(x2, w)
    return y.reshape(*x.shape[:-1], w.shape[-1])


def _as_bits(*arrays: Array) -> tuple:
    """Residuals for a backward pass, bfloat16s bitcast to uint16 (`_from_bits` undoes it).

    A scanned layer's residuals are stacked over the layers and sliced per layer in the backward. XLA on
    CPU does not slice or update bfloat16 arrays natively: it converts every stacked bf16 residual to
    float32 as a whole (twice the bytes, outside the loop) and back per slice. The same bits as uint16 are
    sliced in place (a bitcast: no data movement expected on GPU and TPU)."""
    return tuple(jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == jnp.bfloat16 else a for a in arrays)


def _from_bits(*arrays: Array) -> tuple:
    """`_as_bits` undone: uint16 arrays back to bfloat16, the rest as they are."""
    return tuple(jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a for a in arrays)


def _dot_f32(a: Array, b: Array, out, b_contracting: int = 0) -> Array:
    """a [n, k] · b (b [k, o], or b [o, k] with b_contracting=1) summed in float32, returned as `out`.
    A transposed operand is named in the contracting dims, not by a transpose: XLA on CPU sends
    `a @ b.T` to the float32 generic kernels (bench/RESULTS.md, "bf16 matmuls on the CPU")."""
    dims = (((1,), (b_contracting,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(out)


def _transposed_copy(x: Array) -> Array:
    """x [n, i] (bf16, n even) → xᵀ [i, n] written out, as a matmul operand that XLA cannot fold back.

    A plain transpose feeding a dot is folded into the dot's contracting dimensions (algebraic
    simplifier and transpose folding, through elementwise ops too); a dot contracting its left
    operand's leading axis is not one XLA on CPU gives to YNNPACK, so it runs in float32 on the generic
    kernels (bench/RESULTS.md, "bf16 matmuls on the CPU": 2.3-4.7x slower than with the copy). Pairs of
    rows are moved as one 32-bit word ([n/2, 2, i] → [i, n/2, 2] → uint32 → back), a transpose of a different
    shape and dtype than the dot's operand, which no pass rewrites into it."""
    n, i = x.shape
    pairs = jnp.transpose(x.reshape(n // 2, 2, i), (2, 0, 1))
    words = jax.lax.bitcast_convert_type(pairs, jnp.uint32)
    return jax.lax.bitcast_convert_type(words, x.dtype).reshape(i, n)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_f32_accumulate(x: Array, w: Array, out) -> Array:
    """x [n, i] @ w [i, o] of bfloat16s, summed in float32 and returned as `out` (x's dtype or
    float32); the backward's two matmuls take the cotangent in x's dtype and sum in float32 too.

    XLA on CPU runs a bfloat16 dot with a bfloat16 result on its generic kernels, slower than float32,
    but one with a float32 result through YNNPACK (the CPU's bf16 units: AMX where measured, 1.7-5.2x
    float32's rate at train-step shapes; bench/RESULTS.md). Plain autodiff would feed the float32
    cotangent to mixed-dtype (float32) dots; here the gradient is rounded to x's dtype first, as
    mixed-precision training does everywhere else (torch.autocast included), and the weight gradient
    contracts the tokens of a written-out xᵀ (`_transposed_copy`). Reverse mode only (like `attend`):
    `jax.jvp` through it raises. Meshes with Auto axes (`sharding.make_mesh`); under Explicit axes the
    weight gradient's token-sharded contraction would need a sharding rule."""
    return _dot_f32(x, w, out)


def _matmul_f32_accumulate_fwd(x, w, out):
    return _dot_f32(x, w, out), _as_bits(x, w)


def _matmul_f32_accumulate_bwd(out, res, g):
    x, w = _from_bits(*res)
    g = g.astype(x.dtype)
    dx = _dot_f32(g, w, x.dtype, b_contracting=1)
    if x.shape[0] % 2:  # an odd number of tokens: one zero row more, which adds nothing to xᵀ g
        x, g = (jnp.pad(a, ((0, 1), (0, 0))) for a in (x, g))
    return dx, _dot_f32(_transposed_copy(x), g, w.dtype)


matmul_f32_accumulate.defvjp(_matmul_f32_accumulate_fwd, _matmul_f32_accumulate_bwd)


# ----------------------------------------------------------------------------------- pieces


class Norm(nnx.Module):
    """RMSNorm (Llama) or LayerNorm with bias (Falcon); computed in float32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: int = 0):
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.scale = _param(rngs, cfg, (cfg.hidden_size,), ("embed",), "ones", stack)
        if cfg.norm == "layer":
            self.bias = _param(rngs, cfg, (cfg.hidden_size,), ("embed",), "zeros", stack)

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        if self.kind == "rms":
            x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
            return (x * self.scale[...].astype(jnp.float32)).astype(dtype)
        x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(dtype)


def rope_inv_freq(cfg: ModelConfig) -> Array:
    """Inverse frequencies of rotary embeddings, with linear / Llama-3 scaling if configured."""
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.kind == "linear":
        return inv / s.factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    wavelen = 2 * math.pi / inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, positions: Array) -> tuple[Array, Array]:
    """cos and sin of the rotary angles [b, s, head_dim / 2] at `positions` [b, s], computed once per
    forward for every layer's queries and keys (`computed_once`)."""

    def tables(positions):
        angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(cfg)
        return jnp.cos(angles), jnp.sin(angles)

    return computed_once(tables, positions)


def computed_once(f, *args):
    """f(*args), written to buffers of their own that every consumer reads.

    XLA on CPU fuses a producer into each of its consumers and evaluates it there: the rotary tables' cosine
    and sine (slow on CPU: 0.5 ms for a [8, 128, 32] table, exp 0.02 ms) were evaluated inside each of the 16
    fusions that rotate queries and keys in a 4-layer unrolled train step, forward and backward; computed
    once, the step takes 2-7% less time (bench/RESULTS.md). An optimization barrier is gone before fusion
    there, but fusion does not cross a conditional: on CPU, f runs in both branches of one whose predicate (a
    True behind a barrier) XLA does not fold (jax 0.10.2; `test_rotary_tables_are_computed_once_per_pass`
    checks it), so either branch gives f(*args). Elsewhere: f(*args)."""

    def cpu(*args):
        return jax.lax.cond(jax.lax.optimization_barrier(jnp.bool_(True)), f, f, *args)

    return jax.lax.platform_dependent(*args, cpu=cpu, default=f)


def apply_rope(x: Array, rope: tuple[Array, Array]) -> Array:
    """Rotate-half rotary embedding (HF layout). x: [b, heads, s, head_dim]; rope: `rope_tables`."""
    cos, sin = (t[:, None] for t in rope)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _attend_forward(q: Array, k: Array, v: Array, mask: Array) -> tuple:
    """(softmax(q kᵀ / sqrt(hd), masked) v, its float32 probabilities). q: [b, kv_heads, groups, s, hd];
    k, v: [b, kv_heads, t, hd]; mask: [b, s, t] bool (query may attend key)."""
    scores = jnp.einsum("bkgsd,bktd->bkgst", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bkgst,bktd->bkgsd", probs.astype(q.dtype), v), probs


@jax.custom_vjp
def attend(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Scaled dot-product attention with grouped KV heads (`_attend_forward`), with a hand-written
    backward (`_attend_backward`)."""
    return _attend_forward(q, k, v, mask)[0]


def _attend_vjp_forward(q, k, v, mask):
    out, probs = _attend_forward(q, k, v, mask)
    return out, (*_as_bits(q, k, v, out), mask, probs)


def _attend_backward(res, d_out):
    """Gradients of o = P v with P = softmax(S), S = q kᵀ / sqrt(hd) (masked entries constant):

        dv = Pᵀ do,   dP = do vᵀ,   dS = P ⊙ (dP − rowsum(do ⊙ o)),   dq = dS k / sqrt(hd),   dk = dSᵀ q / sqrt(hd)

    rowsum(do ⊙ o) = rowsum(P ⊙ dP) is the softmax Jacobian's correction, summed over head_dim instead
    of over the keys; the scale is applied once to dS. Autodiff of the forward instead reduces over the
    [.., s, t] scores and then differentiates the mask's select and the division separately (slower
    on CPU: bench/RESULTS.md)."""
    (q, k, v, out), (mask, probs) = _from_bits(*res[:4]), res[4:]
    dt, f32 = q.dtype, jnp.float32
    dv = jnp.einsum("bkgst,bkgsd->bktd", probs.astype(dt), d_out)
    dp = jnp.einsum("bkgsd,bktd->bkgst", d_out, v, preferred_element_type=f32)
    row = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    # Masked keys have P = 0 unless the whole row is masked (uniform P): the select keeps those rows'
    # gradient at zero, as differentiating the forward's select does.
    ds = jnp.where(mask[:, None, None], probs * (dp - row), 0.0) / math.sqrt(q.shape[-1])
    dq = jnp.einsum("bkgst,bktd->bkgsd", ds.astype(dt), k)
    dk = jnp.einsum("bkgst,bkgsd->bktd", ds.astype(dt), q)
    return dq, dk, dv, None


attend.defvjp(_attend_vjp_forward, _attend_backward)


def _saving_inputs(f, grads):
    """f with a VJP that saves only f's inputs (2-byte, `_as_bits`) and computes the input gradients
    `grads(dy, *inputs)` in float32 from them, cast back to the inputs' dtypes; autodiff of an activation
    would save its intermediates too (five [tokens, mlp] arrays per layer for SwiGLU)."""
    fn = jax.custom_vjp(f)

    def backward(res, dy):
        inputs = _from_bits(*res)
        grads32 = grads(*(a.astype(jnp.float32) for a in (dy, *inputs)))
        return tuple(d.astype(a.dtype) for d, a in zip(grads32, inputs))

    fn.defvjp(lambda *inputs: (f(*inputs), _as_bits(*inputs)), backward)
    return fn


def _swiglu_grads(dh, g, u):
    """d gate = dh · up · σ(g)(1 + g(1 − σ(g))),  d up = dh · silu(g)."""
    sig = jax.nn.sigmoid(g)
    return dh * u * sig * (1 + g * (1 - sig)), dh * g * sig


def _gelu_grads(dy, z):
    """d x = dy · (Φ(x) + x·φ(x))."""
    cdf = 0.5 * (1 + jax.lax.erf(z / math.sqrt(2)))
    pdf = jnp.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return (dy * (cdf + z * pdf),)


swiglu = _saving_inputs(lambda gate, up: jax.nn.silu(gate) * up, _swiglu_grads)  # silu(gate) · up
gelu = _saving_inputs(partial(jax.nn.gelu, approximate=False), _gelu_grads)  # exact (erf) GELU x·Φ(x)


class Attention(nnx.Module):
    """Multi-head attention with grouped/multi-query KV heads and rotary embeddings."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: int = 0):
        self.cfg = cfg
        d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = _param(rngs, cfg, (d, h, hd), ("embed", "q_heads", "head_dim"), "normal", stack)
        self.k = _param(rngs, cfg, (d, k, hd), ("embed", "kv_heads", "head_dim"), "normal", stack)
        self.v = _param(rngs, cfg, (d, k, hd), ("embed", "kv_heads", "head_dim"), "normal", stack)
        self.o = _param(rngs, cfg, (h, hd, d), ("q_heads", "head_dim", "embed"), "normal", stack)
        for name, heads, axis in (("q", h, "q_heads"), ("k", k, "kv_heads"), ("v", k, "kv_heads")):
            _lora_factors(self, rngs, cfg, name, (d,), ("embed",), (heads, hd), (axis, "head_dim"), stack)
        _lora_factors(self, rngs, cfg, "o", (h, hd), ("q_heads", "head_dim"), (d,), ("embed",), stack)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, cfg, (h, hd), ("q_heads", "head_dim"), "zeros", stack)
            self.k_bias = _param(rngs, cfg, (k, hd), ("kv_heads", "head_dim"), "zeros", stack)
            self.v_bias = _param(rngs, cfg, (k, hd), ("kv_heads", "head_dim"), "zeros", stack)
        if cfg.out_bias:
            self.o_bias = _param(rngs, cfg, (d,), ("embed",), "zeros", stack)

    def _project(self, x: Array, name: str) -> Array:
        dtype = _dtype(self.cfg.dtype)
        w = getattr(self, name)[...].astype(dtype)  # [d, heads, hd]
        # A plain [b·s, d] x [d, heads·hd] matmul, then head-major: written as one einsum, XLA on CPU
        # transposes the weight at every call (every decode step).
        y = jnp.swapaxes(token_matmul(x, w.reshape(w.shape[0], -1)).reshape(*x.shape[:2], *w.shape[1:]), 1, 2)
        y = _with_lora(self, name, y, x.astype(dtype), "bsd,dr->bsr", "bsr,rhk->bhsk")
        if self.cfg.qkv_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(dtype)[:, None]
        return y

    def __call__(self, x: Array, rope: tuple, mask: Array, kv: Optional[tuple]) -> tuple:
        """x: [b, s, d]; rope: the rotary tables of the tokens' positions (`rope_tables`); mask: [b, s, t]
        bool (query may attend key); kv: None or the cache (k [layers, b, kv_heads, t, hd], v, this
        layer's index, first slot to write), or this layer's own cache (k [b, kv_heads, t, hd], v, None,
        first slot to write).

        Returns (output [b, s, d], the updated stacked (k, v) cache, or the fresh keys/values).
        The cache is updated in place (only the new slots are written), so a decode step costs
        no copy of the cache.
        """
        cfg = self.cfg
        q = apply_rope(self._project(x, "q"), rope)
        k = apply_rope(self._project(x, "k"), rope)
        v = self._project(x, "v")
        q = sharding.constrain(q, ("batch", "q_heads", "length", "head_dim"))
        if kv is not None:
            cache_k, cache_v, layer, index = kv
            if layer is None:  # this layer's own cache [b, kv_heads, t, hd]
                start, new_k, new_v = (0, 0, index, 0), k, v
            else:  # the stacked cache [layers, b, kv_heads, t, hd]
                start, new_k, new_v = (layer, 0, 0, index, 0), k[None], v[None]
            cache_k = jax.lax.dynamic_update_slice(cache_k, new_k.astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, new_v.astype(cache_v.dtype), start)
            k, v = (cache_k, cache_v) if layer is None else (cache_k[layer], cache_v[layer])
        b, h, s, hd = q.shape
        q = q.reshape(b, cfg.num_kv_heads, h // cfg.num_kv_heads, s, hd)
        out_heads = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask).reshape(b, h, s, hd)
        o = self.o[...].astype(q.dtype)  # [heads, hd, d]
        out = token_matmul(jnp.swapaxes(out_heads, 1, 2).reshape(b, s, h * hd), o.reshape(h * hd, -1))
        out = _with_lora(self, "o", out, out_heads, "bhsk,hkr->bsr", "bsr,rd->bsd")
        if cfg.out_bias:
            out = out + self.o_bias[...].astype(q.dtype)
        return out, ((k, v) if kv is None else (cache_k, cache_v))


class MLP(nnx.Module):
    """SwiGLU (Llama: down(silu(gate x) * up x)) or GELU (Falcon: down(gelu(up x)))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: int = 0):
        self.cfg = cfg
        d, f = cfg.hidden_size, cfg.mlp_dim
        if cfg.activation == "swiglu":
            self.gate = _param(rngs, cfg, (d, f), ("embed", "mlp"), "normal", stack)
        self.up = _param(rngs, cfg, (d, f), ("embed", "mlp"), "normal", stack)
        self.down = _param(rngs, cfg, (f, d), ("mlp", "embed"), "normal", stack)
        for name in ("gate", "up"):
            _lora_factors(self, rngs, cfg, name, (d,), ("embed",), (f,), ("mlp",), stack)
        _lora_factors(self, rngs, cfg, "down", (f,), ("mlp",), (d,), ("embed",), stack)
        if cfg.mlp_bias:
            self.up_bias = _param(rngs, cfg, (f,), ("mlp",), "zeros", stack)
            self.down_bias = _param(rngs, cfg, (d,), ("embed",), "zeros", stack)
            if cfg.activation == "swiglu":
                self.gate_bias = _param(rngs, cfg, (f,), ("mlp",), "zeros", stack)

    def _dense(self, x: Array, name: str) -> Array:
        y = _with_lora(self, name, token_matmul(x, getattr(self, name)[...].astype(x.dtype)), x, "...i,ir->...r",
                       "...r,ro->...o")
        return y + getattr(self, f"{name}_bias")[...].astype(x.dtype) if self.cfg.mlp_bias else y

    def __call__(self, x: Array) -> Array:
        x = x.astype(_dtype(self.cfg.dtype))
        if self.cfg.activation == "swiglu":
            h = swiglu(self._dense(x, "gate"), self._dense(x, "up"))
        else:
            h = gelu(self._dense(x, "up"))
        h = sharding.constrain(h, ("batch", "length", "mlp"))
        return self._dense(h, "down")


class Block(nnx.Module):
    """A decoder layer: sequential (Llama) or parallel attention + MLP (Falcon)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, stack: int = 0):
        self.cfg = cfg
        self.attn = Attention(cfg, rngs, stack)
        self.mlp = MLP(cfg, rngs, stack)
        self.attn_norm = Norm(cfg, rngs, stack)
        if cfg.num_block_norms == 2:
            self.mlp_norm = Norm(cfg, rngs, stack)

    def __call__(self, x: Array, rope: tuple, mask: Array, kv: Optional[tuple]) -> tuple:
        h = self.attn_norm(x)
        attn, new_kv = self.attn(h, rope, mask, kv)
        if self.cfg.parallel_block:
            mlp_in = self.mlp_norm(x) if self.cfg.num_block_norms == 2 else h
            x = x + attn + self.mlp(mlp_in)
        else:
            x = x + attn
            x = x + self.mlp(self.mlp_norm(x))
        return sharding.constrain(x, ("batch", "length", "embed")), new_kv


_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Decoder(nnx.Module):
    """Token embedding → stacked blocks → final norm → LM head (float32 logits)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, cfg, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), "normal", 0)
        self.layers = Block(cfg, rngs, stack=cfg.num_layers)
        self.final_norm = Norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, cfg, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), "normal", 0)

    def hidden_states(self, tokens: Array, positions: Array, mask: Array, cache: Optional[dict] = None,
                      layers: Optional[tuple] = None, rope: Optional[tuple] = None):
        """Final-norm hidden states [b, s, d] and the updated KV cache (or None).

        rope: the rotary tables at `positions` (`rope_tables`) when the caller has them already.

        layers: None (the stacked weights of `self.layers`, applied with `lax.scan`) or a tuple of
        per-layer weights (`core.unstack_layers`), applied one after another in the traced program.
        """
        cfg = self.cfg
        x = jnp.take(self.embed[...], tokens, axis=0).astype(_dtype(cfg.dtype))
        x = sharding.constrain(x, ("batch", "length", "embed"))
        rope = rope_tables(cfg, positions) if rope is None else rope
        graphdef, layer_params = nnx.split(self.layers)
        if layers is not None:
            return self._unrolled(graphdef, layers, x, rope, mask, cache)

        def layer(carry, per_layer):
            x, kv = carry
            params, i = per_layer
            kv_in = None if kv is None else (*kv, i, cache["index"])
            x, new_kv = nnx.merge(graphdef, params)(x, rope, mask, kv_in)
            return (x, None if kv is None else new_kv), None

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT[cfg.remat], prevent_cse=not cfg.scan_layers)
        kv = None if cache is None else (cache["k"], cache["v"])
        (x, new_kv), _ = jax.lax.scan(layer, (x, kv), (layer_params, jnp.arange(cfg.num_layers)),
                                      unroll=1 if cfg.scan_layers else cfg.num_layers)
        new_cache = None
        if cache is not None:
            new_cache = {**cache, "k": new_kv[0], "v": new_kv[1]}
        return self.final_norm(x), new_cache

    def _unrolled(self, graphdef, layers: tuple, x: Array, rope: tuple, mask: Array, cache: Optional[dict]):
        """The layers one after another on their own weight and KV buffers (a per-layer cache,
        `core.init_cache(per_layer=True)`): nothing is sliced out of a stacked array, which XLA on CPU
        copies at every decode step."""
        if cache is not None and not isinstance(cache["k"], tuple):
            raise ValueError("unstacked params decode with a per-layer KV cache: core.init_cache(..., per_layer=True)")
        ks, vs = (None, None) if cache is None else (list(cache["k"]), list(cache["v"]))
        for i, params in enumerate(layers):
            kv = None if cache is None else (ks[i], vs[i], None, cache["index"])
            x, new_kv = nnx.merge(graphdef, params)(x, rope, mask, kv)
            if cache is not None:
                ks[i], vs[i] = new_kv
        new_cache = None if cache is None else {**cache, "k": tuple(ks), "v": tuple(vs)}
        return self.final_norm(x), new_cache

    def logits(self, h: Array) -> Array:
        head = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        logits = token_matmul(h, head.astype(h.dtype), preferred_element_type=jnp.float32)
        return sharding.constrain(logits, ("batch", "length", "vocab"))

    def __call__(self, tokens: Array, positions: Array, mask: Array, cache: Optional[dict] = None):
        h, cache = self.hidden_states(tokens, positions, mask, cache)
        return self.logits(h), cache

