"""Preemption and resume, and throughput logging.

- SIGTERM sent to `python -m regft_jax.main` (detox stage, local fixtures) while the method trains:
  it checkpoints at the next step boundary and exits with status 75; a half-written later checkpoint
  is ignored; the same command again resumes, and its results.json equals an uninterrupted run's in
  every field but the wall times (`train_seconds`);
- SIGINT during the SFT loop: a checkpoint at the next boundary, then a resume bitwise equal to an
  uninterrupted run;
- 2 processes, the signal sent to one of them: both stop and checkpoint at the same step (and a
  checkpoint directory that only one process sees is refused);
- the model-FLOPs count by hand and against XLA's count of the compiled step; tokens/s and MFU logged
  every `log_every` steps.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny
from regft_jax import models, preemption
from regft_jax.checkpoint import RunCheckpointer
from regft_jax.data.batching import MixtureBatcher
from regft_jax.errors import UserInputError
from regft_jax.train import throughput
from regft_jax.train.base_model import train_lm
from regft_jax.train.steps import sft_loss
from regft_jax.train.throughput import Throughput
from tests.test_pipeline import REPO, _fixture, detox_argv
from tests.test_multihost import _port
from tests.test_schedules import CFG, setup  # noqa: F401 - the module fixture (corpus, mesh, base params)

OPTIM = ml_collections.ConfigDict({"learning_rate": 1e-3, "weight_decay": 0.0, "grad_clip": 1.0, "warmup_steps": 2})


def _batcher(corpus):
    return MixtureBatcher(corpus.packed("train", 32), {"general": 0.5, "toxic": 0.5}, 8, seed=7)


# ------------------------------------------------------------------------------------ throughput


def test_train_flops_per_token_by_hand_and_by_xla():
    cfg = models.ModelConfig(family="llama", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4,
                             num_kv_heads=2, head_dim=32, mlp_dim=512, max_seq_len=256, scan_layers=False)
    # N: per layer q,o (4 heads) + k,v (2 heads) of width 32, SwiGLU's 3 matrices; + the LM head (the
    # input embedding is a lookup); attention: 12 · layers · heads · head_dim · T
    n = 2 * (128 * 32 * (2 * 4 + 2 * 2) + 3 * 128 * 512) + 512 * 128
    assert throughput.matmul_params(cfg) == n == 557_056
    assert throughput.train_flops_per_token(cfg, 128) == 6 * n + 12 * 2 * 4 * 32 * 128 == 3_735_552
    assert throughput.matmul_params(cfg.replace(tie_embeddings=True)) == n  # the one table is the head
    # XLA's count of the compiled gradient (layers unrolled: XLA counts a scanned body once) is the
    # same plus the elementwise work (norms, softmax, SwiGLU, the loss)
    batch = {k: jax.ShapeDtypeStruct((2, 129), jnp.int32) for k in ("tokens", "loss_mask")}
    grad = jax.jit(jax.grad(lambda p, b: sft_loss(cfg, p, b)[0]))
    cost = grad.lower(models.abstract_params(cfg), batch).compile().cost_analysis()
    xla = (cost if isinstance(cost, dict) else cost[0])["flops"] / (2 * 128)
    assert 1.0 < xla / throughput.train_flops_per_token(cfg, 128) < 1.03


def test_peak_flops_from_the_device_kind_or_the_config(setup):
    mesh = setup[3]
    assert throughput.device_peak_tflops("TPU v4") == 275
    assert throughput.device_peak_tflops("TPU v5 lite") == 197
    assert throughput.device_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert throughput.device_peak_tflops("NVIDIA H100 PCIe") == 756
    assert throughput.device_peak_tflops("NVIDIA H200") == 989
    assert throughput.device_peak_tflops("cpu") is None
    config = tiny.get_config()
    assert throughput.peak_flops(config, mesh) is None  # CPU and no value given: no MFU
    config.hardware.peak_tflops = 0.5
    assert throughput.peak_flops(config, mesh) == 0.5e12 * 2  # per device × the mesh's 2 devices
    throughput.check_config(config)
    config.hardware.peak_tflops = -1.0
    with pytest.raises(UserInputError, match=r"^config.hardware.peak_tflops=-1.0: expected a peak TFLOP/s"):
        throughput.check_config(config)
    config.hardware.peak_tflops, config.log_every = 0.0, -5
    with pytest.raises(UserInputError, match=r"^config.log_every=-5: expected an integer >= 0"):
        throughput.check_config(config)


@pytest.fixture(scope="module")
def sft_reference(setup):
    """An uninterrupted 6-step SFT run, logging throughput every 2 steps (peak: 2 GFLOP/s):
    (params, history, per-step logged metrics, printed output)."""
    _, _, corpus, mesh, base, _ = setup
    meter = Throughput("sft", tokens_per_step=8 * 32, flops_per_token=throughput.train_flops_per_token(CFG, 32),
                       peak_flops=2e9, every=2, total_steps=6)
    logged, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        params, history = train_lm(CFG, base, mesh, _batcher(corpus), OPTIM, steps=6, desc="sft", meter=meter,
                                   log=lambda step, m: logged.setdefault(step, m))
    return params, history, logged, out.getvalue()


def test_training_loop_logs_tokens_per_s_and_mfu_every_n_steps(sft_reference):
    _, history, logged, printed = sft_reference
    flops = throughput.train_flops_per_token(CFG, 32)
    assert sorted(logged) == [1, 2, 3, 4, 5, 6] and history == [logged[s] for s in range(1, 7)]
    assert [s for s in logged if "mfu" in logged[s]] == [2, 4, 6]
    for s in (2, 4, 6):
        assert logged[s]["tokens_per_s"] > 0
        assert logged[s]["mfu"] == pytest.approx(logged[s]["tokens_per_s"] * flops / 2e9, rel=1e-12)
    lines = [line for line in printed.splitlines() if line.startswith("sft step")]
    assert [line.split(",")[0] for line in lines] == ["sft step 2/6", "sft step 4/6", "sft step 6/6"]
    assert lines[0].split(", ")[1] == f"loss {logged[2]['loss']:.4f}" and lines[0].endswith("%")
    assert " tokens/s, MFU " in lines[0]


# ------------------------------------------------------------------------------------ preemption


def _assert_bitwise(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sigint_during_sft_checkpoints_at_the_next_step_and_resumes_bitwise(setup, sft_reference, tmp_path):
    _, _, corpus, mesh, base, _ = setup
    ref, ref_history = sft_reference[:2]

    def interrupt(step, metrics):  # a real SIGINT to this process once step 3's metrics are in
        if step == 3:
            signal.raise_signal(signal.SIGINT)

    # log_every=1: the loop fetches every step's metrics at its boundary (when `interrupt` sees them)
    meter = Throughput("sft", tokens_per_step=256, flops_per_token=1.0, peak_flops=None, every=1, total_steps=6)
    ckpt = RunCheckpointer(str(tmp_path / "sft"), fingerprint="f")
    before = signal.getsignal(signal.SIGINT)  # (SIG_IGN, not Python's handler, in a shell's background job)
    with pytest.raises(preemption.Preempted, match=r"^preempted at step 4 of sft; run the same command again"):
        train_lm(CFG, base, mesh, _batcher(corpus), OPTIM, steps=6, desc="sft", ckpt=ckpt, meter=meter,
                 log=interrupt)
    ckpt.close()
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is back
    assert os.listdir(tmp_path / "sft") == ["4"]

    ckpt = RunCheckpointer(str(tmp_path / "sft"), fingerprint="f")
    params, history = train_lm(CFG, base, mesh, _batcher(corpus), OPTIM, steps=6, desc="sft", ckpt=ckpt)
    ckpt.close()
    _assert_bitwise(params, ref)
    assert [h["loss"] for h in history] == [h["loss"] for h in ref_history]


_TWO = textwrap.dedent("""
    import json, os, sys
    import jax, jax.numpy as jnp, ml_collections
    from regft_jax import multihost, preemption
    from regft_jax.train.loop import run_steps
    from regft_jax.checkpoint import RunCheckpointer
    from regft_jax.errors import UserInputError
    multihost.initialize(ml_collections.ConfigDict(
        {"coordinator": sys.argv[1], "num_processes": 2, "process_id": int(sys.argv[2])}))
    # a checkpoint directory that is not shared: process 0 sees step 3, process 1 nothing
    directory = f"{sys.argv[3]}/p{sys.argv[2]}"
    if sys.argv[2] == "0":
        os.makedirs(f"{directory}/3")
    try:
        RunCheckpointer(directory, fingerprint="f").latest_step()
    except UserInputError as e:
        print("MISMATCH " + str(e), flush=True)
    saved = []
    step = jax.jit(lambda s, b: (s + b, {"loss": s.astype(jnp.float32)}))
    try:
        run_steps(step, jnp.zeros((), jnp.int32), lambda i: jnp.int32(1), steps=600, desc="toy",
                  save=lambda i, s, h: saved.append([i, int(s)]), log=lambda i, m: print("STEP", i, flush=True))
    except preemption.Preempted as e:
        print("RESULT " + json.dumps({"step": e.step, "saved": saved}), flush=True)
        sys.exit(preemption.EXIT_CODE)
""")


def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(_TWO)
    port = _port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=REPO, REGFT_JAX_STEP_SLEEP="0.05")
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i), str(tmp_path)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=open(tmp_path / f"err{i}", "w"), text=True)
             for i in range(2)]
    seen = ""
    try:
        for line in procs[1].stdout:  # SIGINT to process 1 only, once it has run 16 steps
            seen += line
            if line.strip() == "STEP 16":
                procs[1].send_signal(signal.SIGINT)
                break
        outs = [p.communicate(timeout=120)[0] for p in procs]
        outs[1] = seen + outs[1]
    finally:
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == preemption.EXIT_CODE, (tmp_path / f"err{i}").read_text()[-3000:]
    results = [json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:]) for out in outs]
    assert results[0] == results[1]  # the same step on both, checkpointed there
    for i, out in enumerate(outs):  # both refuse checkpoints that only some processes see
        assert f"MISMATCH {tmp_path}/p{i}: the processes see different latest checkpoints [3, -1] (-1: none)" in out
    n = results[0]["step"]
    assert 16 < n < 600 and results[0]["saved"] == [[n, n]]


def _detox_args(tmp_path, tok, workdir, cache) -> list:
    return detox_argv(tmp_path, tok, workdir, data__cache_dir=cache, base__steps=10, method__llm_steps=4,
                      method__checkpoint_every=4, eval__oracles="regex", log_every=1, hardware__peak_tflops=1.0)


def _jsonl(path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sigterm_during_the_method_then_the_same_command_resumes_to_the_same_results(tmp_path):
    tok = _fixture(tmp_path)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONUNBUFFERED="1")
    full, cut = tmp_path / "full", tmp_path / "cut"
    # side by side (each pretrains the same base model into its own cache): an uninterrupted run, and the
    # same command slowed down (0.3 s at every step boundary, no other change) that gets SIGTERM mid-iteration
    args = _detox_args(tmp_path, tok, cut, tmp_path / "cache_cut")
    with open(tmp_path / "full.out", "w") as out, open(tmp_path / "cut.err", "w") as err:
        ref = subprocess.Popen(_detox_args(tmp_path, tok, full, tmp_path / "cache_full"), cwd=REPO, env=env,
                               stdout=out, stderr=subprocess.STDOUT)
        proc = subprocess.Popen(args, cwd=REPO, env={**env, "REGFT_JAX_STEP_SLEEP": "0.3"}, stdout=subprocess.PIPE,
                                stderr=err, text=True)
        try:
            for line in proc.stdout:
                if line.startswith("ours step 2/8"):
                    proc.send_signal(signal.SIGTERM)
                    break
            proc.communicate(timeout=400)
            ref.wait(timeout=400)
        finally:
            proc.kill()
            ref.kill()
    printed = (tmp_path / "full.out").read_text()
    assert ref.returncode == 0, printed[-3000:]
    assert "sft step 3/8, loss " in printed and "ours step 3/8, loss " in printed and "MFU " in printed
    stderr = (tmp_path / "cut.err").read_text()
    assert proc.returncode == preemption.EXIT_CODE, stderr[-3000:]
    message = next(line for line in stderr.splitlines() if line.startswith("preempted at step"))
    step = int(message.split()[3])
    assert 2 < step < 8 and message == (f"preempted at step {step} of ours; run the same command again to resume "
                                        f"(exit status {preemption.EXIT_CODE})")
    assert "received SIGTERM: checkpointing at the next step boundary" in stderr
    assert not (cut / "results.json").exists()
    ours = cut / "checkpoints" / "ours"
    assert str(step) in os.listdir(ours)
    # a later save cut short (killed mid-write: orbax renames <step>.orbax-checkpoint-tmp-* when complete)
    half = ours / f"{step + 1}.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(ours / str(step), half)
    shutil.rmtree(half / "meta")
    (half / "commit_success.txt").unlink()

    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"ours: resumed from {ours} at LLM step {step}/8" in out.stdout
    assert "sft: resumed from" in out.stdout and "at step 8/8" in out.stdout  # finished: not rerun
    assert not half.exists()  # the incomplete checkpoint was ignored and deleted
    a, b = (json.loads((d / "results.json").read_text()) for d in (full, cut))
    for model in ("sft", "ours"):  # every field but the wall times
        assert a[model].pop("train_seconds") > 0 and b[model].pop("train_seconds") > 0
    assert a == b
    assert (full / "generations.jsonl").read_text() == (cut / "generations.jsonl").read_text()
    for name in ("sft", "ours"):  # metrics: every step once, equal losses; tokens/s and MFU on each (log_every=1)
        expected, got = _jsonl(full / f"metrics_{name}.jsonl"), _jsonl(cut / f"metrics_{name}.jsonl")
        key = "loss" if name == "sft" else "llm/loss"
        assert [m["step"] for m in got] == list(range(1, 9)) and [m[key] for m in got] == [m[key] for m in expected]
        assert all(m["mfu"] > 0 and m["tokens_per_s"] > 0 for m in got[1:])
        assert os.listdir(cut / "tb" / name)
