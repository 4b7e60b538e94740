"""Orbax checkpoints: model parameters (+ the ModelConfig as JSON beside them), and training runs.

Layout of a model checkpoint directory CKPT:
    CKPT/model_config.json   the ModelConfig (architecture and numerics)
    CKPT/params/             orbax PyTree checkpoint of the parameters
(an auxiliary model, `models.aux`, is saved the same way and restored with `load_aux_model`).
A run checkpoint directory (`RunCheckpointer`) holds one orbax step directory per saved step,
each with `state/` (a pytree of arrays: train states, sample buffers) and `meta/` (JSON:
schedule position, metric history, a fingerprint of the config that produced it).
Restoring places every array directly onto its target sharding.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from regft_jax import multihost
from regft_jax import sharding as shd
from regft_jax.errors import UserInputError
from regft_jax.models import ModelConfig, abstract_params, param_logical_axes
from regft_jax.models.aux import aux_abstract_params, aux_logical_axes

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
    return _restore(path, abstract_params, param_logical_axes, mesh, rules, runtime)


def load_aux_model(path: str, *, mesh=None, rules=None, **runtime) -> tuple[ModelConfig, dict]:
    """Restore (aux cfg, aux params) of an auxiliary model (`models.aux`: trunk + head) saved by `save_model`,
    like `load_model`."""
    return _restore(path, aux_abstract_params, aux_logical_axes, mesh, rules, runtime)


def _restore(path: str, abstract_fn, logical_axes_fn, mesh, rules, runtime: dict) -> tuple[ModelConfig, dict]:
    path = os.path.abspath(path)
    cfg = load_model_config(path)
    if runtime:
        cfg = cfg.replace(**runtime)
    mesh = mesh if mesh is not None else shd.make_mesh()
    abstract = abstract_fn(cfg)
    shardings = shd.param_shardings(mesh, logical_axes_fn(cfg), abstract, rules)
    target = shd.abstract_on(abstract, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, PARAMS_DIR), target)
    return cfg, params


class RunCheckpointer:
    """Save/restore a training run: `state` (any pytree of jax/numpy arrays) + `meta` (JSON-able).

        ckpt = RunCheckpointer(dir, fingerprint=hash_of_config)
        step = ckpt.latest_step()                    # None: nothing saved yet
        meta = ckpt.restore_meta(step)
        state = ckpt.restore_state(step, target)     # target: abstract arrays like the saved ones
        ckpt.save(step, state, meta)                 # asynchronous write; keeps the last 2

    Saving copies device arrays to the host before returning, so the caller may donate them
    afterwards. A checkpoint written under another fingerprint is refused with an error; an
    incomplete one (a save interrupted) is ignored and deleted.
    """

    def __init__(self, directory: str, *, fingerprint: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.fingerprint = fingerprint
        # a save cut short (a killed process) leaves <step>.orbax-checkpoint-tmp-<time>/ (renamed to <step>/
        # only once complete; on object stores: no commit_success.txt): never listed, deleted here
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                                  cleanup_tmp_directories=True))

    def latest_step(self) -> Optional[int]:
        """The latest complete checkpoint; the same on every process (a collective with several)."""
        step = self.manager.latest_step()
        steps = multihost.gather_shares(np.array([-1 if step is None else step]), jax.process_count())
        if (steps != steps[0]).any():
            raise UserInputError(f"{self.directory}: the processes see different latest checkpoints "
                                 f"{steps.tolist()} (-1: none): put it on a filesystem every host shares")
        return step

    def delete_all(self) -> None:
        """Delete every saved step (a run that starts over in the same directory)."""
        for step in self.manager.all_steps():
            self.manager.delete(step)

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, "fingerprint": self.fingerprint})))

    def restore_meta(self, step: int) -> dict:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if meta.get("fingerprint") != self.fingerprint:
            raise UserInputError(
                f"{self.directory}/{step}: checkpoint of a run with a different config (or of an older regft_jax "
                f"whose corpus split or config keys differ); resume with the config and version that wrote it, "
                f"use another --workdir, or set --config.method.resume=False")
        return meta

    def restore_state(self, step: int, target: Any) -> Any:
        """Arrays restored like `target`'s leaves: jax.ShapeDtypeStructs with shardings
        (`sharding.abstract_on`; nothing allocated before) onto those shardings, numpy arrays on the host."""
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
