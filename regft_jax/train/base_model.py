"""The base model to detoxify: a loaded checkpoint, or (`model.source="random"`) a small model
pretrained here on the corpus mixture, cached by a hash of everything that determines it. A pretraining
stopped by SIGTERM/SIGINT is checkpointed beside the cache (`<hash>.partial/`) and continued by the next
run (no periodic checkpoints: the tiny model pretrains in minutes).

    cfg, params, info = base_model(config, mesh, corpus)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from regft_jax import checkpoint, multihost
from regft_jax.data.batching import MixtureBatcher
from regft_jax.data.offline import default_cache_dir
from regft_jax.data.pipeline import Corpus
from regft_jax.data.tokenizer import check_vocab
from regft_jax.errors import UserInputError
from regft_jax.precision import check_update_precision
from regft_jax.models.factory import model_from_config, runtime_overrides
from regft_jax.sharding import abstract_on
from regft_jax.train.loop import corpus_keys, global_batches, run_steps, summarize
from regft_jax.train.steps import init_train_state, jit_sharded, make_optimizer, sft_step, train_state_shardings
from regft_jax.train.throughput import Throughput

CACHE_VERSION = 3  # 3: the corpus split of data.mixture.SPLIT_VERSION 2


def train_lm(cfg, params, mesh, batcher: MixtureBatcher, optim, *, steps: int, desc: str,
             ckpt: Optional[checkpoint.RunCheckpointer] = None, every: int = 0, document_attention: bool = True,
             meter: Optional[Throughput] = None, log=None):
    """Plain LM training (SFT) of `params` for `steps` steps on `batcher`'s mixture.
    Returns (params, history). `params` is not modified (the state holds a copy).

    With `ckpt`: the state is checkpointed every `every` steps and at the end, and training
    continues from the latest checkpoint there (batches are a function of the step, so a resumed
    run ends with the same parameters as an uninterrupted one). document_attention: packed rows'
    attention and RoPE stay within each document (else one causal stream per row). meter, log:
    throughput lines and per-step metrics (`run_steps`); log also receives a resumed run's history.
    SIGTERM/SIGINT: checkpointed (with `ckpt`) at the next step boundary, then `preemption.Preempted`."""
    optimizer = make_optimizer(optim.learning_rate, weight_decay=optim.weight_decay, grad_clip=optim.grad_clip,
                               warmup_steps=optim.warmup_steps, total_steps=steps, only_lora=cfg.lora_rank > 0)
    state_sh = train_state_shardings(mesh, cfg, optimizer)
    init = jax.jit(functools.partial(init_train_state, optimizer=optimizer), out_shardings=state_sh)
    batches = global_batches(batcher, mesh, keys=corpus_keys(document_attention))
    step = jit_sharded(functools.partial(sft_step, cfg, optimizer, accum_steps=optim.get("accum_steps", 1)), mesh,
                       state_sh, batches(0))
    start, done, save = 0, [], None
    latest = ckpt.latest_step() if ckpt is not None else None
    if latest is not None:
        meta = ckpt.restore_meta(latest)
        state = ckpt.restore_state(latest, abstract_on(jax.eval_shape(init, params), state_sh))
        start, done = meta["step"], meta["history"]
        print(f"{desc}: resumed from {ckpt.directory} at step {start}/{steps}", flush=True)
    else:
        state = init(params)
    for i, h in enumerate(done if log is not None else ()):
        log(i + 1, h)
    if ckpt is not None:
        save = lambda i, state, history: ckpt.save(i, state, {"step": i, "history": done + history})
    state, history = run_steps(step, state, batches, steps=steps, desc=desc, start=start, save=save,
                               save_every=every, meter=meter, log=log)
    return state.params, done + history


def _cache_key(config, vocab_size: int) -> str:
    parts = {"v": CACHE_VERSION, "arch": config.model.arch.to_dict(), "base": config.base.to_dict(),
             "numerics": {k: config.model[k] for k in ("param_dtype", "dtype")},
             "seed": config.seed, "vocab": vocab_size,
             "data": {k: config.data[k] for k in ("source", "vocab_size", "valid_fraction", "num_prompts",
                                                  "seq_len", "tokenizer", "document_attention")}}
    # what the corpus is read from, for the sources that name it (the offline corpus is fixed)
    if config.data.source == "files":
        parts["data"]["files"] = config.data.files
    elif config.data.source == "hub":
        parts["data"]["hub"] = config.data.hub.to_dict()
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def base_model(config, mesh, corpus: Corpus):
    """Returns (model config, params on `mesh`, info dict)."""
    if config.model.source != "random":
        cfg, params = model_from_config(config.model, mesh, seed=config.seed)
        check_vocab(corpus.tokenizer.vocab_size, cfg.vocab_size, model_key=f"config.model.path={config.model.path!r}")
        return cfg, params, {"source": config.model.source, "path": config.model.path}
    vocab = corpus.tokenizer.vocab_size
    config.model.arch.vocab_size = vocab  # the architecture follows the tokenizer
    cache = Path(config.data.cache_dir or default_cache_dir()) / "base_models" / _cache_key(config, vocab)
    info_file = cache / "info.json"
    found = multihost.gather_shares(np.array([info_file.is_file()]), jax.process_count())
    if found.any() and not found.all():
        raise UserInputError(f"base-model cache {cache} exists on some hosts only: set config.data.cache_dir to "
                             "a directory every host shares (or to a path that no host has yet)")
    if found.all():
        cfg, params = checkpoint.load_model(str(cache / "model"), mesh=mesh, **runtime_overrides(config.model))
        info = json.loads(info_file.read_text())
        print(f"base model: cached at {cache} (pretrained {info['steps']} steps in {info['seconds']:.0f}s)")
        return cfg, params, {**info, "cached": True}
    cfg, params = model_from_config(config.model, mesh, seed=config.seed)
    check_update_precision(config, params, ("base.learning_rate",))
    print(f"base model: pretraining {cfg.family} ({cfg.num_layers} layers, width {cfg.hidden_size}, "
          f"{cfg.num_params() / 1e6:.2f}M params) for {config.base.steps} steps on "
          f"{dict(config.base.proportions)} ...", flush=True)
    start = time.time()
    batcher = MixtureBatcher(corpus.packed("train", config.data.seq_len), dict(config.base.proportions),
                             config.base.batch_size, seed=config.seed)
    # checkpointed only on preemption (SIGTERM/SIGINT) and at the end, beside the cache; deleted once cached
    partial = checkpoint.RunCheckpointer(str(cache.with_name(cache.name + ".partial")), fingerprint=cache.name)
    meter = Throughput.from_config(config, "pretrain", cfg, mesh, batch_size=config.base.batch_size,
                                   seq_len=config.data.seq_len, total_steps=config.base.steps)
    try:
        params, history = train_lm(cfg, params, mesh, batcher, config.base, steps=config.base.steps, desc="pretrain",
                                   ckpt=partial, document_attention=config.data.document_attention, meter=meter)
    finally:
        partial.close()
    seconds = time.time() - start
    print(summarize(history, ["loss", "grad_norm"]))
    info = {"steps": config.base.steps, "seconds": seconds, "final_loss": history[-1]["loss"],
            "tokens_per_s": history[-1].get("run_tokens_per_s"), "config": dataclasses.asdict(cfg)}
    # every process writes its shards to the same directory (named by process 0's pid), process 0 renames it
    pid = int(multihost.gather_shares(np.array([os.getpid()]), jax.process_count())[0])
    tmp = cache.with_name(cache.name + f".tmp{pid}")
    if multihost.is_primary():
        shutil.rmtree(tmp, ignore_errors=True)  # (a leftover of a crashed run with the same pid)
    multihost.all_agree(True)  # a barrier: nobody saves into it before that
    checkpoint.save_model(str(tmp / "model"), cfg, params)
    if multihost.is_primary():
        (tmp / "info.json").write_text(json.dumps(info, indent=2, default=str))
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
        shutil.rmtree(partial.directory, ignore_errors=True)
    print(f"base model: {seconds:.0f}s, {info['tokens_per_s'] or float('nan'):,.0f} tokens/s; cached at {cache}")
    return cfg, params, {**info, "cached": False}
