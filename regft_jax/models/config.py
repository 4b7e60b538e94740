"""Decoder configuration shared by the Llama and Falcon variants, and its HF config mapping.

One frozen, hashable dataclass describes every supported architecture, so it can be a static
argument of jitted functions. `from_hf_config` / `to_hf_config` translate to and from the
`config.json` of HF transformers (v5 layout: rope settings under `rope_parameters`; older
`rope_theta` / `rope_scaling` keys are read too).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from regft_jax.errors import UserInputError

# How the HF checkpoint stores q/k/v projections.
QKV_LAYOUTS = (
    "separate",  # Llama: q_proj, k_proj, v_proj
    "falcon_grouped",  # Falcon new_decoder_architecture: per kv group [q_1..q_r, k, v]
    "falcon_mqa",  # Falcon-7B multi_query: [q_1..q_H, k, v]
    "falcon_interleaved",  # Falcon multi-head (not multi_query): per head [q, k, v]
)
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the decoder's linear projections
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(UserInputError):
    """A model configuration (or the HF config.json it came from) is invalid or unsupported."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` (positions / factor) or `llama3` (Llama-3.1 smoothing)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture + numerics of one decoder. Llama and Falcon are settings of these fields."""

    family: str = "llama"  # "llama" | "falcon" (decides HF tensor names on export)
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 512
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    activation: str = "swiglu"  # "swiglu" (Llama) | "gelu" (Falcon)
    parallel_block: bool = False  # Falcon: attn and MLP read the same input, outputs summed
    num_block_norms: int = 2  # parallel blocks: 1 shared norm or 2 (ln_attn, ln_mlp)
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    max_seq_len: int = 2048
    qkv_layout: str = "separate"
    # Numerics and execution (not part of the checkpoint's architecture).
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype of matmuls; norms, softmax and logits stay float32
    scan_layers: bool = True
    remat: str = "none"
    init_std: float = 0.02
    # LoRA adapters (models/lora.py): rank 0 = none. Factors A [in, r], B [r, out] beside each target
    # projection, y = x W + (lora_alpha / lora_rank) · (x A) B; only they train (the rest is stop-gradient).
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple = ()  # names among LORA_TARGETS that exist in this architecture

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def fail(msg):
            raise ConfigError(f"ModelConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "mlp_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                fail(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            fail(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            fail(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.family not in ("llama", "falcon"):
            fail(f"family={self.family!r}; expected 'llama' or 'falcon'")
        if self.norm not in ("rms", "layer"):
            fail(f"norm={self.norm!r}; expected 'rms' or 'layer'")
        if self.activation not in ("swiglu", "gelu"):
            fail(f"activation={self.activation!r}; expected 'swiglu' or 'gelu'")
        if self.num_block_norms not in (1, 2) or (not self.parallel_block and self.num_block_norms != 2):
            fail(f"num_block_norms={self.num_block_norms} (sequential blocks need 2, parallel 1 or 2)")
        if self.qkv_layout not in QKV_LAYOUTS:
            fail(f"qkv_layout={self.qkv_layout!r}; expected one of {QKV_LAYOUTS}")
        if self.remat not in REMAT_POLICIES:
            fail(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                fail(f"{name}={getattr(self, name)!r}; expected one of {DTYPES}")
        if self.rope_scaling is not None and self.rope_scaling.kind not in ("linear", "llama3"):
            fail(f"rope_scaling.kind={self.rope_scaling.kind!r}; expected 'linear' or 'llama3'")
        if self.lora_rank < 0:
            fail(f"lora_rank={self.lora_rank} must be >= 0")
        if self.lora_rank and not self.lora_targets:
            fail(f"lora_rank={self.lora_rank} needs lora_targets (names among {self.projections})")
        bad = [t for t in self.lora_targets if t not in self.projections]
        if bad:
            fail(f"lora_targets {bad} are not projections of this {self.family} decoder ({self.projections})")

    @property
    def projections(self) -> tuple:
        """The linear projections of a block (possible LoRA targets): Falcon's GELU MLP has no gate."""
        return tuple(t for t in LORA_TARGETS if t != "gate" or self.activation == "swiglu")

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def architecture(self) -> dict:
        """The fields that define the weights (what a checkpoint must agree on)."""
        runtime = {"param_dtype", "dtype", "scan_layers", "remat", "init_std", "lora_rank", "lora_alpha",
                   "lora_targets"}  # LoRA factors are added on top of a checkpoint's weights
        return {k: v for k, v in self.to_dict().items() if k not in runtime}

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"ModelConfig: unknown keys {sorted(unknown)}")
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if "lora_targets" in d:
            d["lora_targets"] = tuple(d["lora_targets"])  # a JSON list
        return cls(**d)

    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.mlp_dim, self.vocab_size
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = (3 if self.activation == "swiglu" else 2) * d * f
        return self.num_layers * (attn + mlp) + v * d * (1 if self.tie_embeddings else 2)


# ----------------------------------------------------------------------------- HF config.json


def _rope_from_hf(hf: dict, where: str) -> tuple[float, Optional[RopeScaling]]:
    params = hf.get("rope_parameters") or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{where}: per-layer-type rope_parameters are not supported")
    legacy = hf.get("rope_scaling") or {}
    merged = {**legacy, **params}
    theta = float(merged.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(merged["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            float(merged["factor"]),
            float(merged["low_freq_factor"]),
            float(merged["high_freq_factor"]),
            int(merged["original_max_position_embeddings"]),
        )
    raise ConfigError(f"{where}: unsupported rope type {kind!r} (supported: default, linear, llama3)")


def from_hf_config(hf: dict, where: str = "config.json", **runtime: Any) -> ModelConfig:
    """Map an HF `config.json` dict (LlamaForCausalLM / FalconForCausalLM) to a ModelConfig."""
    model_type = hf.get("model_type")
    archs = hf.get("architectures") or []
    try:
        if model_type == "llama":
            cfg = _llama_from_hf(hf, where)
        elif model_type == "falcon":
            cfg = _falcon_from_hf(hf, where)
        else:
            raise ConfigError(
                f"{where}: unsupported model_type {model_type!r} (architectures={archs}); "
                "supported: 'llama' (LlamaForCausalLM), 'falcon' (FalconForCausalLM)"
            )
    except KeyError as e:
        raise ConfigError(f"{where}: missing key {e.args[0]!r} for model_type {model_type!r}") from None
    return cfg.replace(**runtime) if runtime else cfg


def _llama_from_hf(hf: dict, where: str) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={hf['hidden_act']!r}; only 'silu' is supported for llama")
    heads = hf["num_attention_heads"]
    theta, scaling = _rope_from_hf(hf, where)
    return ModelConfig(
        family="llama",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        norm="rms",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        activation="swiglu",
        qkv_bias=bool(hf.get("attention_bias", False)),
        out_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        qkv_layout="separate",
    )


def _falcon_from_hf(hf: dict, where: str) -> ModelConfig:
    if hf.get("alibi", False):
        raise ConfigError(f"{where}: Falcon with alibi=True is not supported (rotary only)")
    if hf.get("activation", "gelu") != "gelu":
        raise ConfigError(f"{where}: activation={hf['activation']!r}; only 'gelu' is supported for falcon")
    heads = hf["num_attention_heads"]
    hidden = hf.get("hidden_size", hf.get("n_embed"))
    new_arch = bool(hf.get("new_decoder_architecture", False))
    parallel = bool(hf.get("parallel_attn", True))
    if new_arch:
        kv, layout = hf.get("num_kv_heads") or heads, "falcon_grouped"
        norms = hf.get("num_ln_in_parallel_attn") or 2
        if not parallel:
            raise ConfigError(f"{where}: new_decoder_architecture with parallel_attn=False is not supported")
    elif hf.get("multi_query", True):
        kv, layout, norms = 1, "falcon_mqa", 1 if parallel else 2
    else:
        kv, layout, norms = heads, "falcon_interleaved", 1 if parallel else 2
    theta, scaling = _rope_from_hf(hf, where)
    bias = bool(hf.get("bias", False))
    return ModelConfig(
        family="falcon",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        mlp_dim=hf.get("ffn_hidden_size") or 4 * hidden,
        norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        activation="gelu",
        parallel_block=parallel,
        num_block_norms=norms,
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        qkv_layout=layout,
    )


def _rope_to_hf(cfg: ModelConfig) -> dict:
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    s = cfg.rope_scaling
    if s is not None:
        rope.update(rope_type=s.kind, factor=s.factor)
        if s.kind == "llama3":
            rope.update(
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings,
            )
    return rope


def to_hf_config(cfg: ModelConfig) -> dict:
    """The HF `config.json` dict for `cfg` (inverse of `from_hf_config`)."""
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": _rope_to_hf(cfg),
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.family == "llama":
        if cfg.qkv_bias != cfg.out_bias:
            raise ConfigError("llama export: qkv_bias and out_bias must agree (HF attention_bias)")
        return {
            **common,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "intermediate_size": cfg.mlp_dim,
            "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps,
            "attention_bias": cfg.qkv_bias,
            "mlp_bias": cfg.mlp_bias,
        }
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ConfigError("falcon export: head_dim * num_heads must equal hidden_size")
    return {
        **common,
        "architectures": ["FalconForCausalLM"],
        "model_type": "falcon",
        "num_kv_heads": cfg.num_kv_heads,
        "ffn_hidden_size": cfg.mlp_dim,
        "activation": "gelu",
        "layer_norm_epsilon": cfg.norm_eps,
        "bias": cfg.qkv_bias,
        "alibi": False,
        "parallel_attn": cfg.parallel_block,
        "new_decoder_architecture": cfg.qkv_layout == "falcon_grouped",
        "multi_query": cfg.qkv_layout == "falcon_mqa",
        "num_ln_in_parallel_attn": cfg.num_block_norms if cfg.qkv_layout == "falcon_grouped" else None,
    }


def read_hf_config(hf_dir: str, **runtime: Any) -> ModelConfig:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no config.json in HF checkpoint directory {hf_dir!r}")
    with open(path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON ({e})") from None
    return from_hf_config(hf, where=path, **runtime)
