"""Orbax checkpoints of model parameters (+ the ModelConfig as JSON beside them).

Layout of a model checkpoint directory CKPT:
    CKPT/model_config.json   the ModelConfig (architecture and numerics)
    CKPT/params/             orbax PyTree checkpoint of the parameters
Restoring places every array directly onto its target sharding.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax
import orbax.checkpoint as ocp

from regft_jax import sharding as shd
from regft_jax.models import ModelConfig, abstract_params, param_logical_axes

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def save_model(path: str, cfg: ModelConfig, params: dict, *, overwrite: bool = False) -> str:
    """Save `params` and `cfg` under `path` (created). Returns the absolute path."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, PARAMS_DIR), params, force=overwrite)
    if jax.process_index() == 0:
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    return path


def load_model_config(path: str) -> ModelConfig:
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: not a regft_jax model checkpoint (no {CONFIG_FILE})")
    with open(cfg_path) as f:
        return ModelConfig.from_dict(json.load(f))


def load_model(path: str, *, mesh=None, rules=None, **runtime) -> tuple[ModelConfig, dict]:
    """Restore (cfg, params) saved by `save_model`, sharded on `mesh` (default: all devices on
    "fsdp"). `runtime` overrides numerics fields of the config (dtype, scan_layers, remat)."""
    path = os.path.abspath(path)
    cfg = load_model_config(path)
    if runtime:
        cfg = cfg.replace(**runtime)
    mesh = mesh if mesh is not None else shd.make_mesh()
    abstract = abstract_params(cfg)
    shardings = shd.param_shardings(mesh, param_logical_axes(cfg), abstract, rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, PARAMS_DIR), target)
    return cfg, params
