"""The entry point: a short smoke run end to end, and one-line errors for bad config values."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, timeout=300):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "regft_jax.main", "--config=configs/tiny.py", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_smoke_stage_trains_and_writes_results(tmp_path):
    out = _main("--config.stage=smoke", "--config.train.steps=12", "--config.train.batch_size=4",
                "--config.train.seq_len=16", "--config.model.arch.num_layers=2", f"--workdir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["last_loss"] < results["first_loss"] - 0.5  # it learns the repeated patterns
    assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1} on 4 cpu" in out.stdout
    assert json.loads((tmp_path / "config.json").read_text())["stage"] == "smoke"


@pytest.mark.parametrize("stage, override, needle", [
    ("smoke", "--config.train.steps=0", "train.steps"),
    ("smoke", "--config.mesh.tensor=3", "mesh"),
    ("smoke", "--config.model.arch.family=gpt2", "gpt2"),
    ("detox", "--config.method.p_ref=latest", "config.method.p_ref='latest': expected one of"),
    ("detox", "--config.method.schedule=async", "config.method.schedule"),
    ("base", "--config.eval.oracle=regex", "config.eval.oracle was removed: use config.method.oracle"),
    ("base", "--config.eval.oracles=profanity,nope", "config.eval.oracles='profanity,nope': unknown oracle(s)"),
    ("detox", "--config.method.oracle=nope", "config.method.oracle='nope'"),
    ("detox", "--config.methods=base,sft,best", "config.methods='base,sft,best': expected 'all' or a comma-separated"),
    ("detox", "--config.filtering.threshold=1.5", "config.filtering.threshold=1.5: expected in [0, 1)"),
])
def test_bad_config_value_is_one_clear_line(tmp_path, stage, override, needle):
    out = _main(f"--config.stage={stage}", override, f"--workdir={tmp_path}", timeout=120)
    assert out.returncode == 2
    err_lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(err_lines) == 1 and needle in err_lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
