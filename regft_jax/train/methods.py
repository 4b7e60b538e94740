"""Every method of the `detox` stage, selected by `config.methods` (DESIGN.md section 3).

    names = selected_methods(config)                     # e.g. ["base", "sft", "ours"]
    trained = train_method("rl", config, mesh, corpus, cfg, base_params, oracle, workdir=workdir)

All of them start from the same corpus, base model and training oracle, and are evaluated the same
way (`Trained`: nado_decoding is evaluated under q = p_base · R, generations and likelihoods).
Each trains in its own `<workdir>/checkpoints/<name>/` and resumes from there.

  base             the untouched base model
  sft              LM loss on the method's corpus mixture (`baselines.sft_baseline`)
  filtering        SFT on the corpus without the training examples the training oracle flags
                   (`config.filtering.threshold`; `baselines.run_filtering`)
  rl               RLOO on sampled continuations with reward C(x), a KL penalty to the base model and the
                   corpus LM loss (`train/rl.py`, `config.rl`)
  dpo              DPO on oracle-ranked pairs of samples of the same prompt, reference = the base model
                   (`train/rl.py`, `config.dpo`)
  nado_decoding    no LLM update: the auxiliary model trained on base-model samples, decoding from
                   q = p_base · R (`train/nado.py`)
  ours             the method (`config.method`; `schedules.run_method`)
  ours_noadaptive  ours with one regularizer, Ω_tox with λ_toxic on every domain (method.adaptive=False)
  ours_sequential  ours with the sequential schedule (method.schedule="sequential")

With `config.lora.rank` > 0 every method that updates the LLM trains LoRA factors only (`models/lora.py`);
main.py merges them into the weights before the evaluation.
"""

from __future__ import annotations

import copy
from typing import Callable

from regft_jax.config_utils import require
from regft_jax.models.config import LORA_TARGETS
from regft_jax.train.baselines import Trained, run_filtering, sft_baseline

# variant name -> the config.method values it overrides
OURS_VARIANTS = {"ours": {}, "ours_noadaptive": {"adaptive": False}, "ours_sequential": {"schedule": "sequential"}}
METHODS = ("base", "sft", "filtering", "rl", "dpo", "nado_decoding") + tuple(OURS_VARIANTS)
SAMPLING = ("rl", "dpo", "nado_decoding") + tuple(OURS_VARIANTS)  # draw and label samples while they train
NEEDS_ORACLE = ("filtering",) + SAMPLING


def selected_methods(config) -> list[str]:
    """The names in `config.methods` (comma-separated; "all" = `METHODS`), checked: known, each once,
    at least one."""
    names = [n.strip() for n in str(config.methods).split(",") if n.strip()]
    if names == ["all"]:
        return list(METHODS)
    require(config, "methods", bool(names) and all(n in METHODS for n in names) and len(set(names)) == len(names),
            f"'all' or a comma-separated list of distinct names among {', '.join(METHODS)}")
    return names


def check_methods_config(config, mesh, names=None) -> None:
    """Each method's own config keys (one line naming a bad one), before any training; names: those of
    `config.methods` by default."""
    names = selected_methods(config) if names is None else names
    from regft_jax.train.schedules import check_method_config

    check_method_config(config, mesh)  # the shared optimizer / batch / sampling settings
    for name in names:
        if name in OURS_VARIANTS:
            check_method_config(ours_config(config, name), mesh)
    require(config, "filtering.threshold", 0.0 <= config.filtering.threshold < 1.0, "in [0, 1)")
    lora = config.get("lora")
    if lora is not None:
        require(config, "lora.rank", isinstance(lora.rank, int) and lora.rank >= 0, "an integer >= 0 (0 = no LoRA)")
        require(config, "lora.alpha", lora.alpha > 0, "a positive number (the factors' scale is alpha / rank)")
        targets = [t.strip() for t in str(lora.targets).split(",") if t.strip()]
        require(config, "lora.targets", targets == ["all"] or (targets and set(targets) <= set(LORA_TARGETS)),
                f"'all' or a comma-separated list among {', '.join(LORA_TARGETS)}")
    if "rl" in names or "dpo" in names:
        from regft_jax.train.rl import check_rl_config

        check_rl_config(config, mesh, [n for n in names if n in ("rl", "dpo")])


def ours_config(config, name: str):
    """A copy of `config` with the variant's `config.method` overrides."""
    out = copy.deepcopy(config)
    for key, value in OURS_VARIANTS[name].items():
        out.method[key] = value
    return out


def _run_ours(name: str) -> Callable:
    def run(config, mesh, corpus, cfg, base_params, oracle, *, workdir=None, desc=name):
        from regft_jax.train.schedules import run_method

        params, _, _, history = run_method(ours_config(config, name), mesh, corpus, cfg, base_params, oracle,
                                           workdir=workdir, desc=desc)
        return Trained(params, history)
    return run


def _run_sft(config, mesh, corpus, cfg, base_params, oracle, *, workdir=None, desc="sft"):
    params, history = sft_baseline(config, mesh, corpus, cfg, base_params, workdir=workdir, desc=desc)
    return Trained(params, history)


def _run_rl(config, mesh, corpus, cfg, base_params, oracle, *, workdir=None, desc="rl"):
    from regft_jax.train.rl import run_rl

    return run_rl(config, mesh, corpus, cfg, base_params, oracle, workdir=workdir, desc=desc)


def _run_dpo(config, mesh, corpus, cfg, base_params, oracle, *, workdir=None, desc="dpo"):
    from regft_jax.train.rl import run_dpo

    return run_dpo(config, mesh, corpus, cfg, base_params, oracle, workdir=workdir, desc=desc)


def _run_nado(config, mesh, corpus, cfg, base_params, oracle, *, workdir=None, desc="nado_decoding"):
    from regft_jax.train.nado import run_nado_decoding

    return run_nado_decoding(config, mesh, corpus, cfg, base_params, oracle, workdir=workdir, desc=desc)


RUNNERS: dict[str, Callable] = {
    "base": lambda config, mesh, corpus, cfg, base_params, oracle, **_: Trained(base_params),
    "sft": _run_sft, "filtering": run_filtering, "rl": _run_rl, "dpo": _run_dpo, "nado_decoding": _run_nado,
    **{name: _run_ours(name) for name in OURS_VARIANTS}}


def train_method(name: str, config, mesh, corpus, cfg, base_params, oracle, *, workdir=None,
                 desc: str = "") -> Trained:
    """Train method `name` from `base_params` (see the module docstring); its checkpoints, metrics log and
    progress bar are named `desc` (default: the method's name)."""
    return RUNNERS[name](config, mesh, corpus, cfg, base_params, oracle, workdir=workdir, desc=desc or name)
