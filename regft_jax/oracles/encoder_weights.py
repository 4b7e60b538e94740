"""Load an HF BERT/RoBERTa sequence classifier (config.json + safetensors) into Flax NNX.

Reads ``model.safetensors`` or a sharded ``model.safetensors.index.json`` with
``safetensors.safe_open`` (numpy; bfloat16 tensors via JAX). Every parameter of the Flax model must be
found with the shape the config implies; a missing or mis-shaped tensor raises a
one-line ``CheckpointError`` naming it.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from safetensors import safe_open

from regft_jax.oracles.base import CheckpointError
from regft_jax.oracles.encoder import EncoderConfig, SequenceClassifier

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Flax leaf name -> HF parameter suffixes to try (older BERT checkpoints use gamma/beta).
_LEAF_NAMES = {
    "kernel": ("weight",),
    "bias": ("bias", "beta"),
    "scale": ("weight", "gamma"),
    "embedding": ("weight",),
}


def read_hf_config(model_dir: str) -> dict:
    """The parsed ``config.json`` of a local checkpoint directory."""
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir!r} is not a local directory (checkpoints are not downloaded)")
    return _read_json(os.path.join(model_dir, "config.json"))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return payload


class SafetensorsCheckpoint:
    """Tensor names -> files of a single-file or sharded safetensors checkpoint."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        index_path = os.path.join(model_dir, INDEX_FILE)
        single_path = os.path.join(model_dir, SINGLE_FILE)
        if os.path.isfile(index_path):
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: missing 'weight_map'")
            self.files = {name: os.path.join(model_dir, file) for name, file in weight_map.items()}
        elif os.path.isfile(single_path):
            with _open(single_path) as f:
                self.files = {name: single_path for name in f.keys()}
        else:
            raise CheckpointError(
                f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} (PyTorch .bin checkpoints are not read; "
                "re-save with save_pretrained(..., safe_serialization=True))"
            )
        for file in sorted(set(self.files.values())):
            if not os.path.isfile(file):
                raise CheckpointError(f"{model_dir}: shard {os.path.basename(file)} listed in {INDEX_FILE} is missing")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """Read tensors, opening each shard once."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        out = {}
        for file, file_names in by_file.items():
            with _open(file) as f:
                for name in file_names:
                    try:
                        out[name] = f.get_tensor(name)
                    except TypeError:  # bfloat16: numpy cannot, JAX (ml_dtypes) can
                        with _open(file, "flax") as g:
                            out[name] = np.asarray(g.get_tensor(name))
        return out


def _open(path: str, framework: str = "np"):
    try:
        return safe_open(path, framework=framework)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def hf_module_name(path: tuple, cfg: EncoderConfig) -> str:
    """HF module name for a Flax module path (the leaf name is handled separately)."""
    p = cfg.family
    if path[0] == "embeddings":
        return f"{p}.embeddings." + {
            "word": "word_embeddings",
            "position": "position_embeddings",
            "token_type": "token_type_embeddings",
            "norm": "LayerNorm",
        }[path[1]]
    if path[0] == "layers":
        layer = f"{p}.encoder.layer.{path[1]}."
        if path[2] == "attention":
            sub = {"query": "self.query", "key": "self.key", "value": "self.value", "out": "output.dense"}
            return layer + "attention." + sub[path[3]]
        return layer + {
            "attention_norm": "attention.output.LayerNorm",
            "intermediate": "intermediate.dense",
            "output": "output.dense",
            "output_norm": "output.LayerNorm",
        }[path[2]]
    if path[0] == "head":
        return {
            "dense": "classifier.dense",
            "out_proj": "classifier.out_proj",
            "pooler": f"{p}.pooler.dense",
            "classifier": "classifier",
        }[path[1]]
    raise KeyError(f"no HF name for Flax path {path}")


def _find_tensor(checkpoint: SafetensorsCheckpoint, path: tuple, cfg: EncoderConfig) -> str:
    module = hf_module_name(path[:-1], cfg)
    candidates = [f"{module}.{leaf}" for leaf in _LEAF_NAMES[path[-1]]]
    for name in candidates:
        if name in checkpoint:
            return name
    raise CheckpointError(f"{checkpoint.model_dir}: missing tensor {candidates[0]!r}")


def _to_flax(name: str, value: np.ndarray, leaf: str, expected: tuple, model_dir: str) -> np.ndarray:
    """Check the HF shape, then transpose linear weights ([out, in] -> Flax [in, out])."""
    hf_shape = expected[::-1] if leaf == "kernel" else expected
    if tuple(value.shape) != hf_shape:
        raise CheckpointError(
            f"{model_dir}: tensor {name!r} has shape {tuple(value.shape)}, config.json implies {hf_shape}"
        )
    return value.T if leaf == "kernel" else value


def load_sequence_classifier(
    model_dir: str, dtype: jnp.dtype = jnp.float32
) -> tuple[EncoderConfig, nnx.GraphDef, nnx.State]:
    """Config, graph definition and (host) parameter state of an HF sequence classifier."""
    hf_config = read_hf_config(model_dir)
    cfg = EncoderConfig.from_hf(hf_config, source=os.path.join(model_dir, "config.json"))
    abstract = nnx.eval_shape(lambda: SequenceClassifier(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    specs = traverse_util.flatten_dict(nnx.to_pure_dict(state))

    checkpoint = SafetensorsCheckpoint(model_dir)
    names = {path: _find_tensor(checkpoint, path, cfg) for path in specs}
    tensors = checkpoint.read(names.values())
    loaded = {}
    for path, spec in specs.items():
        value = _to_flax(names[path], tensors[names[path]], path[-1], tuple(spec.shape), model_dir)
        loaded[path] = np.asarray(value, dtype=np.float32).astype(jnp.dtype(dtype))
    unused = sorted(set(checkpoint.files) - set(names.values()))
    if unused:
        logger.debug("%s: tensors not used by the classifier: %s", model_dir, unused)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(loaded))
    return cfg, graphdef, jax.tree.map(np.asarray, state)
