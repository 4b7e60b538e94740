"""The training oracle and the evaluation judges a run is configured with, and how good each judge is.

    config.method.oracle / method.oracle_args   labels the method's samples (the training oracle)
    config.eval.oracles                          the evaluation judges: "a,b" or a tuple of names
    config.eval.oracle_args                      per judge: {name: {kwarg: value}}

An eval judge named like the training oracle without its own `eval.oracle_args` entry *is* the
training oracle (the same instance and arguments). Oracles fitted on a corpus (`insult_classifier`)
are fitted on `corpus.train[config.data.toxic_domain]` and cache their model under the data cache dir.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from regft_jax import multihost
from regft_jax.errors import UserInputError

REMOVED_KEYS = {  # old key -> what replaced it
    "eval.oracle": "config.method.oracle (labels the method's samples) and config.eval.oracles (evaluation judges)",
}


def _args(value, key: str) -> dict:
    if value is None:
        return {}
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise UserInputError(f"config.{key}={value!r}: expected a dict of keyword arguments")
    return dict(value)


def eval_oracle_names(config) -> tuple[str, ...]:
    """`config.eval.oracles` as a tuple of distinct registered names (a comma string or a sequence)."""
    from regft_jax.oracles import available_oracles

    value = config.eval.oracles
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n).strip() for n in value]
    names = [n for n in names if n]
    if not names:
        raise UserInputError(f"config.eval.oracles={value!r}: name at least one oracle, "
                             f"e.g. 'profanity,insult_classifier'")
    unknown = [n for n in names if n not in available_oracles()]
    if unknown:
        raise UserInputError(f"config.eval.oracles={value!r}: unknown oracle(s) {unknown}; "
                             f"valid names: {', '.join(available_oracles())}")
    if len(set(names)) != len(names):
        raise UserInputError(f"config.eval.oracles={value!r}: names an oracle twice")
    return tuple(names)


def check_oracle_config(config) -> None:
    """Fail early, with one line naming the key, on a bad training-oracle or eval-judge setting."""
    from regft_jax.oracles import available_oracles

    for old, new in REMOVED_KEYS.items():
        section, key = old.split(".")
        if key in config[section]:
            raise UserInputError(f"config.{old} was removed: use {new}")
    if config.method.get("oracle") not in available_oracles():
        raise UserInputError(f"config.method.oracle={config.method.get('oracle')!r}: expected one of "
                             f"{', '.join(available_oracles())}")
    _args(config.method.get("oracle_args"), "method.oracle_args")
    names = eval_oracle_names(config)
    per_oracle = _args(config.eval.get("oracle_args"), "eval.oracle_args")
    for name, args in per_oracle.items():
        if name not in names:
            raise UserInputError(f"config.eval.oracle_args has key {name!r}, which is not in config.eval.oracles="
                                 f"{config.eval.oracles!r}; give arguments per judge: {{'<oracle>': {{...}}}}")
        _args(args, f"eval.oracle_args.{name}")
    fraction = config.eval.get("min_scored_fraction", 0.9)
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0):
        raise UserInputError(f"config.eval.min_scored_fraction={fraction!r}: expected a number in [0, 1]")
    from regft_jax.eval.protocols import protocol_names

    protocol_names(config)
    judge = config.eval.get("judge", "pretrain")
    if judge not in ("pretrain", "base", "none", "") and not os.path.isdir(str(judge)):
        raise UserInputError(f"config.eval.judge={judge!r}: expected 'pretrain', 'base', 'none' or an HF model "
                             "directory (no such directory)")
    if judge == "pretrain" and config.model.get("source", "random") != "random":
        raise UserInputError(f"config.eval.judge='pretrain' pretrains a judge like the tiny base model, but "
                             f"config.model.source={config.model.source!r}: use 'base' or an HF model directory")
    width, steps = config.eval.get("judge_width", 1.5), config.eval.get("judge_steps", 0)
    if not (isinstance(width, (int, float)) and width > 0) or not (isinstance(steps, int) and steps >= 0):
        raise UserInputError(f"config.eval.judge_width={width!r} / judge_steps={steps!r}: expected a width factor "
                             "> 0 and a step count >= 0 (0: half of config.base.steps)")
    if not isinstance(config.eval.get("save_models", False), bool):
        raise UserInputError(f"config.eval.save_models={config.eval.save_models!r}: expected True or False")
    limit = config.eval.get("protocol_max_prompts", 0)
    if not (isinstance(limit, int) and limit >= 0):
        raise UserInputError(f"config.eval.protocol_max_prompts={limit!r}: expected an integer >= 0 (0 = all prompts)")


def build_oracle(config, corpus, name: str, args: Mapping):
    """Oracle `name` with keyword arguments `args`; a corpus-fitted one is fitted on the training
    split of the toxic domain, with its model cached under config.data.cache_dir (or the default)."""
    from regft_jax.oracles import make_corpus_oracle, needs_corpus

    args = dict(args)
    if needs_corpus(name):
        from regft_jax.data.offline import default_cache_dir

        args.setdefault("cache_dir", config.data.cache_dir or str(default_cache_dir()))
    return make_corpus_oracle(name, corpus, config.data.toxic_domain, **args)


def training_oracle(config, corpus):
    """The oracle that labels the method's samples: config.method.oracle with method.oracle_args."""
    return build_oracle(config, corpus, config.method.oracle, _args(config.method.get("oracle_args"),
                                                                    "method.oracle_args"))


def eval_oracles(config, corpus, training=None) -> dict:
    """name -> Oracle for every name in config.eval.oracles, in order. A judge named like
    config.method.oracle without its own eval.oracle_args entry is `training` (when given) or a
    new instance with method.oracle_args."""
    per_oracle = _args(config.eval.get("oracle_args"), "eval.oracle_args")
    out = {}
    for name in eval_oracle_names(config):
        if name == config.method.oracle and name not in per_oracle:
            out[name] = training if training is not None else training_oracle(config, corpus)
        else:
            out[name] = build_oracle(config, corpus, name, _args(per_oracle.get(name), f"eval.oracle_args.{name}"))
    return out


def is_training_oracle(config, name: str) -> bool:
    """Whether eval judge `name` is the training oracle (same name and arguments)."""
    if name != config.method.oracle:
        return False
    per_oracle = _args(config.eval.get("oracle_args"), "eval.oracle_args")
    return name not in per_oracle or _args(per_oracle[name], "") == _args(config.method.get("oracle_args"), "")


def judge_label(config, name: str) -> str:
    """Column header: "profanity (training oracle)", "insult_classifier (independent)"."""
    if is_training_oracle(config, name):
        return f"{name} (training oracle)"
    if name == config.method.oracle:
        return f"{name} (training oracle's kind, other arguments)"
    return f"{name} (independent)"


def heldout_examples(corpus, domain: str) -> dict[str, list]:
    """The labeled held-out examples of `domain`: {"valid": ..., "prompts": ...} (prompt examples
    keep their full source text; both sets are disjoint from the training split)."""
    return {part: [e for e in getattr(corpus, part).get(domain, []) if e.label is not None]
            for part in ("valid", "prompts")}


def _auc(y: np.ndarray, p: np.ndarray):
    if len(set(y.tolist())) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p))


def judge_quality(oracle, corpus, domain: str, threshold: float = 0.5) -> dict:
    """How well `oracle` separates the labeled held-out examples of `domain` (label >= 0.5 = violation).

    Returns {"auc": ROC-AUC over valid + prompt-source examples, "auc_valid": over the valid split
    alone (None when it has one class only), "n", "n_positive", "n_scored", "tpr"/"fpr": fraction of
    violating / other examples flagged at `threshold`, "mean_p_positive"/"mean_p_negative",
    "brier"}. The prompt sources matter: the valid split can hold few or no violating examples
    when the evaluation prompts are drawn from the violating ones first."""
    parts = heldout_examples(corpus, domain)
    examples = parts["valid"] + parts["prompts"]
    if not examples:
        return {"n": 0, "auc": None}
    y = np.array([float(e.label) >= 0.5 for e in examples], np.int64)
    p = multihost.split_over_processes(oracle.score, [e.text for e in examples], np.float64)  # a share per process
    ok = np.isfinite(p)
    y, p, n_valid = y[ok], p[ok], int(ok[:len(parts["valid"])].sum())
    pos, neg = p[y == 1], p[y == 0]

    def mean(a):
        return float(a.mean()) if a.size else None

    return {"auc": _auc(y, p), "auc_valid": _auc(y[:n_valid], p[:n_valid]), "n": len(examples),
            "n_positive": int(y.sum()), "n_scored": int(ok.sum()), "n_valid": len(parts["valid"]),
            "tpr": mean(pos > threshold), "fpr": mean(neg > threshold), "mean_p_positive": mean(pos),
            "mean_p_negative": mean(neg), "brier": mean((p - y) ** 2)}


def judges_report(config, corpus, oracles: Mapping) -> dict:
    """results.json's "judges": the training oracle, the eval judges, and each judge's held-out quality
    (plus, for a fitted judge, its training-set size)."""
    report = {"training_oracle": config.method.oracle, "eval_oracles": list(oracles),
              "domain": config.data.toxic_domain, "threshold": float(config.eval.threshold)}
    for name, oracle in oracles.items():
        q = judge_quality(oracle, corpus, config.data.toxic_domain, config.eval.threshold)
        q["role"] = "training oracle" if is_training_oracle(config, name) else "independent"
        if hasattr(oracle, "num_train"):
            q.update(num_train=oracle.num_train, num_train_positive=oracle.num_positive,
                     model_digest=getattr(oracle, "digest", None))
        report[name] = q
    return report


def format_judges(report: Mapping) -> str:
    """One line per judge for the log."""
    lines = []
    for name in report["eval_oracles"]:
        q = report[name]
        if not q.get("n"):
            lines.append(f"judge {name} ({q.get('role')}): no labeled held-out {report['domain']} examples")
            continue
        auc = "-" if q["auc"] is None else f"{q['auc']:.3f}"

        def pct(v):
            return "-" if v is None else f"{100 * v:.0f}%"

        trained = (f"; fitted on {q['num_train']} training-split examples ({q['num_train_positive']} violating)"
                   if "num_train" in q else "")
        lines.append(f"judge {name} ({q['role']}): held-out ROC-AUC {auc} on {q['n_scored']} labeled "
                     f"{report['domain']} examples (valid + prompt sources, {q['n_positive']} violating); flagged "
                     f"at {report['threshold']:g}: {pct(q['tpr'])} of violating, {pct(q['fpr'])} of others{trained}")
    return "\n".join(lines)
