"""Classification while staying clean (the paper's Jigsaw experiment, DESIGN.md section 4): the `classify` stage.

The LLM is fine-tuned to classify the toxic domain's labeled training comments, prompted (`data.classification`:
"<comment><template><label word>"), with the method's mixture, optimizer and number of LLM steps; the toxic
domain's rows are the classification rows. Variants (`config.classify.variants`):

  base       the untouched base model (zero-shot prompted classification)
  sft        LM loss on every token of the classification rows (the paper's "SFT (LLM loss)")
  ours       the same plus the method's regularizer (`config.method`: adaptive, Ω_tox from the auxiliary model
             trained on continuations of the comments, Ω_keep on the general domain)
  sft_label  loss on the label word only: a classification objective through the LM head (the paper's
             "SFT (classification)")

Each is scored by ROC-AUC on the toxic domain's held-out labeled comments (the validation split, never
trained on), with score = P(positive word) / (P(positive word) + P(negative word)) after the prompt, and
evaluated like the detox stage's models (toxicity of free continuations of held-out prompts under every eval
oracle, perplexity per domain).
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np

from regft_jax.config_utils import require
from regft_jax.data.classification import PromptFormat
from regft_jax.data.pipeline import Corpus
from regft_jax.errors import UserInputError

# variant -> (the detox method that trains it (None: no training), the tokens its LM loss counts)
VARIANTS = {"base": (None, None), "sft": ("sft", "all"), "ours": ("ours", "all"), "sft_label": ("sft", "label")}


def selected_variants(config) -> list[str]:
    names = [n.strip() for n in str(config.classify.variants).split(",") if n.strip()]
    require(config, "classify.variants", bool(names) and all(n in VARIANTS for n in names)
            and len(set(names)) == len(names), f"a comma-separated list of distinct names among {', '.join(VARIANTS)}")
    return names


def check_classify_config(config) -> list[str]:
    """config.classify's values (one line naming a bad one); returns the detox methods its variants train with."""
    names = selected_variants(config)
    c = config.classify
    require(config, "classify.max_test", isinstance(c.max_test, int) and c.max_test >= 0, "an integer >= 0 (0 = all)")
    require(config, "classify.labels", len(tuple(c.labels)) == 2 and len(set(c.labels)) == 2,
            "two different label words (negative, positive), e.g. (' no', ' yes')")
    if "ours" in names:  # Ω_tox belongs on the comment text: on corpus rows it would also act on template and label
        require(config, "method.reg_prefixes", config.method.reg_prefixes == "samples",
                "'samples' in the classify stage (Ω_tox at the prefixes of sampled continuations of comments; "
                "on classification rows it would also pull the label word toward p_ref · R)")
    return sorted({VARIANTS[n][0] for n in names} - {None})


def prompt_format(config, corpus: Corpus) -> PromptFormat:
    return PromptFormat(corpus.tokenizer, config.classify.template, tuple(config.classify.labels))


def training_config(config):
    """`config` for the variants' training: the method's samples end before the template (`method.sample_stop`;
    "" = the template, another string replaces it): after it the model labels its own continuation, which is not
    comment text (not labeled by the oracle, not regularized)."""
    out = copy.deepcopy(config)
    out.method.sample_stop = config.method.get("sample_stop") or config.classify.template
    return out


def labeled(examples, key: str) -> list:
    """The labeled examples; both classes must be present (`key` names where they come from)."""
    out = [e for e in examples if e.label is not None]
    positives = sum(e.label >= 0.5 for e in out)
    if not positives or positives == len(out):
        raise UserInputError(f"classification: {key} has {len(out)} labeled examples, {positives} positive: both "
                             "classes are needed (config.data.toxic_domain names the labeled domain)")
    return out


def training_corpus(config, corpus: Corpus, fmt: PromptFormat, loss_on: str) -> Corpus:
    """`corpus` whose toxic domain trains on classification rows (its labeled training examples), the other
    domains unchanged; its examples and prompts stay the comments (the method samples continuations of them)."""
    toxic = config.data.toxic_domain
    examples = labeled(corpus.train[toxic], f"the {toxic!r} domain's training split")
    rows = fmt.rows(examples, config.data.seq_len + 1, loss_on)
    return corpus.with_rows("train", config.data.seq_len, {toxic: rows})


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(len(x))
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return ranks


def _split(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels, np.float64) >= 0.5, np.asarray(scores, np.float64)
    if labels.all() or not labels.any():
        raise ValueError(f"roc_auc needs both classes ({int(labels.sum())} positive, {int((~labels).sum())} negative)")
    return labels, scores


def roc_auc(labels: Sequence[float], scores: Sequence[float]) -> float:
    """Area under the ROC curve = P(score of a random positive > that of a random negative), ties counted 1/2
    (the Mann-Whitney U statistic over n+ n− pairs, from mid-ranks). labels: 1/True = positive."""
    labels, scores = _split(labels, scores)
    pos, neg = int(labels.sum()), int((~labels).sum())
    return float((_midranks(scores)[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def auc_standard_error(labels: Sequence[float], scores: Sequence[float]) -> float:
    """DeLong's (1988) standard error of the ROC-AUC: from each positive's fraction of negatives scored below it
    (V10) and each negative's fraction of positives scored above it (V01), √(var V10 / n+ + var V01 / n−)."""
    labels, scores = _split(labels, scores)
    pos, neg = scores[labels], scores[~labels]
    ranks = _midranks(scores)
    v10 = (ranks[labels] - _midranks(pos)) / len(neg)
    v01 = 1.0 - (ranks[~labels] - _midranks(neg)) / len(pos)
    var = (v10.var(ddof=1) if len(pos) > 1 else 0.0) / len(pos) + (v01.var(ddof=1) if len(neg) > 1 else 0.0) / len(neg)
    return float(np.sqrt(var))


def label_scores(cfg, params, fmt: PromptFormat, texts: Sequence[str], *, row_len: int, batch_size: int = 32,
                 mesh=None, guidance=None, guidance_params=None) -> np.ndarray:
    """P(positive | prompt) normalized over the two label words, σ(log p(pos words) − log p(neg words)), per text
    (under q = p · R with a guidance); the prompts are those of training rows of `row_len` tokens
    (`fmt.prompt_ids(texts, fmt.prompt_room(row_len))`)."""
    from regft_jax.eval.perplexity import loglikelihoods

    neg, pos = fmt.label_ids
    prompts = fmt.prompt_ids(texts, fmt.prompt_room(row_len))
    pairs = [(p, y) for p in prompts for y in (pos, neg)]
    logl, _ = loglikelihoods(cfg, params, pairs, guidance=guidance, guidance_params=guidance_params,
                             batch_size=batch_size, mesh=mesh, pad_id=fmt.tokenizer.pad_id or 0)
    margin = logl[0::2] - logl[1::2]
    return 1.0 / (1.0 + np.exp(-margin))


def classification_metrics(cfg, trained, fmt: PromptFormat, examples, *, row_len: int, batch_size: int = 32,
                           mesh=None) -> dict:
    """{"auc", "auc_se" (DeLong), "test_n", "test_positive"} of a `Trained` model on labeled examples."""
    scores = label_scores(cfg, trained.params, fmt, [e.text for e in examples], row_len=row_len,
                          batch_size=batch_size, mesh=mesh, guidance=trained.guidance,
                          guidance_params=trained.guidance_params)
    labels = np.array([e.label >= 0.5 for e in examples])
    return {"auc": roc_auc(labels, scores), "auc_se": auc_standard_error(labels, scores),
            "test_n": len(examples), "test_positive": int(labels.sum())}


def held_out_examples(config, corpus: Corpus) -> list:
    """The toxic domain's held-out labeled comments (the validation split): all, or `classify.max_test` of them
    drawn by seed."""
    toxic, limit = config.data.toxic_domain, config.classify.max_test
    out = [e for e in corpus.valid[toxic] if e.label is not None]
    if limit and limit < len(out):
        out = [out[i] for i in sorted(np.random.default_rng(config.seed).choice(len(out), limit, replace=False))]
    return labeled(out, f"the {toxic!r} domain's validation split (config.data.valid_fraction"
                   f"{', classify.max_test' if limit else ''})")


def check_corpus(config, corpus: Corpus) -> None:
    """The stage's data problems before any model work: the prompt format, both classes in training and held out."""
    prompt_format(config, corpus)
    toxic = config.data.toxic_domain
    labeled(corpus.train[toxic], f"the {toxic!r} domain's training split")
    held_out_examples(config, corpus)
