"""A Flax NNX BERT/RoBERTa encoder with a sequence-classification head.

Post-LayerNorm transformer encoder as in HF ``BertModel``/``RobertaModel`` (inference only,
no dropout). Differences between the families are in ``EncoderConfig``:

- RoBERTa position ids start after the padding index: ``pad + cumsum(mask) * mask``;
  BERT uses ``0..T-1``.
- RoBERTa's head is ``dense -> tanh -> out_proj`` on the first token; BERT's is the
  pooler (``dense -> tanh`` on ``[CLS]``) followed by a linear ``classifier``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from regft_jax.oracles.base import CheckpointError

# HF model_type -> family; the family is also the weight-name prefix ("roberta.encoder...").
SUPPORTED_MODEL_TYPES = {"roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta", "bert": "bert"}

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Architecture hyper-parameters, read from an HF ``config.json`` by ``from_hf``."""

    family: str  # "roberta" | "bert" (also the HF weight-name prefix)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    num_labels: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def max_tokens(self) -> int:
        """Longest input the position table allows (RoBERTa reserves pad_token_id + 1 slots)."""
        reserved = self.pad_token_id + 1 if self.family == "roberta" else 0
        return self.max_position_embeddings - reserved

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], source: str = "config.json") -> EncoderConfig:
        """Validate an HF config dict; unsupported or missing fields raise naming the key."""
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
            )
        architectures = config.get("architectures") or []
        if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise CheckpointError(f"{source}: architectures {architectures} has no *ForSequenceClassification model")
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise CheckpointError(f"{source}: position_embedding_type {position_type!r} is not supported")
        if config.get("is_decoder"):
            raise CheckpointError(f"{source}: is_decoder=true is not supported (need a bidirectional encoder)")
        hidden_act = config.get("hidden_act", "gelu")
        if hidden_act not in _ACTIVATIONS:
            raise CheckpointError(f"{source}: hidden_act {hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")

        def field(key: str, cast: Callable = int, default: Any = None) -> Any:
            value = config.get(key)
            if value is None:
                if default is None:
                    raise CheckpointError(f"{source}: missing key {key!r}")
                value = default
            try:
                return cast(value)
            except (TypeError, ValueError):
                raise CheckpointError(f"{source}: key {key!r} = {value!r} is not a valid {cast.__name__}") from None

        id2label = config.get("id2label")
        out = cls(
            family=SUPPORTED_MODEL_TYPES[model_type],
            vocab_size=field("vocab_size"),
            hidden_size=field("hidden_size"),
            num_layers=field("num_hidden_layers"),
            num_heads=field("num_attention_heads"),
            intermediate_size=field("intermediate_size"),
            hidden_act=hidden_act,
            max_position_embeddings=field("max_position_embeddings"),
            type_vocab_size=field("type_vocab_size", default=2),
            layer_norm_eps=field("layer_norm_eps", float, default=1e-12),
            pad_token_id=field("pad_token_id", default=0),
            num_labels=len(id2label) if id2label else field("num_labels", default=2),
        )
        if out.hidden_size % out.num_heads:
            raise CheckpointError(
                f"{source}: hidden_size {out.hidden_size} is not divisible by num_attention_heads {out.num_heads}"
            )
        return out


class Embeddings(nnx.Module):
    """Word + position + token-type embeddings, then LayerNorm."""

    def __init__(self, cfg: EncoderConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.family = cfg.family
        self.pad_token_id = cfg.pad_token_id
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)
        self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, **kw)
        self.norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)

    def position_ids(self, attention_mask: jax.Array) -> jax.Array:
        if self.family == "roberta":
            mask = attention_mask.astype(jnp.int32)
            return jnp.cumsum(mask, axis=1) * mask + self.pad_token_id
        return jnp.broadcast_to(jnp.arange(attention_mask.shape[1]), attention_mask.shape)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        x = self.word(input_ids) + self.position(self.position_ids(attention_mask))
        x = x + self.token_type.embedding[0]  # single-segment inputs: token type 0 everywhere
        return self.norm(x)


class SelfAttention(nnx.Module):
    """Multi-head bidirectional self-attention with a key padding mask."""

    def __init__(self, cfg: EncoderConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.query = nnx.Linear(cfg.hidden_size, cfg.hidden_size, **kw)
        self.key = nnx.Linear(cfg.hidden_size, cfg.hidden_size, **kw)
        self.value = nnx.Linear(cfg.hidden_size, cfg.hidden_size, **kw)
        self.out = nnx.Linear(cfg.hidden_size, cfg.hidden_size, **kw)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:2], self.num_heads, self.head_dim)

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(self.head_dim)
        keep = attention_mask[:, None, None, :].astype(bool)
        logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
        return self.out(context)


class EncoderLayer(nnx.Module):
    """Post-LN block: ``x = LN(x + attn(x)); x = LN(x + W2 act(W1 x))``."""

    def __init__(self, cfg: EncoderConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.attention = SelfAttention(cfg, dtype=dtype, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)
        self.intermediate = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.output = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, **kw)
        self.output_norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, **kw)
        self.activation = _ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        x = self.attention_norm(x + self.attention(x, attention_mask))
        return self.output_norm(x + self.output(self.activation(self.intermediate(x))))


class RobertaClassificationHead(nnx.Module):
    """``out_proj(tanh(dense(h[:, 0])))``."""

    def __init__(self, cfg: EncoderConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.dense = nnx.Linear(cfg.hidden_size, cfg.hidden_size, **kw)
        self.out_proj = nnx.Linear(cfg.hidden_size, cfg.num_labels, **kw)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return self.out_proj(jnp.tanh(self.dense(hidden[:, 0])))


class BertClassificationHead(nnx.Module):
    """``classifier(tanh(pooler(h[:, 0])))``."""

    def __init__(self, cfg: EncoderConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.pooler = nnx.Linear(cfg.hidden_size, cfg.hidden_size, **kw)
        self.classifier = nnx.Linear(cfg.hidden_size, cfg.num_labels, **kw)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return self.classifier(jnp.tanh(self.pooler(hidden[:, 0])))


class SequenceClassifier(nnx.Module):
    """Encoder + head: ``(input_ids [B, T], attention_mask [B, T]) -> logits [B, num_labels]``."""

    def __init__(self, cfg: EncoderConfig, *, dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.embeddings = Embeddings(cfg, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([EncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        head_cls = RobertaClassificationHead if cfg.family == "roberta" else BertClassificationHead
        self.head = head_cls(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        x = self.embeddings(input_ids, attention_mask)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return self.head(x).astype(jnp.float32)
