"""All of the project's sharding: the device mesh, logical → mesh axis rules, and shardings.

Model code names array dimensions with logical axes ("batch", "embed", "mlp", "q_heads", ...).
This module maps them onto the mesh axes ("data", "fsdp", "tensor"):

    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    shardings = param_shardings(mesh, param_logical_axes(cfg), abstract_params(cfg))

A mesh axis that does not divide an array dimension is dropped for that array (it is replicated
along it instead), so e.g. a multi-query KV projection with 1 head works on tensor=4.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from regft_jax.errors import UserInputError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
DEFAULT_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    "lora": None,  # LoRA rank: small, replicated
}


class ShardingError(UserInputError):
    """A mesh or sharding request that cannot be satisfied."""


def make_mesh(shape: Union[Mapping[str, int], Sequence[int], None] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axis types.

    shape: {"data": d, "fsdp": f, "tensor": t} or a 3-tuple; one entry may be -1 (fill with the
    remaining devices). Default: all devices on "fsdp".
    """
    devices = list(devices if devices is not None else jax.devices())
    if shape is None:
        shape = {"data": 1, "fsdp": -1, "tensor": 1}
    if not isinstance(shape, Mapping):
        shape = dict(zip(MESH_AXES, shape))
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ShardingError(f"mesh shape has unknown axes {sorted(unknown)}; axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ShardingError(f"mesh shape {dict(shape)}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or len(devices) % known:
            raise ShardingError(f"mesh shape {dict(shape)} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices) or min(sizes) < 1:
        raise ShardingError(
            f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are available"
        )
    device_array = np.asarray(devices).reshape(sizes)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(logical_axes: Sequence[Optional[str]], mesh: Mesh,
                    shape: Optional[Sequence[int]] = None,
                    rules: Optional[Mapping[str, Any]] = None) -> P:
    """PartitionSpec for an array with the given logical axes.

    Mesh axes that are of size 1, already used by an earlier dimension, or that do not divide the
    dimension (when `shape` is given) are dropped.
    """
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for dim, name in enumerate(logical_axes):
        if name is not None and name not in rules:
            raise ShardingError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        target = rules.get(name) if name is not None else None
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        chosen = []
        for axis in targets:
            size = mesh.shape[axis]
            extent = math.prod(mesh.shape[a] for a in chosen) * size
            if axis in used or size == 1 or (shape is not None and shape[dim] % extent):
                continue
            chosen.append(axis)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[Optional[str]],
                   shape: Optional[Sequence[int]] = None, rules=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, shape, rules))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def param_shardings(mesh: Mesh, logical_axes: Any, abstract: Any, rules=None) -> Any:
    """NamedSharding per parameter, from trees of logical axes and of shapes (same structure)."""
    return jax.tree.map(lambda axes, a: named_sharding(mesh, axes, a.shape, rules),
                        logical_axes, abstract, is_leaf=_is_axes)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=None) -> NamedSharding:
    """Sharding of a [batch, ...] array: batch over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh, None, rules))


def tree_batch_shardings(mesh: Mesh, tree: Any, rules=None) -> Any:
    """batch_sharding for every array leaf of `tree` (scalars are replicated)."""
    return jax.tree.map(lambda a: batch_sharding(mesh, a.ndim, rules) if a.ndim else replicated(mesh), tree)


def batch_shards(mesh: Mesh, rules=None) -> int:
    """The data-parallel size: how many shards `batch_sharding` splits a batch into (the product of
    the mesh axes the "batch" rule maps to)."""
    spec = logical_to_spec(("batch",), mesh, None, rules)[0]
    return math.prod(mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else tuple(spec or ())))


# Per-shard row windows. A batch sharded over its rows holds `shards` equal contiguous blocks of
# rows, one per data-parallel shard. Slicing the same window out of every block (instead of one
# global row range) keeps the result evenly sharded with no communication; a global range that is
# not aligned with the blocks cannot stay sharded (XLA replicates it, or would have to move the
# [rows, seq, vocab] outputs back to the devices owning those rows). `data.batching.dealt_order`
# lays a batch out so that each block holds its share of every domain.


def shard_window(x: jax.Array, lo: int, hi: int, shards: int) -> jax.Array:
    """Rows lo..hi−1 of each of the `shards` row blocks of x: [b, ...] → [shards·(hi−lo), ...]."""
    blocks = x.reshape(shards, x.shape[0] // shards, *x.shape[1:])
    return blocks[:, lo:hi].reshape(shards * (hi - lo), *x.shape[1:])


def unshard_window(y: jax.Array, lo: int, hi: int, block: int, shards: int) -> jax.Array:
    """The inverse of `shard_window` for blocks of `block` rows, zeros outside the windows."""
    y = y.reshape(shards, hi - lo, *y.shape[1:])
    y = jnp.pad(y, ((0, 0), (lo, block - hi)) + ((0, 0),) * (y.ndim - 2))
    return y.reshape(shards * block, *y.shape[2:])


def opt_state_shardings(optimizer, abstract_params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of an optax state: parameter-shaped parts follow their parameter, the rest
    (step counts, scalars) is replicated."""
    import optax

    abstract_state = jax.eval_shape(optimizer.init, abstract_params)
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731  (a leaf no state is kept for)
    return optax.tree_map_params(
        optimizer,
        lambda state, s: state if masked(state) else s,
        abstract_state,
        params_shardings,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=masked,
    )


def abstract_on(tree: Any, shardings: Any) -> Any:
    """Shapes and dtypes of `tree`'s leaves placed on `shardings` (jax.ShapeDtypeStruct leaves: a
    restore or compilation target that allocates nothing)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def shard_tree(tree: Any, shardings: Any) -> Any:
    """Place a (host or device) pytree onto `shardings`."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, shardings)


# ------------------------------------------------------------- activation constraints (optional)

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("regft_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Optional[Mesh], rules: Optional[Mapping[str, Any]] = None) -> Iterator[None]:
    """While tracing under this context, `constrain` pins activations to the mesh."""
    token = _ACTIVE.set(None if mesh is None else (mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
    """Sharding constraint by logical axes; the identity when no mesh is active (model code
    calls this and stays mesh-agnostic)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, logical_axes, x.shape, rules))


def constrain_kv_cache(cache: dict) -> dict:
    """`constrain` on a KV cache (`models.init_cache`): keys and values stacked over layers
    [layers, b, kv_heads, t, hd], or one [b, kv_heads, t, hd] array per layer."""
    axes = ("batch", "kv_heads", "length", "head_dim")
    put = lambda a: constrain(a, axes if a.ndim == len(axes) else ("layers", *axes))
    return {**cache, "k": jax.tree.map(put, cache["k"]), "v": jax.tree.map(put, cache["v"])}
