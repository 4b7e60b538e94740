"""Method selection (`config.methods`) and the filtering baseline."""

import json
import os

import numpy as np
import pytest

from configs import tiny
from regft_jax.errors import UserInputError
from regft_jax.oracles import make_oracle
from regft_jax.train.baselines import flagged_examples, run_filtering, sft_baseline, without_flagged
from regft_jax.train.methods import METHODS, ours_config, selected_methods
from tests.test_schedules import CFG, _assert_bitwise, _config, setup  # noqa: F401 (fixture)


def test_filtering_drops_exactly_the_flagged_examples(setup):
    tmp, tok, corpus, mesh, base, oracle = setup  # oracle: regex on "idiot"
    flagged = flagged_examples(corpus, oracle, 0.5)
    for d in corpus.domains:
        np.testing.assert_array_equal(flagged[d], ["idiot" in e.text for e in corpus.train[d]])
    assert flagged["toxic"].any() and not flagged["toxic"].all() and not flagged["general"].any()
    kept = without_flagged(corpus, flagged)
    assert kept.train["toxic"] == [e for e in corpus.train["toxic"] if "idiot" not in e.text]
    assert kept.train["general"] == corpus.train["general"]
    assert kept.valid == corpus.valid and kept.prompts == corpus.prompts
    # the packed training rows are rebuilt from the kept examples only
    assert kept.packed("train", 32)["toxic"].num_rows < corpus.packed("train", 32)["toxic"].num_rows

    # a failure to score (NaN) is not a flag; a score at the threshold is not above it
    scores = {"a": 0.9, "b": float("nan"), "c": 0.5}
    odd = make_oracle("callable", fn=lambda texts: [scores.get(t[-1], 0.0) for t in texts])
    texts = {d: [e.text[-1] for e in corpus.train[d]] for d in corpus.domains}
    got = flagged_examples(corpus, odd, 0.5)
    for d in corpus.domains:
        np.testing.assert_array_equal(got[d], [t == "a" for t in texts[d]])


def test_filtering_baseline_trains_on_the_kept_examples_and_resumes(setup, tmp_path):
    tmp, tok, corpus, mesh, base, oracle = setup
    config = _config(tmp, tok)
    trained = run_filtering(config, mesh, corpus, CFG, base, oracle, workdir=str(tmp_path))
    expected = np.mean(["idiot" in e.text for e in corpus.train["toxic"]])
    assert trained.info == {"dropped_general": 0.0, "dropped_toxic": pytest.approx(expected)}
    assert len(trained.history) == 12 and os.path.isdir(tmp_path / "checkpoints" / "filtering")
    # the same SFT on the filtered corpus, and not SFT on the whole one
    flagged = flagged_examples(corpus, oracle, 0.5)
    direct, _ = sft_baseline(config, mesh, without_flagged(corpus, flagged), CFG, base, desc="direct")
    _assert_bitwise(trained.params, direct)
    unfiltered, _ = sft_baseline(config, mesh, corpus, CFG, base, desc="sft")
    assert not np.array_equal(np.asarray(trained.params["embed"]), np.asarray(unfiltered["embed"]))
    _assert_bitwise(run_filtering(config, mesh, corpus, CFG, base, oracle, workdir=str(tmp_path)).params, direct)
    config.filtering.threshold = 0.99  # another threshold: its checkpoint is not this run's
    with pytest.raises(UserInputError, match="different config"):
        run_filtering(config, mesh, corpus, CFG, base, oracle, workdir=str(tmp_path))
    everything = make_oracle("callable", fn=lambda texts: [1.0] * len(texts))
    with pytest.raises(UserInputError, match="config.filtering.threshold=0.99: .* flags every training example"):
        run_filtering(config, mesh, corpus, CFG, base, everything, workdir=str(tmp_path))


def test_method_selection():
    config = tiny.get_config()
    assert selected_methods(config) == ["base", "sft", "ours"]
    config.methods = " rl, ours_sequential ,nado_decoding"
    assert selected_methods(config) == ["rl", "ours_sequential", "nado_decoding"]
    config.methods = "all"
    assert selected_methods(config) == list(METHODS)
    for bad in ("base,sft,best", "sft,sft", "", "all,rl"):
        config.methods = bad
        with pytest.raises(UserInputError, match="config.methods="):
            selected_methods(config)
    assert {"base", "sft", "filtering", "rl", "dpo", "nado_decoding", "ours"} <= set(METHODS)
    variant = ours_config(config, "ours_noadaptive")
    assert variant.method.adaptive is False and config.method.adaptive is True
    assert ours_config(config, "ours_sequential").method.schedule == "sequential"


def test_report_aggregates_runs_into_mean_and_std(tmp_path, capsys):
    from regft_jax import report

    judges = {"eval_oracles": ["regex", "judge"], "domain": "toxic", "training_oracle": "regex",
              "regex": {"role": "training oracle"}, "judge": {"role": "independent"}}
    rates = {"sft": [(0.2, 0.1), (0.4, 0.3)], "ours": [(0.1, 0.05), (0.1, 0.15)]}
    dirs = []
    for seed in range(2):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        results = {m: {"toxicity_regex_toxic": r[seed][0], "toxicity_judge_toxic": r[seed][1],
                       "ppl_general": 100.0 + 10 * seed, "train_seconds": 5.0} for m, r in rates.items()}
        (d / "results.json").write_text(json.dumps({**results, "judges": judges}))
        dirs.append(str(d))
    assert report.main(dirs + ["--out", str(tmp_path / "out")]) == 0
    summary, keys, labels = report.aggregate(report.load_runs(dirs))
    assert keys == ["toxicity_regex_toxic", "toxicity_judge_toxic", "ppl_general", "train_seconds"]
    sft = summary["sft"]["toxicity_regex_toxic"]
    assert sft == {"mean": pytest.approx(0.3), "std": pytest.approx(np.std([0.2, 0.4], ddof=1)), "n": 2}
    assert summary["ours"]["ppl_general"]["mean"] == pytest.approx(105.0)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| ours | 10.0% ± 0.0 | 10.0% ± 7.1 | 105.0 ± 7.1 | 5.0 ± 0.0 |" in table
    assert "regex (training oracle) ↓" in table and "judge (independent) ↓" in table
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "results.json: not found" in capsys.readouterr().err


def test_report_adds_protocols_quality_win_rates_and_plots(tmp_path, capsys):
    from regft_jax import report

    judges = {"eval_oracles": ["regex", "judge"], "domain": "toxic", "training_oracle": "regex",
              "regex": {"role": "training oracle"}, "judge": {"role": "independent"}}
    dirs = []
    for seed, win in enumerate((0.7, 0.5)):  # sft's win rate over ours per run
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        results = {m: {"toxicity_regex_toxic": 0.2, "toxicity_judge_toxic": 0.1, "toxicity_judge_toxigen": 0.05 * (seed + 1),
                       "toxicity_judge_rtp": 0.3, "emt_judge_rtp": 0.41, "ppl_general": 100.0 + seed, "fluency": 50.0,
                       "distinct_2": 0.8, "train_seconds": 5.0,
                       "win_rates": {m: 0.5, ("ours" if m == "sft" else "sft"): (win if m == "sft" else 1 - win)}}
                   for m in ("sft", "ours")}
        (d / "results.json").write_text(json.dumps({**results, "judges": judges}))
        (d / "metrics_ours.jsonl").write_text("".join(json.dumps(
            {"step": i + 1, "llm/lm_loss": 5.0 - 0.1 * i, "aux/aux_loss": 0.4, "aux/mean_R": 0.8, "aux/mean_label": 0.85})
            + "\n" for i in range(5)))
        dirs.append(str(d))
    assert report.main(dirs + ["--out", str(tmp_path / "out")]) == 0
    _, keys, labels = report.aggregate(report.load_runs(dirs))
    assert keys == ["toxicity_regex_toxic", "toxicity_judge_toxic", "toxicity_judge_toxigen", "toxicity_judge_rtp",
                    "emt_judge_rtp", "ppl_general", "fluency", "distinct_2", "train_seconds"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "ToxiGen % flagged (judge) ↓" in table and "| sft | 20.0% ± 0.0 | 10.0% ± 0.0 | 7.5% ± 3.5 | 30.0% ± 0.0 | 0.410" in table
    wins = (tmp_path / "out" / "win_rates.md").read_text()
    assert "| sft | 50% | 60% |" in wins and "| ours | 40% | 50% |" in wins  # mean of 0.7 and 0.5
    for png in ("toxicity_vs_utility.png", "training_curves.png", "r_calibration.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
