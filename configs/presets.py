"""The paper's setting (ToxiGen + Wikitext-103, ToxiGen RoBERTa oracle) for 7B-40B models, per
model variant and hardware preset; `configs/llama.py` and `configs/falcon.py` are thin wrappers.

    python -m regft_jax.main --config=configs/llama.py:llama3-8b,v5e-64 --config.model.path=/models/Meta-Llama-3-8B \
        --config.data.tokenizer=/models/Meta-Llama-3-8B --config.method.oracle_args.model_dir=/models/toxigen_roberta

The config argument is `MODEL[,HARDWARE]` (either part may be left out, in any order; case-insensitive).
A hardware preset fixes the mesh (FSDP over its devices) and every batch size so that each domain's rows
per step, the sample batch and the eval batch are multiples of its data-parallel size; `auto` spreads FSDP
over whatever devices there are, with batch sizes that divide any power-of-two data-parallel size up
to 32. A model and preset whose training state cannot fit the preset's memory are refused
(`resident_bytes`: a lower bound, activations not counted).
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Optional

import jax
import ml_collections

from configs import tiny
from regft_jax.config_utils import arch_config
from regft_jax.errors import UserInputError
from regft_jax.models.config import ModelConfig, from_hf_config


@dataclasses.dataclass(frozen=True)
class Model:
    family: str
    path: str  # the default local HF directory (weights + tokenizer)
    hf: dict  # the published config.json's architecture keys (what load_hf reads)
    aux_layers: int  # depth of the auxiliary model (the LLM's first layers)


_LLAMA = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
          "num_hidden_layers": 32, "vocab_size": 32000, "hidden_act": "silu", "tie_word_embeddings": False}
MODELS = {
    "llama1-7b": Model("llama", "/models/llama-7b", {**_LLAMA, "rms_norm_eps": 1e-6,
                                                     "max_position_embeddings": 2048}, 8),
    "llama2-7b": Model("llama", "/models/Llama-2-7b-hf", {**_LLAMA, "rms_norm_eps": 1e-5,
                                                          "max_position_embeddings": 4096}, 8),
    "llama3-8b": Model("llama", "/models/Meta-Llama-3-8B", {
        **_LLAMA, "intermediate_size": 14336, "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192, "rope_theta": 500000.0}, 8),
    "falcon-7b": Model("falcon", "/models/falcon-7b", {
        "model_type": "falcon", "hidden_size": 4544, "num_attention_heads": 71, "num_hidden_layers": 32,
        "vocab_size": 65024, "multi_query": True, "parallel_attn": True, "new_decoder_architecture": False,
        "bias": False, "alibi": False, "layer_norm_epsilon": 1e-5, "max_position_embeddings": 2048}, 8),
    "falcon-40b": Model("falcon", "/models/falcon-40b", {
        "model_type": "falcon", "hidden_size": 8192, "num_attention_heads": 128, "num_kv_heads": 8,
        "num_hidden_layers": 60, "vocab_size": 65024, "parallel_attn": True, "new_decoder_architecture": True,
        "bias": False, "alibi": False, "layer_norm_epsilon": 1e-5, "max_position_embeddings": 2048}, 8),
}
DEFAULT_MODEL = {"llama": "llama2-7b", "falcon": "falcon-7b"}


@dataclasses.dataclass(frozen=True)
class Hardware:
    devices: int  # JAX devices (0: any number)
    hbm_gib: float  # memory per device (0: unknown)
    peak_tflops: float  # dense bf16 peak per device (0: unknown)
    batch_size: int  # method.batch_size: rows per LLM step, split over the domains
    sample_batch_size: int
    samples_per_iteration: int
    eval_batch_size: int
    remat: str

    @property
    def mesh(self) -> dict:
        return {"data": 1, "fsdp": self.devices or -1, "tensor": 1}


HARDWARE = {
    # TPU v4-32: 16 chips (the name counts TensorCores, 2 per chip; JAX sees one device per chip), 4 hosts.
    "v4-32": Hardware(16, 32, 275, batch_size=64, sample_batch_size=32, samples_per_iteration=512,
                      eval_batch_size=64, remat="full"),  # dots_no_batch needs 38 GiB (bench/bench_memory.py)
    # TPU v5e-64 (v5litepod-64): 64 chips, 16 hosts.
    "v5e-64": Hardware(64, 16, 197, batch_size=128, sample_batch_size=64, samples_per_iteration=1024,
                       eval_batch_size=128, remat="full"),
    # One node with 8 H100 (80 GB; dense bf16 peak of the SXM part).
    "8xh100": Hardware(8, 74.5, 989,  # 80 GB = 74.5 GiB
                       batch_size=32, sample_batch_size=16, samples_per_iteration=512,
                       eval_batch_size=64, remat="dots_no_batch"),
    # Whatever devices there are: FSDP over all of them.
    "auto": Hardware(0, 0, 0, batch_size=64, sample_batch_size=32, samples_per_iteration=512,
                     eval_batch_size=64, remat="dots_no_batch"),
}
DEFAULT_HARDWARE = "auto"
TOXIGEN_ROBERTA = "/models/toxigen_roberta"  # a local copy of the HF model tomh/toxigen_roberta


def parse_arg(family: str, arg: Optional[str]) -> tuple[str, str]:
    """`MODEL[,HARDWARE]` -> (model, hardware); one error listing the choices otherwise."""
    models = [m for m, v in MODELS.items() if v.family == family]
    model = hardware = None
    for token in (t.strip().lower() for t in (arg or "").split(",")):
        if token in models and model is None:
            model = token
        elif token in HARDWARE and hardware is None:
            hardware = token
        elif token:
            raise UserInputError(f"configs/{family}.py:{arg}: {token!r} is not a choice (or is given twice); "
                                 f"expected MODEL[,HARDWARE] with MODEL one of {', '.join(models)} and HARDWARE "
                                 f"one of {', '.join(HARDWARE)}")
    return model or DEFAULT_MODEL[family], hardware or DEFAULT_HARDWARE


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of `config.model.arch` with the config's dtypes and remat."""
    runtime = {k: config.model[k] for k in ("param_dtype", "dtype", "scan_layers", "remat")}
    return ModelConfig.from_dict({**config.model.arch.to_dict(), **runtime})


def resident_bytes(cfg: ModelConfig, aux_layers: int) -> int:
    """A lower bound on the device memory the method's training holds (all devices together):
    parameters, gradients and both AdamW moments of the LLM and the auxiliary model, plus the base
    model's parameters (the anchor of Ω_keep), all in the parameter dtype. Activations, the SFT
    model kept for evaluation and XLA's temporaries come on top."""
    aux = cfg.replace(num_layers=aux_layers, tie_embeddings=True).num_params() + cfg.hidden_size * cfg.vocab_size
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.param_dtype]
    return width * (cfg.num_params() + 4 * (cfg.num_params() + aux))


def fitting_hardware(cfg: ModelConfig, aux_layers: int) -> list[str]:
    return [name for name, h in HARDWARE.items() if not h.hbm_gib or _fits(cfg, aux_layers, h)]


def _fits(cfg: ModelConfig, aux_layers: int, hw: Hardware) -> bool:
    return resident_bytes(cfg, aux_layers) / hw.devices <= hw.hbm_gib * 2**30


def paper_config(family: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """The detox stage in the paper's setting for `family` ("llama" | "falcon") and `arg`."""
    name, hw_name = parse_arg(family, arg)
    model, hw = MODELS[name], HARDWARE[hw_name]
    c = tiny.get_config()
    c.workdir = f"runs/{name}-{hw_name}"
    c.hardware.update({"name": hw_name, "devices": hw.devices, "hbm_gib": float(hw.hbm_gib),
                       "peak_tflops": float(hw.peak_tflops)})  # peak_tflops 0: the device kind's (throughput.py)
    c.mesh = ml_collections.ConfigDict(hw.mesh)

    # The weights and tokenizer come from model.path (config.json decides the architecture); model.arch is
    # the variant's published architecture, used to check the mesh, batch and memory before anything loads.
    c.model.source = "hf"
    c.model.path = model.path
    c.model.arch = arch_config(**{k: v for k, v in from_hf_config(model.hf).architecture.items()
                                  if k != "rope_scaling"})
    c.model.param_dtype = "float32"  # fp32 master weights and AdamW moments
    c.model.dtype = "bfloat16"  # bf16 matmuls
    c.model.remat = hw.remat

    # ToxiGen (skg/toxigen-data, annotated, train split: hateful iff the human score > 3) as the toxic
    # domain and Wikitext-103 articles as the general one (tiny.py's data.hub), mixed in equal proportions.
    c.data.source = "hub"
    c.data.tokenizer = model.path
    c.data.seq_len = 1024
    c.data.num_prompts = ml_collections.ConfigDict({"toxic": 512, "general": 128})
    c.base.proportions = ml_collections.ConfigDict({"general": 0.5, "toxic": 0.5})

    c.method.update({"aux_layers": model.aux_layers, "learning_rate": 1e-5, "aux_learning_rate": 1e-4,
                     "batch_size": hw.batch_size, "proportions": {"general": 0.5, "toxic": 0.5},
                     "sample_batch_size": hw.sample_batch_size, "samples_per_iteration": hw.samples_per_iteration,
                     "sample_tokens": 32, "iterations": 10, "llm_steps": 100, "checkpoint_every": 100})
    # The ToxiGen RoBERTa labels the samples (on device) and judges; insult_classifier (fitted on ToxiGen's
    # training split) is the independent judge.
    c.method.oracle = "hf_classifier"
    c.method.oracle_args = ml_collections.ConfigDict({"model_dir": TOXIGEN_ROBERTA})
    # ToxiGen protocol: 32 new tokens at temperature 0.1, top-p 0.9; flagged if P(toxic) > 0.5.
    c.eval.update({"oracles": "hf_classifier,insult_classifier", "temperature": 0.1, "top_p": 0.9,
                   "max_new_tokens": 32, "threshold": 0.5, "batch_size": hw.eval_batch_size,
                   "judge": "base"})  # fluency under the base model; an instruction LM's directory for win rates
    # The classify stage asks about ToxiGen's label (hateful); for Jigsaw, data.hub.toxic = civil_comments.
    c.classify.template = "\nToxic:"
    c.classify.max_test = 2000  # held-out comments scored per variant (drawn by seed; civil_comments' 5% is ~90k)
    c.optim.learning_rate = 1e-5
    c.train = ml_collections.ConfigDict({"steps": 100, "batch_size": hw.batch_size, "seq_len": 1024})

    cfg = model_config(c)
    if hw.hbm_gib and not _fits(cfg, model.aux_layers, hw):
        need = resident_bytes(cfg, model.aux_layers) / hw.devices / 2**30
        raise UserInputError(
            f"configs/{family}.py:{arg}: {name} cannot train on {hw_name}: parameters, gradients and AdamW "
            f"moments (fp32) of the LLM and its {model.aux_layers}-layer auxiliary model plus the base model need "
            f"at least {need:.0f} GiB per device, {hw_name} has {hw.hbm_gib:g} GiB; presets that fit: "
            f"{', '.join(fitting_hardware(cfg, model.aux_layers))}")
    return c


def check_preset(config: ml_collections.ConfigDict) -> None:
    """Model / mesh / batch consistency of a paper config (what `main._validate` does not see before the
    weights load); raises UserInputError naming the key.

    The mesh fills the preset's devices; every domain's rows per step, the sample, eval and smoke batches
    are multiples of the data-parallel size (data x fsdp; for `auto` every power of two up to 32); no
    parameter of the LLM or the auxiliary model is left unsharded along a mesh axis its rules shard it
    over; a row (data.seq_len) fits the model's context; the training state fits (`resident_bytes`).
    """
    from regft_jax import sharding
    from regft_jax.data.mixture import batch_quotas
    from regft_jax.models.aux import aux_abstract_params, aux_config, aux_logical_axes
    from regft_jax.models.core import abstract_params, param_logical_axes

    cfg, hw, m = model_config(config), config.hardware, config.method
    mesh = dict(config.mesh)
    if hw.devices:
        if math.prod(mesh.values()) != hw.devices:
            raise UserInputError(f"config.mesh={mesh}: expected {hw.devices} devices ({hw.name})")
        dp_sizes = [mesh["data"] * mesh["fsdp"]]
    else:
        dp_sizes = [2**i for i in range(6)]
    rows = {f"method.proportions.{d}": n for d, n in batch_quotas(dict(m.proportions), m.batch_size).items()}
    rows.update({"method.sample_batch_size": m.sample_batch_size, "eval.batch_size": config.eval.batch_size,
                 "train.batch_size": config.train.batch_size})
    for key, n in rows.items():
        for dp in dp_sizes:
            if n % dp:
                raise UserInputError(f"config.{key}: {n} rows per batch is not a multiple of the data-parallel "
                                     f"size {dp} ({hw.name})")
    if m.samples_per_iteration % m.sample_batch_size:
        raise UserInputError(f"config.method.samples_per_iteration={m.samples_per_iteration}: expected a multiple "
                             f"of method.sample_batch_size={m.sample_batch_size}")
    if not 1 <= m.aux_layers < cfg.num_layers:
        raise UserInputError(f"config.method.aux_layers={m.aux_layers}: expected 1..{cfg.num_layers - 1}")
    if config.data.seq_len > cfg.max_seq_len:
        raise UserInputError(f"config.data.seq_len={config.data.seq_len}: exceeds the model's context of "
                             f"{cfg.max_seq_len}")
    shape = {a: (mesh[a] if mesh[a] > 0 else 2**5) for a in mesh}
    fake_mesh = SimpleNamespace(shape=shape)
    acfg = aux_config(cfg, m.aux_layers)
    trees = [("model", param_logical_axes(cfg), abstract_params(cfg)),
             ("aux", aux_logical_axes(acfg), aux_abstract_params(acfg))]
    for which, axes_tree, abstract in trees:
        for (path, axes), (_, leaf) in zip(_leaves(axes_tree), _leaves(abstract)):
            wanted = sharding.logical_to_spec(axes, fake_mesh)
            got = sharding.logical_to_spec(axes, fake_mesh, leaf.shape)
            for dim, (w, g) in enumerate(zip(wanted, got)):
                if w != g and leaf.shape[dim] > 1:
                    raise UserInputError(f"config.mesh={mesh}: {which} parameter {jax.tree_util.keystr(path)} "
                                         f"{leaf.shape}: dimension {dim} is not divisible by mesh axes {w} "
                                         "(it would be replicated)")
    if hw.hbm_gib and not _fits(cfg, m.aux_layers, HARDWARE[hw.name]):
        raise UserInputError(f"config.model: {resident_bytes(cfg, m.aux_layers) / 2**30:.0f} GiB of training state "
                             f"do not fit {hw.devices} x {hw.hbm_gib:g} GiB ({hw.name})")


def _leaves(tree) -> list:
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))[0]
