"""Generation quality: pairwise win rate (both orders), fluency under a judge LM, distinct-n.

    judge = LikelihoodJudge(cfg, params, tokenizer)        # offline: prefers the more likely continuation
    judge = PromptedJudge(cfg, params, tokenizer)          # an instruction LM asked "which is better?"
    rate = win_rate(judge, prompts, ours, sft)             # fraction of prompts where `ours` wins (ties: 1/2)
    table = win_rate_matrix(judge, prompts, {"ours": ..., "sft": ..., "base": ...})
    ppl = fluency(cfg, params, tokenizer, prompts, ours)   # perplexity of the continuations under the judge
    d1, d2, d3 = (distinct_n(ours, n) for n in (1, 2, 3))

A judge maps (prompts, first continuations, second continuations) to P(first is better) per prompt.
Every comparison is asked in both orders and averaged, win(a, b) = (J(a, b) + 1 − J(b, a)) / 2, so a
judge that always prefers the first position scores every pair 1/2: position bias cancels.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from regft_jax.errors import UserInputError

Judge = Callable[[Sequence[str], Sequence[str], Sequence[str]], np.ndarray]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all texts (whitespace words) / all n-grams (0 if there are none)."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _check(prompts, *columns) -> None:
    for c in columns:
        if len(c) != len(prompts):
            raise UserInputError(f"win rate: {len(prompts)} prompts but {len(c)} continuations")


def win_rate(judge: Judge, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> float:
    """The fraction of prompts on which continuation `a` beats `b` (ties 1/2), asked in both orders."""
    _check(prompts, a, b)
    if not len(prompts):
        return float("nan")
    first = np.asarray(judge(prompts, a, b), np.float64)
    second = np.asarray(judge(prompts, b, a), np.float64)
    return float(np.mean((first + 1.0 - second) / 2.0))


def win_rate_matrix(judge: Judge, prompts: Sequence[str], continuations: Mapping[str, Sequence[str]]) -> dict:
    """{row: {column: win rate of row over column}} for every ordered pair of methods (diagonal 0.5);
    each unordered pair is judged once per order and the matrix is antisymmetric: m[a][b] = 1 − m[b][a]."""
    names = list(continuations)
    out = {a: {a: 0.5} for a in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            out[a][b] = win_rate(judge, prompts, continuations[a], continuations[b])
            out[b][a] = 1.0 - out[a][b]
    return out


def format_win_rates(matrix: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown: row method's win rate over the column method."""
    names = list(matrix)
    lines = ["| win rate of row over column | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += [f"| {a} | " + " | ".join(f"{100 * matrix[a][b]:.0f}%" for b in names) + " |" for a in names]
    return "\n".join(lines)


def _pairs(tokenizer, contexts: Sequence[str], continuations: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(context ids with BOS, continuation ids) per text; an empty continuation is one EOS token."""
    ctx = tokenizer.encode_batch(list(contexts), add_bos=tokenizer.bos_id is not None)
    cont = tokenizer.encode_batch(list(continuations))
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.pad_id
    return [(c, y if y else [eos]) for c, y in zip(ctx, cont)]


def continuation_logprobs(cfg, params, tokenizer, prompts: Sequence[str], continuations: Sequence[str], *,
                          batch_size: int = 32, mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """(log p(continuation | prompt) summed over its tokens, token counts) under the model, per text."""
    from regft_jax.eval.perplexity import loglikelihoods

    pairs = _pairs(tokenizer, prompts, continuations)
    logl, _ = loglikelihoods(cfg, params, pairs, batch_size=batch_size, mesh=mesh, pad_id=tokenizer.pad_id or 0)
    return logl, np.array([len(y) for _, y in pairs], np.float64)


def fluency(cfg, params, tokenizer, prompts: Sequence[str], continuations: Sequence[str], **kw) -> float:
    """Perplexity of the continuations given their prompts under a (judge) LM: exp(−Σ log p / Σ tokens)."""
    return _perplexity(*continuation_logprobs(cfg, params, tokenizer, prompts, continuations, **kw))


def _perplexity(logl: np.ndarray, counts: np.ndarray) -> float:
    return float(np.exp(-logl.sum() / max(counts.sum(), 1.0)))


class LikelihoodJudge:
    """Prefers the continuation with the higher mean per-token log-likelihood under a separately trained
    LM (offline; no instruction following needed). P(first better) is 1, 0.5 (equal) or 0."""

    def __init__(self, cfg, params, tokenizer, *, batch_size: int = 32, mesh=None):
        self.cfg, self.params, self.tokenizer, self.kw = cfg, params, tokenizer, dict(batch_size=batch_size, mesh=mesh)
        # (log-likelihood, token count) of every (prompt, text), scored once across comparisons and fluency
        self._scores: dict[tuple[str, str], tuple[float, float]] = {}

    def logprobs(self, prompts, texts) -> tuple[np.ndarray, np.ndarray]:
        """`continuation_logprobs` of the texts under the judge's LM, each (prompt, text) scored only once."""
        new = list(dict.fromkeys((p, t) for p, t in zip(prompts, texts) if (p, t) not in self._scores))
        if new:
            logl, counts = continuation_logprobs(self.cfg, self.params, self.tokenizer, [p for p, _ in new],
                                                 [t for _, t in new], **self.kw)
            self._scores.update(zip(new, zip(logl.tolist(), counts.tolist())))
        scores = np.array([self._scores[(p, t)] for p, t in zip(prompts, texts)], np.float64).reshape(-1, 2)
        return scores[:, 0], scores[:, 1]

    def __call__(self, prompts, first, second) -> np.ndarray:
        a, b = (np.divide(*self.logprobs(prompts, texts)) for texts in (first, second))
        return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


class PromptedJudge:
    """An instruction LM (e.g. an HF directory loaded with `models.load_hf`) asked which continuation of a
    prompt is better; P(first better) = softmax over log p(" A"), log p(" B") as the answer."""

    TEMPLATE = ("Here is the beginning of a text and two possible continuations.\n\nBeginning: {prompt}\n\n"
                "Continuation A: {first}\n\nContinuation B: {second}\n\nWhich continuation is more fluent, "
                "coherent and relevant? Answer A or B.\nAnswer:")

    def __init__(self, cfg, params, tokenizer, *, batch_size: int = 16, mesh=None):
        self.cfg, self.params, self.tokenizer, self.kw = cfg, params, tokenizer, dict(batch_size=batch_size, mesh=mesh)

    def __call__(self, prompts, first, second) -> np.ndarray:
        questions = [self.TEMPLATE.format(prompt=p, first=a, second=b) for p, a, b in zip(prompts, first, second)]
        la, _ = continuation_logprobs(self.cfg, self.params, self.tokenizer, questions, [" A"] * len(questions), **self.kw)
        lb, _ = continuation_logprobs(self.cfg, self.params, self.tokenizer, questions, [" B"] * len(questions), **self.kw)
        return 1.0 / (1.0 + np.exp(lb - la))


@dataclasses.dataclass(frozen=True)
class JudgeLM:
    """A generation-quality judge and the LM behind it (fluency is perplexity under that LM)."""

    judge: Judge
    cfg: Any
    params: Any
    tokenizer: Any
    description: str


def judge_from_config(config, mesh, corpus, cfg, base_params) -> "JudgeLM | None":
    """The generation-quality judge of `config.eval.judge` (a `JudgeLM`), or None for "none".

    "pretrain" (default): a separately pretrained general-domain LM, wider than the base model (hidden,
    MLP and heads x `eval.judge_width`, default 1.5), other seed, same corpus and tokenizer, trained like
    the base model for `eval.judge_steps` steps (0: half of `config.base.steps`) on the general domain(s)
    only; cached like the base model. A likelihood judge (offline). "base": the base model (the
    paper's fluency reference; not independent of the methods' starting point). A directory: an HF
    causal LM (and its tokenizer) asked which continuation is better (`PromptedJudge`).
    """
    import copy
    import os

    spec = config.eval.get("judge", "pretrain") or "none"
    if spec == "none":
        return None
    if spec == "base":
        return JudgeLM(LikelihoodJudge(cfg, base_params, corpus.tokenizer), cfg, base_params, corpus.tokenizer,
                       "the base model")
    if spec == "pretrain":
        from regft_jax.train.base_model import base_model

        jc = copy.deepcopy(config)
        arch, factor = jc.model.arch, float(config.eval.get("judge_width", 1.5))
        group = arch.num_heads // arch.num_kv_heads
        arch.num_heads = max(group, int(round(arch.num_heads * factor / group)) * group)
        arch.num_kv_heads = arch.num_heads // group
        arch.hidden_size = int(round(arch.hidden_size * factor))
        arch.mlp_dim = int(round(arch.mlp_dim * factor))
        general = [d for d in corpus.domains if d != config.data.toxic_domain]
        jc.base.proportions = {d: 1.0 / len(general) for d in general}
        jc.base.steps = int(config.eval.get("judge_steps", 0)) or max(1, config.base.steps // 2)
        jc.seed = config.seed + 1
        print(f"generation-quality judge: a general-domain LM of width {arch.hidden_size} ({', '.join(general)}), "
              f"trained like the base model (next line)", flush=True)
        jcfg, jparams, _ = base_model(jc, mesh, corpus)
        return JudgeLM(LikelihoodJudge(jcfg, jparams, corpus.tokenizer), jcfg, jparams, corpus.tokenizer,
                       f"a general-domain LM of width {jcfg.hidden_size} ({jcfg.num_params() / 1e6:.1f}M params)")
    if os.path.isdir(spec):
        from regft_jax.data.tokenizer import load_tokenizer
        from regft_jax.models import load_hf

        jcfg, jparams = load_hf(spec, mesh=mesh)
        tok = load_tokenizer(spec)
        return JudgeLM(PromptedJudge(jcfg, jparams, tok), jcfg, jparams, tok, f"the LM in {spec} (prompted)")
    raise UserInputError(f"config.eval.judge={spec!r}: expected 'pretrain', 'base', 'none' or an HF model directory")


def quality_report(lm: JudgeLM, records: Sequence[dict], domain: str) -> dict:
    """Per model (records of `domain` prompts, without a protocol): distinct-1/2/3 and fluency (perplexity
    under the judge LM) of its continuations, and the win-rate matrix of all models on the prompts
    every model continued."""
    by_model: dict[str, dict[str, str]] = {}
    for r in records:
        if r.get("domain") == domain and "protocol" not in r:
            by_model.setdefault(r["model"], {})[r["prompt"]] = r["continuation"]
    if not by_model:
        return {}
    shared = sorted(set.intersection(*(set(v) for v in by_model.values())))
    out = {"models": {}}
    # a likelihood judge's LM is the fluency LM: its memoized scores serve both (each text is scored once)
    score = (lm.judge.logprobs if isinstance(lm.judge, LikelihoodJudge) and lm.judge.params is lm.params else
             lambda prompts, texts: continuation_logprobs(lm.cfg, lm.params, lm.tokenizer, prompts, texts))
    for name, conts in by_model.items():
        texts = list(conts.values())
        out["models"][name] = {f"distinct_{n}": distinct_n(texts, n) for n in (1, 2, 3)}
        out["models"][name]["fluency"] = _perplexity(*score(list(conts), texts))
    out["win_rates"] = win_rate_matrix(lm.judge, shared, {m: [c[p] for p in shared] for m, c in by_model.items()})
    out["prompts"] = len(shared)
    return out
