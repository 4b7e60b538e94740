"""On-device HF sequence-classifier oracle (e.g. the ToxiGen RoBERTa, ``tomh/toxigen_roberta``).

The checkpoint is read from a *local* directory (``config.json``, safetensors, tokenizer
files) into the Flax encoder of ``encoder.py``. Scoring is jitted and batched with length
bucketing: texts are sorted by token count, grouped into fixed-size device batches and
right-padded to the smallest bucket length that fits, so at most ``len(buckets)`` programs
are compiled. With a mesh, each batch is split over its data-parallel axes
(``regft_jax.sharding.batch_sharding``) and the parameters are replicated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from regft_jax import sharding
from regft_jax.oracles.base import CheckpointError, Oracle, OracleError
from regft_jax.oracles.encoder import EncoderConfig
from regft_jax.oracles.encoder_weights import load_sequence_classifier, read_hf_config

# Label names taken as "the violation class", in priority order (after normalization).
VIOLATION_LABEL_NAMES = (
    "toxic", "toxicity", "hate", "hateful", "hate_speech", "offensive",
    "abusive", "profane", "profanity", "unsafe", "violation",
)  # fmt: skip


def _normalize_label(name: str) -> str:
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


def resolve_positive_label(id2label: Mapping[Any, str], positive_label: int | str | None = None) -> int:
    """Index of the violation class in ``id2label``.

    ``positive_label`` may be an index or a label name (case-insensitive). By default: the
    single logit of a one-label model; else the first name in ``VIOLATION_LABEL_NAMES``
    present; else index 1 of a generic ``LABEL_0``/``LABEL_1`` binary model (HF's default
    names, used e.g. by the ToxiGen RoBERTa, where 1 = toxic). Anything else is ambiguous
    and raises, listing the labels.
    """
    labels = {int(i): str(n) for i, n in id2label.items()}
    if sorted(labels) != list(range(len(labels))):
        raise OracleError(f"config.json: id2label keys must be 0..{len(labels) - 1}, got {sorted(labels)}")
    if isinstance(positive_label, (int, np.integer)) and not isinstance(positive_label, bool):
        if not 0 <= positive_label < len(labels):
            raise OracleError(f"positive_label {positive_label} out of range for id2label {labels}")
        return int(positive_label)
    normalized = {_normalize_label(n): i for i, n in labels.items()}
    if positive_label is not None:
        if _normalize_label(positive_label) not in normalized:
            raise OracleError(f"positive_label {positive_label!r} is not a label; id2label = {labels}")
        return normalized[_normalize_label(positive_label)]
    if len(labels) == 1:
        return 0
    for name in VIOLATION_LABEL_NAMES:
        if name in normalized:
            return normalized[name]
    if sorted(normalized) == ["label_0", "label_1"]:
        return 1
    raise OracleError(
        f"cannot tell which class means 'violation' from id2label = {labels}; "
        "pass positive_label=<index or label name>"
    )


def default_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``max_length``, plus ``max_length``."""
    buckets, length = [], smallest
    while length < max_length:
        buckets.append(length)
        length *= 2
    return (*buckets, max_length)


def plan_batches(lengths: Sequence[int], rows: int, buckets: Sequence[int]) -> list[tuple[np.ndarray, int]]:
    """Group texts into device batches: ``[(indices, padded_length), ...]``.

    Texts are sorted by length so each batch pads to the smallest bucket that fits its
    longest member; every batch has at most ``rows`` texts.
    """
    lengths = np.asarray(lengths)
    buckets = sorted(buckets)
    if lengths.size and lengths.max() > buckets[-1]:
        raise OracleError(f"a text has {lengths.max()} tokens, more than the largest bucket {buckets[-1]}")
    order = np.argsort(lengths, kind="stable")
    plan = []
    for start in range(0, len(order), rows):
        indices = order[start : start + rows]
        longest = int(lengths[indices].max())
        plan.append((indices, next(b for b in buckets if b >= longest)))
    return plan


class HFClassifierOracle(Oracle):
    """``P(violation)`` from a local HF BERT/RoBERTa sequence classifier, run in JAX.

    Args:
      model_dir: local directory with ``config.json``, ``model.safetensors`` (or a sharded
        index) and, unless ``tokenizer_dir`` is given, the tokenizer files.
      positive_label: index or name of the violation class (see ``resolve_positive_label``).
      device_batch_size: rows per device batch (rounded up to a multiple of the number of
        data-parallel shards of ``mesh``).
      max_length: token limit (longer texts are truncated); default: the tokenizer's
        ``model_max_length`` capped by the position table.
      buckets: padded lengths to compile for; default: powers of two up to ``max_length``.
      mesh: optional mesh (``regft_jax.sharding.make_mesh``) of devices of this process;
        batches are sharded with ``sharding.batch_sharding``, parameters replicated.
      dtype: parameter/activation dtype (attention softmax and outputs stay float32).
      matmul_precision: e.g. ``"highest"`` for full-float32 matmuls on TPU/GPU.
      batch_size: texts per backend call (the pool that length sorting works over).
    """

    name = "hf_classifier"

    def __init__(
        self,
        model_dir: str,
        *,
        tokenizer_dir: str | None = None,
        positive_label: int | str | None = None,
        device_batch_size: int = 32,
        max_length: int | None = None,
        buckets: Sequence[int] | None = None,
        mesh: Mesh | None = None,
        dtype: str = "float32",
        matmul_precision: str | None = None,
        batch_size: int = 4096,
        **kwargs: Any,
    ):
        if dtype not in ("float32", "bfloat16", "float16"):
            raise OracleError(f"hf_classifier: dtype must be float32, bfloat16 or float16, got {dtype!r}")
        self.model_dir = model_dir
        hf_config = read_hf_config(model_dir)
        self.config, graphdef, host_state = load_sequence_classifier(model_dir, jnp.dtype(dtype))
        id2label = hf_config.get("id2label") or {i: f"LABEL_{i}" for i in range(self.config.num_labels)}
        self.id2label = {int(i): str(n) for i, n in id2label.items()}
        self.positive_index = resolve_positive_label(self.id2label, positive_label)
        self.use_sigmoid = self.config.num_labels == 1 or hf_config.get("problem_type") == "multi_label_classification"
        self._config_digest = hashlib.sha1(json.dumps(hf_config, sort_keys=True).encode()).hexdigest()[:12]

        self.tokenizer = _load_tokenizer(tokenizer_dir or model_dir)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.config.pad_token_id
        self.max_length = _max_length(max_length, self.tokenizer, self.config)
        wanted = buckets or default_buckets(self.max_length)
        self.buckets = tuple(sorted({min(int(b), self.max_length) for b in wanted} | {self.max_length}))

        self.mesh = mesh
        shards = 1
        if mesh is not None:
            if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
                raise OracleError("hf_classifier: the mesh must hold only this process's devices (jax.local_devices())")
            self._batch_sharding = sharding.batch_sharding(mesh, 2)
            shards = sharding.batch_shards(mesh)
        self.device_batch_size = shards * math.ceil(device_batch_size / shards)
        self.matmul_precision = matmul_precision
        self._forward, self._params = self._compile(graphdef, host_state)
        super().__init__(batch_size=batch_size, **kwargs)

    @property
    def cache_owner(self) -> str:
        model = os.path.basename(os.path.normpath(self.model_dir))
        label = self.id2label[self.positive_index]
        return f"hf_classifier:{model}:config-{self._config_digest}:{label}:{self.max_length}"

    def _compile(self, graphdef: nnx.GraphDef, host_state: nnx.State) -> tuple[Any, nnx.State]:
        precision = self.matmul_precision

        def logits_fn(params: nnx.State, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
            with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
                return nnx.merge(graphdef, params)(input_ids, attention_mask)

        if self.mesh is None:
            return jax.jit(logits_fn), jax.device_put(host_state)
        params, batch = sharding.replicated(self.mesh), self._batch_sharding
        forward = jax.jit(logits_fn, in_shardings=(params, batch, batch), out_shardings=params)
        return forward, jax.device_put(host_state, params)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids with special tokens, truncated to ``max_length``."""
        if not texts:
            return []
        encoded = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)
        return [list(ids) for ids in encoded["input_ids"]]

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Classifier logits, float32 ``[len(texts), num_labels]`` (uncached)."""
        token_ids = self.tokenize(texts)
        out = np.zeros((len(token_ids), self.config.num_labels), np.float32)
        pending = []
        for indices, length in plan_batches([len(t) for t in token_ids], self.device_batch_size, self.buckets):
            input_ids, mask = self._pad_batch([token_ids[i] for i in indices], length)
            pending.append((indices, self._forward(self._params, input_ids, mask)))  # dispatched asynchronously
        for indices, logits in pending:
            out[indices] = np.asarray(logits)[: len(indices)]
        return out

    def _pad_batch(self, rows: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad to ``[device_batch_size, length]``; filler rows attend to one token."""
        input_ids = np.full((self.device_batch_size, length), self.pad_id, np.int32)
        mask = np.zeros((self.device_batch_size, length), np.int32)
        mask[len(rows) :, 0] = 1
        for r, ids in enumerate(rows):
            input_ids[r, : len(ids)] = ids
            mask[r, : len(ids)] = 1
        return input_ids, mask

    def _score_batch(self, texts: list[str]) -> np.ndarray:
        return positive_probability(self.logits(texts), self.positive_index, sigmoid=self.use_sigmoid)


def positive_probability(logits: np.ndarray, index: int, *, sigmoid: bool = False) -> np.ndarray:
    """``softmax(logits)[:, index]``, or ``sigmoid(logits[:, index])`` for one-vs-rest heads."""
    logits = np.asarray(logits, np.float64)
    if sigmoid:
        return 1.0 / (1.0 + np.exp(-logits[:, index]))
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs[:, index] / probs.sum(axis=1)


def _load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer  # heavy import, only needed here

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load a tokenizer ({' '.join(str(e).split())})") from None


def _max_length(requested: int | None, tokenizer: Any, cfg: EncoderConfig) -> int:
    limit = cfg.max_tokens
    if requested is not None:
        if not 2 <= requested <= limit:
            raise OracleError(f"hf_classifier: max_length must be in [2, {limit}] for this model, got {requested}")
        return int(requested)
    return int(min(limit, getattr(tokenizer, "model_max_length", None) or limit))
