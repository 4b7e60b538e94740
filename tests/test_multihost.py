"""Multi-process runs with 2 real processes on 127.0.0.1 (jax.distributed, gloo on CPU).

- the whole `detox` stage as 2 processes x 2 CPU devices equals 1 process x 4 devices (same mesh
  shape; tolerance: LLM losses and perplexities within 1e-4 relative, the importance-weighted aux
  loss within 1e-3; the same generations, scores and rates, except that a trained model may sample 1
  continuation differently: T = 1 sampling is discontinuous and the all-reduces round differently), and the
  checkpoints the 2-process run wrote restore in a 1-process run on a different mesh;
- the host-side pieces: generation, perplexity and oracle scoring on global arrays, with each
  process scoring only its share of the texts and every process getting every score.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from regft_jax import multihost
from tests.test_pipeline import REPO, _fixture, detox_argv


def _env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                PYTHONPATH=REPO)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(argv_of, timeout: int) -> list[subprocess.CompletedProcess]:
    """Run argv_of(process_id) for process ids 0 and 1 at once, 2 CPU devices each."""
    procs = [subprocess.Popen(argv_of(i), cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return outs


# ------------------------------------------------------------------- helpers without a cluster


def test_shares_cover_every_item_once():
    for n in range(0, 11):
        for count in (1, 2, 3, 4):
            covered = [i for p in range(count) for i in range(*multihost.share(n, p, count))]
            assert covered == list(range(n)), (n, count)


def test_single_process_helpers_are_plain_copies():
    import jax

    from regft_jax import sharding

    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    x = np.arange(24, dtype=np.int32).reshape(8, 3)
    g = multihost.to_global(x, sharding.batch_sharding(mesh, 2))
    assert g.sharding.spec == sharding.batch_sharding(mesh, 2).spec and len(g.addressable_shards) == 8
    np.testing.assert_array_equal(multihost.to_host({"a": g})["a"], x)
    np.testing.assert_array_equal(multihost.split_over_processes(lambda t: [len(s) for s in t], ["a", "bb"]), [1, 2])
    assert multihost.all_agree(True) and not multihost.all_agree(False) and jax.process_count() == 1


def test_explicit_coordinator_config_errors():
    import ml_collections

    from regft_jax.errors import UserInputError

    bad = ml_collections.ConfigDict({"coordinator": "127.0.0.1:1234", "num_processes": 2, "process_id": 2})
    with pytest.raises(UserInputError, match="config.process_id"):
        multihost.initialize(bad)
    bad = ml_collections.ConfigDict({"coordinator": "localhost", "num_processes": 2, "process_id": 0})
    with pytest.raises(UserInputError, match="HOST:PORT"):
        multihost.initialize(bad)


# ------------------------------------------------------------------------- 2 real processes

_PIECES = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from regft_jax import models, multihost, sampling, sharding
    from regft_jax.data.packing import pack_documents
    from regft_jax.data.records import Example
    from regft_jax.eval import perplexity, toxicity_eval
    import ml_collections
    multihost.initialize(ml_collections.ConfigDict(
        {"coordinator": sys.argv[1], "num_processes": 2, "process_id": int(sys.argv[2])}))
    assert jax.process_count() == 2 and len(jax.devices()) == 4
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
    cfg = models.ModelConfig(family="llama", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                             num_kv_heads=2, head_dim=8, mlp_dim=32, max_seq_len=64)
    shardings = sharding.param_shardings(mesh, models.param_logical_axes(cfg), models.abstract_params(cfg))
    params = jax.jit(lambda k: models.init_params(cfg, k), out_shardings=shardings)(jax.random.key(0))
    prompts = [[1, 5 + i, 7, 9][: 2 + i % 3] for i in range(6)]
    kw = dict(max_new_tokens=26, temperature=1.0, seed=3, mesh=mesh)
    assert len(sampling.decode_part_ends(26, 4)) == 2  # the decode loop in 2 parts, the cache grown once
    gen = sampling.generate(cfg, params, prompts, **kw)
    assert gen == sampling.generate(cfg, params, prompts, **kw, decode_parts=1)
    rows = pack_documents([list(range(2, 2 + n)) for n in (5, 9, 13, 7, 11)], 9, pad_id=0, bos_id=1, eos_id=2)
    ppl = perplexity(cfg, params, rows, batch_size=2, mesh=mesh)

    class Tok:
        bos_id, eos_id, pad_id = 1, 2, 0
        def encode_batch(self, texts, add_bos=True):
            return [[1] + [3 + ord(c) % 50 for c in t] for t in texts]
        def decode_batch(self, ids):
            return [" ".join(map(str, i)) for i in ids]

    seen = []
    class Counting:
        name = "counting"
        def score(self, texts):
            seen.extend(texts)
            return [len(t) % 7 / 7 for t in texts]

    examples = [Example(text=f"p{i}", domain="toxic", prompt=f"prompt {i}") for i in range(5)]
    out = toxicity_eval(cfg, params, Tok(), examples, {"counting": Counting()}, max_new_tokens=4, mesh=mesh)
    print("RESULT " + json.dumps({"gen": gen, "ppl": ppl, "seen": len(seen),
                                  "scores": [r["scores"]["counting"] for r in out["records"]],
                                  "conts": [r["continuation"] for r in out["records"]]}))
""")


def test_generation_perplexity_and_scoring_across_two_processes(tmp_path):
    script = tmp_path / "pieces.py"
    script.write_text(_PIECES)
    port = _port()
    outs = _two_processes(lambda i: [sys.executable, str(script), f"127.0.0.1:{port}", str(i)], timeout=300)
    for o in outs:
        assert o.returncode == 0, o.stderr[-3000:]
    results = [json.loads(next(l for l in o.stdout.splitlines() if l.startswith("RESULT "))[7:]) for o in outs]
    # every process gets the same whole results ...
    for key in ("gen", "ppl", "scores", "conts"):
        assert results[0][key] == results[1][key], key
    # ... having scored only its own share of the 5 continuations (3 + 2)
    assert sorted(r["seen"] for r in results) == [2, 3]
    expected = [round(len(c) % 7 / 7, 6) for c in results[0]["conts"]]
    assert results[0]["scores"] == pytest.approx(expected)
    assert len(results[0]["gen"]) == 6 and all(len(g) == 26 for g in results[0]["gen"])
    assert np.isfinite(results[0]["ppl"]) and results[0]["ppl"] > 1


def _read(workdir) -> tuple[dict, list, list]:
    results = json.loads((workdir / "results.json").read_text())
    generations = [json.loads(line) for line in (workdir / "generations.jsonl").read_text().splitlines()]
    history = [json.loads(line) for line in (workdir / "metrics_ours.jsonl").read_text().splitlines()]
    return results, generations, history


def _differing_generations(a: list, b: list) -> dict:
    """{model: {(domain, prompt, record index) whose continuation differs between the runs}}, after checking
    that both runs continued the same prompts in the same order and that equal continuations got equal
    scores (the index keeps apart several samples of one prompt)."""
    assert [(r["model"], r["domain"], r["prompt"]) for r in a] == [(r["model"], r["domain"], r["prompt"]) for r in b]
    differ: dict[str, set] = {r["model"]: set() for r in a}
    for i, (x, y) in enumerate(zip(a, b)):
        if x["continuation"] == y["continuation"]:
            assert x["scores"] == y["scores"], x
        else:
            differ[x["model"]].add((x["domain"], x["prompt"], i))
    return differ


def _assert_same_results(a: dict, b: dict, differ: dict, win_prompts: int, toxic: str = "toxic") -> None:
    """Equal results up to float rounding of the perplexities, and up to what the continuations in
    `differ` can move: a toxicity rate over n scored continuations by (differing ones)/n, a win rate over
    `win_prompts` shared prompts by (prompts where either model differs)/win_prompts, the count of scored
    continuations by the number that differ; the other metrics of the sampled text (distinct-n,
    fluency) are compared only for models whose continuations all agree."""
    assert a.keys() == b.keys()
    for model in ("base", "sft", "ours"):
        changed = differ[model]
        for key, value in a[model].items():
            # ("toxicity": {oracle: rate} repeats toxicity_<oracle>_<toxic>, which is checked)
            if key == "train_seconds" or (changed and (key in ("toxicity", "fluency") or key.startswith("distinct_"))):
                continue
            if key == "win_rates":  # (moved also by the other model's differing continuations)
                for other, rate in value.items():
                    moved = {p for d, p, _ in changed | differ[other] if d == toxic}
                    assert abs(b[model][key][other] - rate) <= len(moved) / win_prompts + 1e-9, (model, other)
            elif changed and key.startswith("scored_"):  # scored_<oracle>_<domain>
                moved = sum(d == key.rsplit("_", 1)[1] for d, _, _ in changed)
                assert abs(b[model][key] - value) <= moved, (model, key)
            elif not changed or not key.startswith("toxicity_"):
                if key.startswith("ppl_") or key == "fluency":  # (sums over sharded batches: float rounding)
                    assert b[model][key] == pytest.approx(value, rel=1e-4), (model, key)
                else:
                    assert b[model][key] == value, (model, key)
            else:  # toxicity_<oracle>_<domain>
                moved = sum(d == key.rsplit("_", 1)[1] for d, _, _ in changed)
                scored = a[model][key.replace("toxicity_", "scored_")]
                assert abs(b[model][key] - value) <= moved / scored + 1e-9, (model, key)


def _assert_same_evaluation(a: tuple[dict, list], b: tuple[dict, list]) -> None:
    """Two runs' (results, generations) agree. Sampling (T = 1) is discontinuous in the parameters and the
    runs' all-reduces sum in different orders, so a token whose uniform draw lies within rounding of a CDF
    boundary can flip: each model (the base too: each run pretrains it, and the resumed run samples on
    another mesh) may differ in 1 of its 15 continuations, and the metrics computed from them by what that
    one can move."""
    differ = _differing_generations(a[1], b[1])
    assert all(len(d) <= 1 for d in differ.values()), differ
    _assert_same_results(a[0], b[0], differ, win_prompts=len({r["prompt"] for r in a[1] if r["domain"] == "toxic"}))


def _synthetic_evaluation(n: int = 15) -> tuple[dict, list]:
    """(results, generations) shaped like the detox stage's: 3 models, n toxic prompts each."""
    generations = [{"model": m, "domain": "toxic", "prompt": f"p{i}", "continuation": f"{m} c{i}",
                    "scores": {"judge": 0.1 * (i % 3)}} for m in ("base", "sft", "ours") for i in range(n)]
    results = {m: {"ppl_toxic": 20.0, "toxicity_judge_toxic": 3 / n, "scored_judge_toxic": n,
                   "toxicity": {"judge": 3 / n}, "distinct_2": 0.9, "fluency": 1.5, "train_seconds": 1.0,
                   "win_rates": {o: 0.5 for o in ("base", "sft", "ours") if o != m}} for m in ("base", "sft", "ours")}
    return results, generations


def test_evaluation_comparison_allows_one_flipped_continuation_and_no_more():
    """The tolerance of `_assert_same_evaluation` itself: one differing continuation per model may move
    that model's rates by 1/n and the win rates by 1/n per differing model; anything beyond fails."""
    import copy
    a = _synthetic_evaluation()
    _assert_same_evaluation(a, copy.deepcopy(a))

    def variant(models=("ours",), toxicity=1, win=1, ppl=1.0, scored=0):
        b = copy.deepcopy(a)
        for m in models:
            i = 15 * ("base", "sft", "ours").index(m) + 4
            b[1][i] = {**b[1][i], "continuation": "flipped", "scores": {"judge": 0.9}}
            b[0][m]["toxicity_judge_toxic"] += toxicity / 15
            b[0][m]["scored_judge_toxic"] -= scored
            b[0][m]["win_rates"] = {o: r + win / 15 for o, r in b[0][m]["win_rates"].items()}
            b[0][m]["ppl_toxic"] *= ppl
        return b

    _assert_same_evaluation(a, variant())
    _assert_same_evaluation(a, variant(models=("base", "ours"), scored=1))
    for bad in (dict(toxicity=2), dict(win=2), dict(ppl=1.001), dict(scored=2)):
        with pytest.raises(AssertionError):
            _assert_same_evaluation(a, variant(**bad))
    flipped_twice = variant()
    flipped_twice[1][-1] = {**flipped_twice[1][-1], "continuation": "flipped too"}
    with pytest.raises(AssertionError):
        _assert_same_evaluation(a, flipped_twice)
    unchanged_text = copy.deepcopy(a)
    unchanged_text[0]["sft"]["toxicity_judge_toxic"] += 1 / 15  # a rate moved with no continuation changed
    with pytest.raises(AssertionError):
        _assert_same_evaluation(a, unchanged_text)


def test_detox_stage_two_processes_equals_one_process(tmp_path):
    tok = _fixture(tmp_path)
    # a training oracle that flags some of the tiny model's samples (mixed labels: R is learned)
    argv = lambda workdir, cache, **kw: detox_argv(
        tmp_path, tok, workdir, data__cache_dir=tmp_path / cache, method__checkpoint_every=3,
        method__oracle_args="{'words': ['river', 'moon', 'garden']}", **kw)
    port = _port()
    multi = tmp_path / "two_processes"
    outs = _two_processes(lambda i: argv(multi, "cache2", coordinator=f"127.0.0.1:{port}", num_processes=2,
                                         process_id=i), timeout=600)
    for o in outs:
        assert o.returncode == 0, o.stderr[-3000:]
    assert "pretraining" in outs[0].stdout and "ours (parallel" in outs[1].stdout

    single = tmp_path / "one_process"
    one = subprocess.run(argv(single, "cache1"), cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    (r2, g2, h2), (r1, g1, h1) = _read(multi), _read(single)
    _assert_same_evaluation((r1, g1), (r2, g2))
    assert len(h1) == len(h2) == 6
    for a, b in zip(h1, h2):
        for key in ("llm/loss", "llm/lm_loss", "aux/mean_R"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        # the aux loss weighs samples by exp(log p_ref(y) − log proposal(y)), sums over 6 tokens: the
        # rounding differences of the reductions grow to ~3e-4 there; the logs keep 6 decimals (abs 1e-6)
        assert b["aux/aux_loss"] == pytest.approx(a["aux/aux_loss"], rel=1e-3, abs=2e-6), "aux/aux_loss"
    assert any(0 < h["aux/mean_label"] < 1 for h in h1)  # mixed labels: the auxiliary model learns something

    # The 2-process run's checkpoints (SFT and ours, finished) restore in 1 process on another mesh.
    again = subprocess.run(argv(multi, "cache2", mesh__data=2, mesh__fsdp=1, mesh__tensor=2),
                           cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "pretraining" not in again.stdout
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 2}" in again.stdout
    _assert_same_evaluation((r2, g2), _read(multi)[:2])
