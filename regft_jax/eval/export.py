"""Evaluated models as directories that lm-eval's `regft_jax` backend (regft_jax/eval/harness.py) loads.

    export_model(out, cfg, params, tokenizer)                    # regft_jax model checkpoint + tokenizer
    export_model(out, cfg, params, tokenizer, hf=True)           # an HF directory + tokenizer (one process)
    export_model(out, cfg, params, tokenizer, guidance=AuxGuidance(aux_cfg), guidance_params=aux_params)
    paths = save_models(workdir / "models", {"ours": trained, ...}, cfg, tokenizer)   # main's eval.save_models
    cfg, params, guidance, guidance_params = load_model_dir(out, mesh=mesh)

Layout of an exported directory OUT:
    OUT/model_config.json, OUT/params/        the LLM, a `checkpoint.save_model` checkpoint (or, with hf=True,
                                              OUT/config.json + safetensors, `models.save_hf`)
    OUT/tokenizer.json (+ tokenizer_config.json, special_tokens_map.json)   the tokenizer's own files
    OUT/aux/model_config.json, OUT/aux/params/   only for a guided model (NADO decoding): the auxiliary model
                                              R = σ(z_φ), whose model is q = p · R (logits_q = logits + log σ(z_φ))

Several processes: every process calls `export_model` (orbax writes each process's shards of the sharded
parameters); only process 0 writes the JSON and tokenizer files.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping, Optional

import jax

from regft_jax import checkpoint, multihost
from regft_jax.errors import UserInputError

AUX_DIR = "aux"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_files(tokenizer) -> list[str]:
    """The files of `tokenizer` (a `data.tokenizer.Tokenizer`, loaded from a directory or its tokenizer.json)
    that `transformers.AutoTokenizer.from_pretrained` reads from a directory holding copies of them."""
    source = tokenizer.name if os.path.isdir(tokenizer.name) else os.path.dirname(tokenizer.name)
    if not os.path.isfile(os.path.join(source, TOKENIZER_FILES[0])):
        raise UserInputError(f"export: the tokenizer {tokenizer.name!r} has no {TOKENIZER_FILES[0]} to copy")
    return [os.path.join(source, name) for name in TOKENIZER_FILES if os.path.isfile(os.path.join(source, name))]


def export_model(out_dir: str, cfg, params, tokenizer, *, hf: bool = False, guidance=None,
                 guidance_params: Any = None) -> str:
    """Write the model (a regft_jax model checkpoint; with `hf`, an HF directory), its tokenizer and, with a
    `models.aux.AuxGuidance`, the auxiliary model under OUT/aux (see the module docstring). LoRA factors are
    merged first. Replaces an earlier export in out_dir. Every process must call it. Returns the absolute path."""
    from regft_jax.models.aux import AuxGuidance
    from regft_jax.models.lora import merge_lora

    if guidance is not None and not isinstance(guidance, AuxGuidance):
        raise UserInputError(f"export: a guided model is exported with a models.aux.AuxGuidance, not a "
                             f"{type(guidance).__name__}")
    out_dir = os.path.abspath(out_dir)
    files = tokenizer_files(tokenizer)  # (checked on every process before any of them writes)
    if cfg.lora_rank:
        cfg, params = merge_lora(cfg, params)
    if hf:
        if jax.process_count() > 1:
            raise UserInputError("export: an HF directory is written by one process; use the regft_jax "
                                 "checkpoint format (hf=False) with several processes")
        from regft_jax.models import save_hf

        save_hf(cfg, params, out_dir)
    else:
        checkpoint.save_model(out_dir, cfg, params, overwrite=True)
    aux_dir = os.path.join(out_dir, AUX_DIR)
    if guidance is not None:
        checkpoint.save_model(aux_dir, guidance.cfg, guidance_params, overwrite=True)
    if multihost.is_primary():
        if guidance is None and os.path.isdir(aux_dir):  # an earlier export's, of a guided model
            shutil.rmtree(aux_dir)
        for file in files:
            shutil.copy(file, out_dir)
    return out_dir


def save_models(root: str, models: Mapping[str, Any], cfg, tokenizer) -> dict[str, str]:
    """Every model (name -> `train.baselines.Trained`: params, guidance, guidance_params) exported with
    `export_model` to root/<name>/. Returns name -> directory."""
    return {name: export_model(os.path.join(root, name), cfg, trained.params, tokenizer, guidance=trained.guidance,
                               guidance_params=trained.guidance_params)
            for name, trained in models.items()}


def load_model_dir(path: str, *, mesh=None, **runtime) -> tuple[Any, Any, Optional[Any], Any]:
    """(cfg, params, guidance, guidance_params) of an HF directory (config.json + safetensors) or a regft_jax
    model checkpoint (`checkpoint.save_model`), parameters placed on `mesh`; guidance is an `AuxGuidance` of
    the auxiliary model in path/aux when there is one (else None, None). `runtime`: ModelConfig overrides
    (dtype, ...) for both models."""
    from regft_jax.models import load_hf
    from regft_jax.models.aux import AuxGuidance

    if not os.path.isdir(path):
        raise UserInputError(f"{path}: no such model directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        cfg, params = load_hf(path, mesh=mesh, **runtime)
    elif os.path.isfile(os.path.join(path, checkpoint.CONFIG_FILE)):
        cfg, params = checkpoint.load_model(path, mesh=mesh, **runtime)
    else:
        raise UserInputError(f"{path}: neither an HF model directory (config.json) nor a regft_jax model "
                             f"checkpoint ({checkpoint.CONFIG_FILE})")
    aux_dir = os.path.join(path, AUX_DIR)
    if not os.path.isdir(aux_dir):
        return cfg, params, None, None
    aux_cfg, aux_params = checkpoint.load_aux_model(aux_dir, mesh=mesh, **runtime)
    if aux_cfg.vocab_size != cfg.vocab_size:
        raise UserInputError(f"{aux_dir}: the auxiliary model's vocab_size {aux_cfg.vocab_size} differs from the "
                             f"model's {cfg.vocab_size}")
    return cfg, params, AuxGuidance(aux_cfg), aux_params
