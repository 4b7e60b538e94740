"""HF safetensors checkpoints <-> our params, in both directions, without torch.

Loading streams one HF tensor at a time from the memory-mapped safetensors files and scatters it
into per-device shards of its target sharding, so a 7B checkpoint never has a second full copy
in host memory (peak: one stacked parameter's distinct shards + one HF tensor). Export writes
safetensors shards of bounded size (plus `model.safetensors.index.json` when there are several)
and a `config.json` that HF transformers loads.

The name/layout mapping is a table of `Rule`s per family: which HF tensors (per layer `{i}` or
global) make which of our parameters, and the two transforms. HF linear weights are [out, in];
ours are [in, out] with heads split out: q [d, heads, head_dim], o [heads, head_dim, d].
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from regft_jax import sharding as shd
from regft_jax.errors import UserInputError
from regft_jax.models.config import ModelConfig, read_hf_config, to_hf_config
from regft_jax.models.core import abstract_params, param_logical_axes

Path = tuple[str, ...]


class CheckpointError(UserInputError):
    """An HF checkpoint directory whose files or tensors do not match the model."""


# ------------------------------------------------------------------------ safetensors reading


class SafetensorsDir:
    """Lazy access to the tensors of an HF checkpoint directory (single file or sharded index)."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            self.file_of = {k: os.path.join(hf_dir, v) for k, v in weight_map.items()}
        elif os.path.isfile(single):
            self.file_of = None
            self._single = single
        else:
            found = sorted(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else "directory does not exist"
            raise CheckpointError(
                f"{hf_dir}: no model.safetensors or model.safetensors.index.json (found: {found})"
            )
        self._handles: dict[str, object] = {}
        if self.file_of is None:
            self.file_of = {k: single for k in self._open(single).keys()}
        for path in set(self.file_of.values()):
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: shard listed in the index is missing")

    def _open(self, path: str):
        if path not in self._handles:
            self._handles[path] = safe_open(path, framework="np")
        return self._handles[path]

    def keys(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.file_of[name]).get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._open(self.file_of[name]).get_tensor(name)


# --------------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class Rule:
    """HF tensors `hf` (names; `{i}` = layer) <-> our params `ours` (paths), per layer if stacked.

    to_ours(cfg, *hf_arrays) -> tuple of our arrays; to_hf(cfg, *our_arrays) -> tuple of HF arrays;
    hf_shapes(cfg) -> expected HF shapes.
    """

    hf: tuple[str, ...]
    ours: tuple[Path, ...]
    to_ours: Callable
    to_hf: Callable
    hf_shapes: Callable
    stacked: bool = True


def _same(cfg, *xs):
    return xs


def _transpose(cfg, *xs):
    return tuple(np.ascontiguousarray(x.T) for x in xs)


def _heads_in(heads_of: Callable[[ModelConfig], int]):
    """HF [heads*hd, d] <-> ours [d, heads, hd]."""

    def to_ours(cfg, w):
        return (np.ascontiguousarray(w.T).reshape(cfg.hidden_size, heads_of(cfg), cfg.head_dim),)

    def to_hf(cfg, w):
        return (np.ascontiguousarray(w.reshape(cfg.hidden_size, -1).T),)

    return to_ours, to_hf


def _heads_bias(heads_of):
    """HF [heads*hd] <-> ours [heads, hd]."""
    return (lambda cfg, b: (b.reshape(heads_of(cfg), cfg.head_dim),), lambda cfg, b: (b.reshape(-1),))


def _out_proj():
    """HF [d, heads*hd] <-> ours [heads, hd, d]."""

    def to_ours(cfg, w):
        return (np.ascontiguousarray(w.T).reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size),)

    def to_hf(cfg, w):
        return (np.ascontiguousarray(w.reshape(-1, cfg.hidden_size).T),)

    return to_ours, to_hf


def _falcon_qkv_split(cfg: ModelConfig, fused: np.ndarray):
    """Falcon fused query_key_value rows -> (q [.., H, hd], k [.., K, hd], v [.., K, hd]).

    `fused` is [out, ...] (weight rows, or the bias); the layout depends on the architecture.
    """
    h, k, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rest = fused.shape[1:]
    if cfg.qkv_layout == "falcon_grouped":  # per kv group: r queries, then k, then v
        g = fused.reshape(k, h // k + 2, hd, *rest)
        return g[:, :-2].reshape(h, hd, *rest), g[:, -2], g[:, -1]
    if cfg.qkv_layout == "falcon_mqa":  # all queries, then the single k, then v
        g = fused.reshape(h + 2, hd, *rest)
        return g[:h], g[h:h + 1], g[h + 1:]
    g = fused.reshape(h, 3, hd, *rest)  # falcon_interleaved: per head q, k, v
    return g[:, 0], g[:, 1], g[:, 2]


def _falcon_qkv_merge(cfg: ModelConfig, q, k, v):
    """Inverse of _falcon_qkv_split: ([H, hd, ...], [K, hd, ...], [K, hd, ...]) -> [out, ...]."""
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    rest = q.shape[2:]
    if cfg.qkv_layout == "falcon_grouped":
        g = np.concatenate([q.reshape(kv, h // kv, hd, *rest), k[:, None], v[:, None]], axis=1)
    elif cfg.qkv_layout == "falcon_mqa":
        g = np.concatenate([q, k, v], axis=0)
    else:
        g = np.stack([q, k, v], axis=1)
    return np.ascontiguousarray(g.reshape(-1, *rest))


def _falcon_qkv_weight():
    def to_ours(cfg, w):  # HF [out, d] -> ours q [d, H, hd], k/v [d, K, hd]
        return tuple(np.ascontiguousarray(np.moveaxis(x, -1, 0)) for x in _falcon_qkv_split(cfg, w))

    def to_hf(cfg, q, k, v):
        return (_falcon_qkv_merge(cfg, *(np.moveaxis(x, 0, -1) for x in (q, k, v))),)

    return to_ours, to_hf


def _falcon_qkv_bias():
    return (lambda cfg, b: _falcon_qkv_split(cfg, b), lambda cfg, q, k, v: (_falcon_qkv_merge(cfg, q, k, v),))


def _rule(hf, ours, transforms, shapes, stacked=True) -> Rule:
    hf = (hf,) if isinstance(hf, str) else tuple(hf)
    ours = (ours,) if isinstance(ours[0], str) else tuple(ours)
    return Rule(hf, ours, transforms[0], transforms[1], shapes, stacked)


SAME, TRANSPOSE = (_same, _same), (_transpose, _transpose)


def rules_for(cfg: ModelConfig) -> list[Rule]:
    """The HF <-> ours mapping for `cfg`'s family and options."""
    d, f, v = cfg.hidden_size, cfg.mlp_dim, cfg.vocab_size
    hq, hk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    q_heads, kv_heads = (lambda c: c.num_heads), (lambda c: c.num_kv_heads)
    A, M = ("layers", "attn"), ("layers", "mlp")
    rules: list[Rule] = []
    add = lambda *a, **k: rules.append(_rule(*a, **k))  # noqa: E731

    def norm(hf_prefix: str, ours: Path, stacked=True):
        add(f"{hf_prefix}.weight", ours + ("scale",), SAME, lambda c: [(d,)], stacked=stacked)
        if cfg.norm == "layer":
            add(f"{hf_prefix}.bias", ours + ("bias",), SAME, lambda c: [(d,)], stacked=stacked)

    if cfg.family == "llama":
        p = "model.layers.{i}."
        add(p + "self_attn.q_proj.weight", A + ("q",), _heads_in(q_heads), lambda c: [(hq, d)])
        add(p + "self_attn.k_proj.weight", A + ("k",), _heads_in(kv_heads), lambda c: [(hk, d)])
        add(p + "self_attn.v_proj.weight", A + ("v",), _heads_in(kv_heads), lambda c: [(hk, d)])
        add(p + "self_attn.o_proj.weight", A + ("o",), _out_proj(), lambda c: [(d, hq)])
        if cfg.qkv_bias:
            add(p + "self_attn.q_proj.bias", A + ("q_bias",), _heads_bias(q_heads), lambda c: [(hq,)])
            add(p + "self_attn.k_proj.bias", A + ("k_bias",), _heads_bias(kv_heads), lambda c: [(hk,)])
            add(p + "self_attn.v_proj.bias", A + ("v_bias",), _heads_bias(kv_heads), lambda c: [(hk,)])
        if cfg.out_bias:
            add(p + "self_attn.o_proj.bias", A + ("o_bias",), SAME, lambda c: [(d,)])
        add(p + "mlp.gate_proj.weight", M + ("gate",), TRANSPOSE, lambda c: [(f, d)])
        add(p + "mlp.up_proj.weight", M + ("up",), TRANSPOSE, lambda c: [(f, d)])
        add(p + "mlp.down_proj.weight", M + ("down",), TRANSPOSE, lambda c: [(d, f)])
        if cfg.mlp_bias:
            for name, ours, size in (("gate", "gate_bias", f), ("up", "up_bias", f), ("down", "down_bias", d)):
                add(p + f"mlp.{name}_proj.bias", M + (ours,), SAME, lambda c, s=size: [(s,)])
        norm(p + "input_layernorm", ("layers", "attn_norm"))
        norm(p + "post_attention_layernorm", ("layers", "mlp_norm"))
        embed, final, head = "model.embed_tokens.weight", "model.norm", "lm_head.weight"
    else:
        p = "transformer.h.{i}."
        qkv_rows = hq + 2 * hk
        add(p + "self_attention.query_key_value.weight", [A + ("q",), A + ("k",), A + ("v",)],
            _falcon_qkv_weight(), lambda c: [(qkv_rows, d)])
        add(p + "self_attention.dense.weight", A + ("o",), _out_proj(), lambda c: [(d, hq)])
        if cfg.qkv_bias:
            add(p + "self_attention.query_key_value.bias", [A + ("q_bias",), A + ("k_bias",), A + ("v_bias",)],
                _falcon_qkv_bias(), lambda c: [(qkv_rows,)])
        if cfg.out_bias:
            add(p + "self_attention.dense.bias", A + ("o_bias",), SAME, lambda c: [(d,)])
        add(p + "mlp.dense_h_to_4h.weight", M + ("up",), TRANSPOSE, lambda c: [(f, d)])
        add(p + "mlp.dense_4h_to_h.weight", M + ("down",), TRANSPOSE, lambda c: [(d, f)])
        if cfg.mlp_bias:
            add(p + "mlp.dense_h_to_4h.bias", M + ("up_bias",), SAME, lambda c: [(f,)])
            add(p + "mlp.dense_4h_to_h.bias", M + ("down_bias",), SAME, lambda c: [(d,)])
        if not cfg.parallel_block:
            norm(p + "input_layernorm", ("layers", "attn_norm"))
            norm(p + "post_attention_layernorm", ("layers", "mlp_norm"))
        elif cfg.num_block_norms == 2:
            norm(p + "ln_attn", ("layers", "attn_norm"))
            norm(p + "ln_mlp", ("layers", "mlp_norm"))
        else:
            norm(p + "input_layernorm", ("layers", "attn_norm"))
        embed, final, head = "transformer.word_embeddings.weight", "transformer.ln_f", "lm_head.weight"
    add(embed, ("embed",), SAME, lambda c: [(v, d)], stacked=False)
    norm(final, ("final_norm",), stacked=False)
    if not cfg.tie_embeddings:
        add(head, ("lm_head",), TRANSPOSE, lambda c: [(v, d)], stacked=False)
    return rules


# Buffers HF stores that carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.masked_bias", "attention.bias")


def _expected_hf_tensors(cfg: ModelConfig, rules: Sequence[Rule]) -> dict[str, tuple[int, ...]]:
    out = {}
    for rule in rules:
        layers = range(cfg.num_layers) if rule.stacked else [None]
        for i in layers:
            for name, shape in zip(rule.hf, rule.hf_shapes(cfg)):
                out[name.format(i=i)] = tuple(shape)
    return out


def _check_tensors(cfg: ModelConfig, ckpt: SafetensorsDir, rules: Sequence[Rule]) -> None:
    expected = _expected_hf_tensors(cfg, rules)
    present = set(ckpt.keys())
    missing = [n for n in expected if n not in present]
    if missing:
        raise CheckpointError(f"{ckpt.hf_dir}: missing tensor {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    ignorable = lambda n: n.endswith(_IGNORED_SUFFIXES) or (cfg.tie_embeddings and n == "lm_head.weight")  # noqa
    unknown = sorted(n for n in present if n not in expected and not ignorable(n))
    if unknown:
        raise CheckpointError(f"{ckpt.hf_dir}: unexpected tensor {unknown[0]!r} for a {cfg.family} model"
                              + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    for name, shape in expected.items():
        got = ckpt.shape(name)
        if got != shape:
            raise CheckpointError(f"{ckpt.hf_dir}: tensor {name!r} has shape {got}, expected {shape}")


def _get(tree: dict, path: Path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: Path, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _index_key(index: tuple, shape: tuple) -> tuple:
    """A hashable, normalized form of a device's index (tuple of slices) into `shape`."""
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def _load_rule(cfg: ModelConfig, ckpt: SafetensorsDir, rule: Rule, shardings: dict, dtypes: dict) -> dict:
    """Stream one rule's HF tensors (layer by layer) into sharded global arrays of ours."""
    targets = []
    for path in rule.ours:
        sharding, aval = _get(shardings, path), _get(dtypes, path)
        shards = {}  # distinct per-device index -> host buffer
        for dev, idx in sharding.addressable_devices_indices_map(aval.shape).items():
            key = _index_key(idx, aval.shape)
            if key not in shards:
                shards[key] = np.empty([b - a for a, b in key], aval.dtype)
        targets.append((path, sharding, aval, shards))
    layers = range(cfg.num_layers) if rule.stacked else [None]
    for i in layers:
        arrays = rule.to_ours(cfg, *(ckpt.get(n.format(i=i)) for n in rule.hf))
        for (path, _, aval, shards), value in zip(targets, arrays):
            for key, buf in shards.items():
                if rule.stacked:
                    (a, b), rest = key[0], key[1:]
                    if a <= i < b:
                        buf[i - a] = value[tuple(slice(*r) for r in rest)].astype(aval.dtype)
                else:
                    buf[...] = value[tuple(slice(*r) for r in key)].astype(aval.dtype)
    out = {}
    for path, sharding, aval, shards in targets:
        pieces = [jax.device_put(shards[_index_key(idx, aval.shape)], dev)
                  for dev, idx in sharding.addressable_devices_indices_map(aval.shape).items()]
        out[path] = jax.make_array_from_single_device_arrays(aval.shape, sharding, pieces)
    return out


def _default_param_dtype(hf_dir: str) -> str:
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def load_hf(hf_dir: str, *, mesh=None, rules=None, param_dtype: Optional[str] = None,
            **runtime) -> tuple[ModelConfig, dict]:
    """Read an HF Llama/Falcon checkpoint directory into (ModelConfig, params).

    mesh: place parameters on it with `regft_jax.sharding` rules (default: all local devices
    on the "fsdp" axis). param_dtype defaults to the checkpoint's dtype. `runtime` overrides
    other ModelConfig fields (scan_layers, remat, dtype, ...).
    """
    cfg = read_hf_config(hf_dir, **runtime)  # fails clearly without a config.json
    cfg = cfg.replace(param_dtype=param_dtype or _default_param_dtype(hf_dir))
    ckpt = SafetensorsDir(hf_dir)
    table = rules_for(cfg)
    _check_tensors(cfg, ckpt, table)
    mesh = mesh if mesh is not None else shd.make_mesh()
    abstract = abstract_params(cfg)
    shardings = shd.param_shardings(mesh, param_logical_axes(cfg), abstract, rules)
    params: dict = {}
    for rule in table:
        for path, array in _load_rule(cfg, ckpt, rule, shardings, abstract).items():
            _set(params, path, array)
    return cfg, params


# ------------------------------------------------------------------------------------ export


def _host(x, i: Optional[int]) -> np.ndarray:
    """One layer (or the whole array) on the host, gathered from its shards."""
    return np.asarray(jax.device_get(x if i is None else x[i]))


def save_hf(cfg: ModelConfig, params: dict, out_dir: str, *, dtype: Optional[str] = None,
            max_shard_bytes: int = 2 << 30) -> list[str]:
    """Write `params` as an HF checkpoint (config.json + safetensors) that transformers loads.

    Tensors are produced one at a time and flushed to a new `.safetensors` shard whenever
    `max_shard_bytes` is reached. LoRA factors are merged into their weights first (`lora.merge_lora`).
    Returns the written weight files.
    """
    if cfg.lora_rank:
        from regft_jax.models.lora import merge_lora

        cfg, params = merge_lora(cfg, params)
    os.makedirs(out_dir, exist_ok=True)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if (dtype or cfg.param_dtype) == "bfloat16" else np.dtype(
        dtype or cfg.param_dtype)
    shards: list[dict] = [{}]
    size = 0
    for rule in rules_for(cfg):
        layers = range(cfg.num_layers) if rule.stacked else [None]
        for i in layers:
            ours = [_host(_get(params, path), i).astype(np.float32) for path in rule.ours]
            for name, value in zip(rule.hf, rule.to_hf(cfg, *ours)):
                value = np.ascontiguousarray(value.astype(np_dtype))
                if size and size + value.nbytes > max_shard_bytes:
                    shards.append({})
                    size = 0
                shards[-1][name.format(i=i)] = value
                size += value.nbytes
                _flush_full_shards(shards, out_dir)
    files = _write_shards(shards, out_dir)
    hf_config = to_hf_config(cfg)
    hf_config["dtype"] = str(np_dtype) if np_dtype != np.dtype(ml_dtypes.bfloat16) else "bfloat16"
    hf_config.pop("torch_dtype", None)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    return files


def _shard_name(k: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def _flush_full_shards(shards: list, out_dir: str) -> None:
    """Write completed shards (all but the last) to temporary files to bound host memory."""
    for k, shard in enumerate(shards[:-1]):
        if isinstance(shard, dict):
            tmp = os.path.join(out_dir, f".shard-{k:05d}.tmp")
            save_file(shard, tmp, metadata={"format": "pt"})
            shards[k] = (tmp, list(shard))


def _write_shards(shards: list, out_dir: str) -> list[str]:
    n = len(shards)
    weight_map, files = {}, []
    for k, shard in enumerate(shards):
        name = _shard_name(k, n)
        path = os.path.join(out_dir, name)
        if isinstance(shard, dict):
            save_file(shard, path, metadata={"format": "pt"})
            keys = list(shard)
        else:
            tmp, keys = shard
            os.replace(tmp, path)
        weight_map.update({key: name for key in keys})
        files.append(path)
    index = os.path.join(out_dir, "model.safetensors.index.json")
    if n > 1:
        with open(index, "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    elif os.path.exists(index):
        os.remove(index)
    return files
