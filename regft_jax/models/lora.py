"""LoRA adapters on the decoder's linear projections (Hu et al., 2021).

    cfg, params = add_lora(cfg, params, rank=8, alpha=16, targets="all", rng=key, mesh=mesh)
    ...train: only the factors move (core.module stops the gradient of every other weight;
       steps.make_optimizer(only_lora=True) updates only the factors)...
    cfg0, merged = merge_lora(cfg, params)      # plain weights W + (α / r) A B, e.g. for save_hf

A target projection W gets factors A [in, r] (random) and B [r, out] (zero), stored beside it as
`<name>_lora_a` / `<name>_lora_b` (stacked over layers like W), and computes x W + (α / r) (x A) B.
LoRA settings are runtime fields of ModelConfig: a base checkpoint loads without them, and `add_lora`
puts fresh factors on it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from regft_jax import sharding as shd
from regft_jax.models.config import ConfigError, ModelConfig
from regft_jax.models.core import abstract_params, init_params, param_logical_axes

SUFFIXES = ("_lora_a", "_lora_b")


def is_lora_key(name: str) -> bool:
    return name.endswith(SUFFIXES)


def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def labels(params: dict) -> dict:
    """"lora" for every LoRA factor, "frozen" for every other leaf (optax.multi_transform labels)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: "lora" if is_lora_key(_leaf_name(p)) else "frozen", params)


def stop_base_gradients(params: dict) -> dict:
    """Every leaf that is not a LoRA factor behind `lax.stop_gradient` (its gradient is an exact zero that
    XLA never computes)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x if is_lora_key(_leaf_name(p)) else jax.lax.stop_gradient(x), params)


def parse_targets(targets, cfg: ModelConfig, key: str = "config.lora.targets") -> tuple:
    """"all" (every projection of the architecture) or a comma-separated list / sequence of names."""
    names = cfg.projections if targets == "all" else (
        tuple(t.strip() for t in targets.split(",") if t.strip()) if isinstance(targets, str) else tuple(targets))
    bad = [t for t in names if t not in cfg.projections]
    if not names or bad or len(set(names)) != len(names):
        raise ConfigError(f"{key}={targets!r}: expected 'all' or distinct names among {', '.join(cfg.projections)}"
                          f" (this {cfg.family} decoder's projections)")
    return names


def add_lora(cfg: ModelConfig, params: dict, *, rank: int, alpha: float, targets="all", rng: jax.Array,
             mesh=None, rules=None) -> tuple[ModelConfig, dict]:
    """(cfg with LoRA, params + fresh factors: A random, B zero, so the model is unchanged). The factors
    are placed on `mesh` by their logical axes; the existing weights are kept as they are (not copied)."""
    if cfg.lora_rank:
        raise ConfigError(f"add_lora: the model already has LoRA factors of rank {cfg.lora_rank}")
    if int(rank) < 1:
        raise ConfigError(f"config.lora.rank={rank}: expected a positive rank (0 = no LoRA)")
    lcfg = cfg.replace(lora_rank=int(rank), lora_alpha=float(alpha), lora_targets=parse_targets(targets, cfg))
    mesh = mesh if mesh is not None else shd.make_mesh()
    only = lambda tree: _select(tree, True)  # noqa: E731
    shardings = shd.param_shardings(mesh, only(param_logical_axes(lcfg)), only(abstract_params(lcfg)), rules)
    # the jitted init returns the factors only: XLA drops the unused random base weights
    factors = jax.jit(lambda key: only(init_params(lcfg, key)), out_shardings=shardings)(rng)
    return lcfg, _merge_trees(params, factors)


def merge_lora(cfg: ModelConfig, params: dict) -> tuple[ModelConfig, dict]:
    """(cfg without LoRA, params with every target W replaced by W + (α / r) A B, factors dropped):
    the same function as the adapted model, in the plain architecture (for export or as a new base)."""
    if not cfg.lora_rank:
        return cfg, params
    scale = cfg.lora_scale

    def merge(block: dict) -> dict:
        out = {k: v for k, v in block.items() if not is_lora_key(k)}
        for name in cfg.lora_targets:
            if f"{name}_lora_a" not in block:
                continue
            w, a, b = block[name], block[f"{name}_lora_a"], block[f"{name}_lora_b"]
            layers, r = a.shape[0], a.shape[-1]
            delta = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, r).astype(jnp.float32),
                               b.reshape(layers, r, -1).astype(jnp.float32)).reshape(w.shape)
            out[name] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
        return out

    layers = {part: merge(block) if isinstance(block, dict) else block for part, block in params["layers"].items()}
    return cfg.replace(lora_rank=0, lora_targets=()), {**params, "layers": layers}


def _select(tree: dict, lora: bool) -> dict:
    """The sub-tree of LoRA factors (lora=True) or of everything else, empty branches dropped."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _select(v, lora)
            if sub:
                out[k] = sub
        elif is_lora_key(k) == lora:
            out[k] = v
    return out


def _merge_trees(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge_trees(out[k], v) if isinstance(v, dict) and k in out else v
    return out


def lora_factors(params: dict) -> dict:
    return _select(params, True)


def from_config(config, cfg: ModelConfig, params: dict, mesh) -> tuple[ModelConfig, dict]:
    """`config.lora` applied to the base model: unchanged for rank 0, else `add_lora` (seeded by config.seed)."""
    lora = config.get("lora")
    if lora is None or int(lora.rank) == 0:
        return cfg, params
    return add_lora(cfg, params, rank=int(lora.rank), alpha=float(lora.alpha), targets=lora.targets,
                    rng=jax.random.key(config.seed + 11), mesh=mesh)


def describe(cfg: ModelConfig, params: dict) -> Optional[str]:
    if not cfg.lora_rank:
        return None
    n = sum(x.size for x in jax.tree.leaves(lora_factors(params)))
    total = sum(x.size for x in jax.tree.leaves(params))
    return (f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on {','.join(cfg.lora_targets)}: "
            f"{n:,} trainable parameters ({100 * n / total:.2f}% of {total:,})")
