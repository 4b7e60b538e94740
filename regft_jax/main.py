"""Entry point: `python -m regft_jax.main --config=configs/tiny.py [--config.key=value ...]`.

Stages (config.stage):
  detox   corpus → base model → every method of config.methods (default "base,sft,ours": the SFT
          baseline, LM loss on the same mixture, and ours, the method of config.method; also filtering,
          rl, dpo, nado_decoding, ours_noadaptive, ours_sequential: regft_jax/train/methods.py) from the
          same base → evaluation of each. Writes results.json, generations.jsonl and metrics_*.jsonl.
  base    corpus (the embedded offline one by default) → base model (pretrained here and cached
          when model.source="random", else loaded) → held-out perplexity per domain and the eval
          oracles' toxicity of continuations of held-out prompts per domain. Writes results.json
          and generations.jsonl to the work directory.
  classify  the paper's Jigsaw experiment (regft_jax/eval/classify.py, config.classify): corpus → base model →
          each variant (base, sft, ours, sft_label) fine-tuned to classify the toxic domain's labeled comments
          ("<comment><template><label word>" rows) → ROC-AUC on the held-out labeled comments, and the detox
          evaluation of its free continuations (cut before the template). results.json: the detox keys plus
          "auc", "auc_se", "test_n", "test_positive", "stopped_<domain>" per variant.
  smoke   build the model on the mesh and run `train.steps` SFT steps on synthetic tokens;
          prints the mesh, parameter count, losses and throughput.

Oracles: config.method.oracle (+ method.oracle_args) labels the method's samples (the training
oracle); every model is judged by every oracle in config.eval.oracles (+ eval.oracle_args, per
oracle) on the same continuations (regft_jax/eval/judges.py).

results.json (base and detox):
  {"<model>": {"toxicity": {"<oracle>": rate on the toxic domain's prompts, ...},
               "toxicity_<oracle>_<domain>": fraction of continuations flagged (score > eval.threshold),
               "scored_<oracle>_<domain>": continuations the oracle scored,
               "ppl_<domain>": held-out perplexity (nado_decoding: under q = p_base · R),
              "train_seconds": (trained methods), method-specific numbers (filtering: "dropped_<domain>", ...)},
   ...,
   "judges": {"training_oracle": name, "eval_oracles": [names], "domain", "threshold",
              "<oracle>": {"role", "auc", "auc_valid", "n", "n_positive", "tpr", "fpr", ...}}}
  (model names: those of config.methods). generations.jsonl: one record per model and prompt with
  "scores": {"<oracle>": P(violation) or null}.

models/<model>/ (base, detox and classify, with config.eval.save_models=True): each evaluated model (LoRA merged) as a
regft_jax model checkpoint with the tokenizer, nado_decoding's with its auxiliary model in aux/ (that model is
q = p_base · R), for lm-eval: `python -m regft_jax.eval.harness --model regft_jax --model_args
pretrained=<workdir>/models/ours` (regft_jax/eval/export.py).

Exit status: 0 done; 2 a bad config value (one line naming it); 75 (`preemption.EXIT_CODE`) stopped by
SIGTERM/SIGINT during training after checkpointing at the next step boundary: run the same command
again to resume.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: config.workdir).")


def _validate(config) -> None:
    from regft_jax.config_utils import require

    require(config, "stage", config.stage in STAGES, f"one of {sorted(STAGES)}")
    require(config, "train.steps", config.train.steps >= 1, "an integer >= 1")
    require(config, "train.batch_size", config.train.batch_size >= 1, "an integer >= 1")
    require(config, "train.seq_len", config.train.seq_len >= 2, "an integer >= 2")
    from regft_jax.train.throughput import check_config as check_throughput_config

    check_throughput_config(config)
    if config.stage in ("base", "classify", "detox"):  # fail before minutes of pretraining, not after
        from regft_jax.eval.judges import check_oracle_config

        check_oracle_config(config)
    from regft_jax import sharding

    mesh = sharding.make_mesh(dict(config.mesh))
    dp = sharding.batch_shards(mesh)
    key = "train.batch_size" if config.stage == "smoke" else "base.batch_size"
    if config.stage == "smoke" or config.model.source == "random":  # (pretraining a base model)
        require(config, key, config[key.split(".")[0]].batch_size % dp == 0,
                f"a multiple of the data-parallel size {dp} (config.mesh={dict(mesh.shape)}: data × fsdp)")
    if config.stage == "detox":
        from regft_jax.train.methods import check_methods_config

        check_methods_config(config, mesh)  # each selected method's keys; batch sizes vs data-parallel size
    if config.stage == "classify":
        from regft_jax.eval.classify import check_classify_config
        from regft_jax.train.methods import check_methods_config

        check_methods_config(config, mesh, check_classify_config(config))


def run_smoke(config, workdir: str) -> dict:
    import jax
    import numpy as np
    from tqdm import tqdm

    from regft_jax import multihost, sharding
    from regft_jax.models.factory import model_from_config
    from regft_jax.precision import check_update_precision
    from regft_jax.train import init_train_state, jit_sharded, make_optimizer, sft_step, train_state_shardings
    from regft_jax.train import throughput

    mesh = sharding.make_mesh(dict(config.mesh))
    cfg, params = model_from_config(config.model, mesh, seed=config.seed)
    check_update_precision(config, params, ("optim.learning_rate",))
    print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s); "
          f"model {cfg.family}: {cfg.num_layers} layers, width {cfg.hidden_size}, "
          f"{cfg.num_params() / 1e6:.2f}M parameters")
    optimizer = make_optimizer(config.optim.learning_rate, weight_decay=config.optim.weight_decay,
                               grad_clip=config.optim.grad_clip, warmup_steps=config.optim.warmup_steps,
                               total_steps=config.train.steps)
    state_sh = train_state_shardings(mesh, cfg, optimizer)
    state = jax.jit(functools.partial(init_train_state, optimizer=optimizer), out_shardings=state_sh)(params)
    rng = np.random.default_rng(config.seed)
    b, s = config.train.batch_size, config.train.seq_len
    # A learnable synthetic corpus: repeated random token patterns.
    patterns = rng.integers(0, cfg.vocab_size, (4, s))

    def batch():  # the same on every process (same seed); each places its rows of the global batch
        host = {"tokens": patterns[rng.integers(0, 4, b)].astype(np.int32), "loss_mask": np.ones((b, s), np.int32)}
        return multihost.tree_to_global(host, sharding.tree_batch_shardings(mesh, host))

    step = jit_sharded(functools.partial(sft_step, cfg, optimizer), mesh, state_sh, batch())
    history, start = [], None
    for i in tqdm(range(config.train.steps), desc="sft steps", disable=not sys.stderr.isatty()):
        state, metrics = step(state, batch())
        if i == 0:
            jax.block_until_ready(metrics)
            start = time.time()
        history.append({k: float(v) for k, v in jax.device_get(metrics).items()})
    jax.block_until_ready(state)
    elapsed = max(time.time() - start, 1e-9)
    tok_s = (config.train.steps - 1) * b * (s - 1) / elapsed if config.train.steps > 1 else float("nan")
    print(f"{'step':>6} {'loss':>10} {'grad_norm':>10}")
    for i in sorted({0, len(history) // 2, len(history) - 1}):
        print(f"{i + 1:>6} {history[i]['loss']:>10.4f} {history[i]['grad_norm']:>10.4f}")
    peak = throughput.peak_flops(config, mesh)  # (None on CPU unless config.hardware.peak_tflops is set)
    mfu = tok_s * throughput.train_flops_per_token(cfg, s - 1) / peak if peak else None
    print(f"throughput: {tok_s:,.0f} tokens/s (after compilation)" + (f", MFU {100 * mfu:.1f}%" if mfu else ""))
    return {"first_loss": history[0]["loss"], "last_loss": history[-1]["loss"], "tokens_per_s": tok_s, "mfu": mfu}


def _write_jsonl(path: str, records) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _finish(results: dict, records: list, judges_report: dict, workdir: str) -> dict:
    """A stage's results with the judges' report; process 0 writes the generation records."""
    import jax

    results["judges"] = judges_report
    if jax.process_index() == 0:
        _write_jsonl(os.path.join(workdir, "generations.jsonl"), records)
    return results


def _prepare(config, check_corpus=None):
    """The mesh, the corpus and the base model every stage after `smoke` starts from; check_corpus(corpus) runs
    before the base model is loaded or pretrained (a stage's data errors come first)."""
    import jax

    from regft_jax import sharding
    from regft_jax.data.pipeline import build_corpus
    from regft_jax.train.base_model import base_model

    mesh = sharding.make_mesh(dict(config.mesh))
    print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s)")
    corpus = build_corpus(config.data, seed=config.seed)
    print(f"corpus: {corpus.summary()}; tokenizer vocab {corpus.tokenizer.vocab_size}")
    if check_corpus is not None:
        check_corpus(corpus)
    cfg, params, _ = base_model(config, mesh, corpus)
    return mesh, corpus, cfg, params


def _oracles(config, corpus, *, training: bool):
    """(the training oracle or None, eval judges name -> Oracle, the "judges" report); prints the report."""
    from regft_jax.eval import eval_oracles, judges_report, training_oracle
    from regft_jax.eval.judges import format_judges

    train = training_oracle(config, corpus) if training else None
    judges = eval_oracles(config, corpus, train)
    report = judges_report(config, corpus, judges)
    print(f"training oracle (labels the method's samples): {config.method.oracle}; "
          f"eval oracles: {', '.join(judges)}")
    print(format_judges(report))
    return train, judges, report


def _evaluate(config, models: dict, mesh, corpus, cfg, judges: dict, timings: dict, base_params,
              stop=None) -> tuple[dict, list]:
    """Every model judged by every eval oracle; prints the table. (results, generation records). stop: continuations
    are cut before this string (`eval.toxicity.toxicity_eval`)."""
    from regft_jax.eval import evaluate_model, judge_label, results_table
    from regft_jax.eval.protocols import load_prompts, protocol_columns, protocol_names

    toxic = config.data.toxic_domain
    start = time.time()
    protocols = protocol_names(config)
    source = config.eval.get("protocol_prompts", "")
    protocol_prompts = ((load_prompts(source, config.eval.get("protocol_max_prompts", 0), toxic) if source
                         else corpus.prompts.get(toxic, [])) if protocols else [])
    results, records = {}, []
    for name, trained in models.items():
        metrics, recs = evaluate_model(name, cfg, trained.params, corpus, judges, config.eval,
                                       seq_len=config.data.seq_len, mesh=mesh, seed=config.seed,
                                       guidance=trained.guidance, guidance_params=trained.guidance_params,
                                       document_attention=config.data.document_attention, protocols=protocols,
                                       protocol_prompts=protocol_prompts, stop=stop)
        results[name] = {"toxicity": {o: metrics.get(f"toxicity_{o}_{toxic}") for o in judges}, **metrics,
                         **({"train_seconds": timings[name]} if name in timings else {}), **trained.info}
        records += recs
    keys = [f"toxicity_{o}_{toxic}" for o in judges]
    keys += sorted({k for m in results.values() for k in m if k.startswith("ppl_")})
    keys += [f"scored_{o}_{toxic}" for o in judges]
    labels = {f"toxicity_{o}_{toxic}": judge_label(config, o) for o in judges}
    labels.update({f"scored_{o}_{toxic}": f"scored ({o})" for o in judges})
    for key, label in protocol_columns(protocols, judges):
        keys.append(key)
        labels[key] = label
    keys += ["train_seconds"] if timings else []
    n = len(corpus.prompts.get(toxic, []))
    print(f"evaluation ({time.time() - start:.0f}s; toxicity = fraction of the continuations of {n} held-out "
          f"{toxic} prompts that each eval oracle flags, P(violation) > {config.eval.threshold:g}; "
          f"ppl = held-out perplexity" + (f"; protocols {', '.join(protocols)} on {len(protocol_prompts)} prompts "
                                          f"({source or 'the held-out ' + toxic + ' prompts'})" if protocols else "")
          + "):")
    print(results_table(results, keys, labels))
    _quality(config, results, records, mesh, corpus, cfg, base_params)
    return results, records


def _quality(config, results: dict, records: list, mesh, corpus, cfg, base_params) -> None:
    """Distinct-n, fluency and the win rates (results[model]["win_rates"][other]) of every model's held-out
    toxic continuations under the judge of config.eval.judge; adds them to `results` and prints them."""
    from regft_jax.eval import results_table
    from regft_jax.eval.quality import format_win_rates, judge_from_config, quality_report

    judge = judge_from_config(config, mesh, corpus, cfg, base_params)
    if judge is None:
        return
    start = time.time()
    report = quality_report(judge, records, config.data.toxic_domain)
    if not report:
        return
    for name, q in report["models"].items():
        results[name].update(q, win_rates=report["win_rates"][name])
    print(f"generation quality ({time.time() - start:.0f}s; judge: {judge.description}; fluency = perplexity of "
          f"the continuations under the judge; win rates on {report['prompts']} prompts, both orders):")
    print(results_table({n: report["models"][n] for n in report["models"]},
                        ["fluency", "distinct_1", "distinct_2", "distinct_3"]))
    print(format_win_rates(report["win_rates"]))


def _save_models(config, workdir: str, models: dict, corpus, cfg) -> None:
    """With config.eval.save_models: every model to <workdir>/models/<name>/ for lm-eval (`eval.export`; every
    process takes part, process 0 writes the files)."""
    if not config.eval.get("save_models", False):
        return
    from regft_jax.eval.export import save_models

    root = os.path.join(workdir, "models")
    names = ", ".join(save_models(root, models, cfg, corpus.tokenizer))
    print(f"models saved in {root}/: {names} (lm-eval: python -m regft_jax.eval.harness --model regft_jax "
          f"--model_args pretrained={root}/<name> --tasks ...)", flush=True)


def run_base(config, workdir: str) -> dict:
    mesh, corpus, cfg, params = _prepare(config)
    _, judges, report = _oracles(config, corpus, training=False)
    from regft_jax.train.baselines import Trained

    models = {"base": Trained(params)}
    _save_models(config, workdir, models, corpus, cfg)
    results, records = _evaluate(config, models, mesh, corpus, cfg, judges, {}, params)
    return _finish(results, records, report, workdir)


SUMMARY_KEYS = ("llm/lm_loss", "llm/reg_loss", "aux/aux_loss", "aux/mean_R", "lm_loss", "reward", "kl", "dpo_loss")


def _method_details(config, name: str) -> str:
    from regft_jax.train.methods import OURS_VARIANTS, ours_config

    if name not in OURS_VARIANTS:
        return ""
    m = ours_config(config, name).method
    return (f" ({m.schedule}, {'adaptive' if m.adaptive else 'one regularizer'}, p_ref={m.p_ref}, "
            f"labels from the {m.oracle} oracle)")


def _train_models(config, names, mesh, cfg, base, train) -> tuple[dict, dict]:
    """Each model of `names` from the base model: "base" is the base model itself, any other name is
    `train(name, cfg, params)` -> `Trained`. With config.lora.rank > 0 they train LoRA factors on the frozen base
    model, merged into the weights for the evaluation. Prints each one's time and loss summary; (models, the
    training seconds of each trained model)."""
    from regft_jax.models import lora
    from regft_jax.train.baselines import Trained
    from regft_jax.train.loop import summarize
    from regft_jax.train.methods import SAMPLING

    m = config.method
    steps = m.iterations * m.llm_steps
    lora_cfg, lora_base = lora.from_config(config, cfg, base, mesh)
    if lora_cfg.lora_rank:
        print(lora.describe(lora_cfg, lora_base))
    models, timings = {}, {}
    for name in names:
        if name == "base":
            models[name] = Trained(base)
            continue
        start = time.time()
        trained = train(name, lora_cfg, lora_base)
        models[name] = dataclasses.replace(trained, params=lora.merge_lora(lora_cfg, trained.params)[1])
        timings[name] = time.time() - start
        what = "no LLM update" if name == "nado_decoding" else f"{steps} LLM steps"
        print(f"{name}{_method_details(config, name)}: {what} in {timings[name]:.0f}s"
              + (" (sampling and labeling included)" if name in SAMPLING else "")
              + "".join(f", {k} {v:.4g}" for k, v in models[name].info.items()), flush=True)
        keys = [k for k in SUMMARY_KEYS if models[name].history and k in models[name].history[-1]]
        if set(keys) - {"lm_loss"}:  # (plain SFT: its loss is in the progress bar and metrics log)
            print(summarize(models[name].history, keys))
    return models, timings


def run_detox(config, workdir: str) -> dict:
    from regft_jax.train.methods import NEEDS_ORACLE, selected_methods, train_method

    names = selected_methods(config)
    mesh, corpus, cfg, base = _prepare(config)
    oracle, judges, report = _oracles(config, corpus, training=any(n in NEEDS_ORACLE for n in names))
    models, timings = _train_models(config, names, mesh, cfg, base, lambda name, lora_cfg, params: train_method(
        name, config, mesh, corpus, lora_cfg, params, oracle, workdir=workdir))
    _save_models(config, workdir, models, corpus, cfg)
    results, records = _evaluate(config, models, mesh, corpus, cfg, judges, timings, base)
    return _finish(results, records, report, workdir)


def run_classify(config, workdir: str) -> dict:
    """The paper's Jigsaw experiment (regft_jax/eval/classify.py): each variant of config.classify.variants
    fine-tuned to classify the toxic domain's labeled comments, then its ROC-AUC on the held-out ones and the
    detox stage's evaluation of its free generations."""
    from regft_jax.eval import classify, judge_label, results_table
    from regft_jax.train.methods import train_method

    names = classify.selected_variants(config)
    mesh, corpus, cfg, base = _prepare(config, check_corpus=lambda c: classify.check_corpus(config, c))
    oracle, judges, report = _oracles(config, corpus, training=any(classify.VARIANTS[n][0] == "ours" for n in names))
    fmt = classify.prompt_format(config, corpus)
    test = classify.held_out_examples(config, corpus)
    corpora = {}  # loss_on -> the corpus whose toxic domain trains on classification rows
    train_config = classify.training_config(config)

    def train(name, lora_cfg, params):
        method, loss_on = classify.VARIANTS[name]
        if loss_on not in corpora:
            corpora[loss_on] = classify.training_corpus(config, corpus, fmt, loss_on)
        return train_method(method, train_config, mesh, corpora[loss_on], lora_cfg, params, oracle,
                            workdir=workdir, desc=f"classify_{name}")

    models, timings = _train_models(config, names, mesh, cfg, base, train)
    _save_models(config, workdir, models, corpus, cfg)
    results, records = _evaluate(config, models, mesh, corpus, cfg, judges, timings, base, stop=fmt.template)
    start = time.time()
    for name, trained in models.items():
        results[name].update(classify.classification_metrics(cfg, trained, fmt, test, row_len=config.data.seq_len + 1,
                                                             batch_size=config.eval.batch_size, mesh=mesh))
    toxic = config.data.toxic_domain
    keys = ["auc", "auc_se"] + [f"toxicity_{o}_{toxic}" for o in judges] + [f"stopped_{toxic}"]
    keys += sorted({k for m in results.values() for k in m if k.startswith("ppl_")}) + ["train_seconds"] * bool(timings)
    print(f"classification ({time.time() - start:.0f}s; ROC-AUC on {len(test)} held-out labeled {toxic} comments "
          f"({results[names[0]]['test_positive']} positive), score = P({fmt.labels[1]!r}) normalized over "
          f"{fmt.labels[0]!r} and {fmt.labels[1]!r} after the template {fmt.template!r}; auc_se: DeLong "
          f"standard error; toxicity of free continuations of held-out {toxic} prompts per eval oracle, each cut "
          f"before the template if the model wrote it (then labeling its own text): `cut` is the fraction cut):")
    labels = {f"toxicity_{o}_{toxic}": judge_label(config, o) for o in judges}
    print(results_table(results, keys, {**labels, f"stopped_{toxic}": "cut"}))
    return _finish(results, records, report, workdir)


STAGES = {"base": run_base, "classify": run_classify, "detox": run_detox, "smoke": run_smoke}


def _quiet_checkpointing_logs() -> None:
    """Orbax logs every save at INFO through absl; keep its warnings, drop the chatter."""
    import logging as pylogging

    pylogging.getLogger("absl").addFilter(
        lambda r: r.levelno >= pylogging.WARNING or "/orbax/" not in r.pathname.replace("\\", "/"))


def main(argv) -> None:
    del argv
    _quiet_checkpointing_logs()
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=configs/<name>.py is required")
    from regft_jax import multihost

    multihost.initialize(config)  # --config.distributed (cluster auto-detection) or --config.coordinator=...
    _validate(config)
    # (the classify stage's default is a subdirectory: its results.json, generations and models never overwrite
    # a detox run's)
    workdir = os.path.abspath(_WORKDIR.value or (os.path.join(config.workdir, "classify") if config.stage == "classify"
                                                 else config.workdir))
    os.makedirs(workdir, exist_ok=True)
    logging.info("workdir: %s", workdir)
    results = STAGES[config.stage](config, workdir)
    import jax

    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    print(f"workdir: {workdir}")


def _removed_flags(argv) -> None:
    """A command-line override of a removed config key: one line naming what replaced it."""
    from regft_jax.errors import UserInputError
    from regft_jax.eval.judges import REMOVED_KEYS

    for arg in argv:
        for old, new in REMOVED_KEYS.items():
            if arg.split("=")[0] == f"--config.{old}":
                raise UserInputError(f"{arg.split('=')[0][2:]} was removed: use {new}")


def _parse_flags(argv):
    """absl's flag parsing, except that a UserInputError from a config file's get_config (e.g. a bad
    `--config=configs/llama.py:ARG`) is raised as itself (one line) instead of a usage traceback."""
    from absl import flags

    from regft_jax.errors import UserInputError

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        cause, user_error = e.__context__, None
        while cause is not None:  # the innermost one: config_flags re-raises it with a traceback
            user_error = cause if isinstance(cause, UserInputError) else user_error
            cause = cause.__context__
        if user_error is None:
            return app.parse_flags_with_usage(argv)  # absl's own message and exit status
        raise user_error from None


def entry() -> None:
    from regft_jax.errors import UserInputError
    from regft_jax.hostmem import reuse_freed_host_memory
    from regft_jax.preemption import EXIT_CODE, Preempted

    reuse_freed_host_memory()  # before JAX starts its threads (CPU only)

    try:
        _removed_flags(sys.argv[1:])
        app.run(main, flags_parser=_parse_flags)
    except UserInputError as e:  # a bad config value: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:  # SIGTERM/SIGINT during training: checkpointed, resumable
        print(f"{e} (exit status {EXIT_CODE})", file=sys.stderr, flush=True)
        sys.exit(EXIT_CODE)


if __name__ == "__main__":
    entry()
