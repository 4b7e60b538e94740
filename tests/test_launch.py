"""The launch scripts (launch/): --dry-run prints the exact commands (a run without it executes
those very argv lists, seen by stand-in gcloud / sbatch / srun executables); the command run on
every TPU worker hands --config overrides with spaces, quotes and `$` to regft_jax.main unchanged
(executed by a real bash); SLURM jobs export the jax.distributed environment."""

import shlex
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU, SLURM, SBATCH = REPO / "launch" / "tpu_pod.sh", REPO / "launch" / "slurm.sh", REPO / "launch" / "slurm.sbatch"
OVERRIDES = ["--config.method.oracle_args={'words': ['a b', \"it's\"]}", "--config.desc=$HOME `id` \\ & done;",
             "--config.eval.oracles=regex,insult_classifier"]
RECORDER = """#!/usr/bin/env bash
# stand-in for {name}: records its argv (NUL-separated), working directory and JAX_* environment
{{ printf '%s\\0' "$@"; }} > "{out}/{name}.argv"
pwd > "{out}/{name}.pwd"
env | grep '^JAX_' | sort > "{out}/{name}.env" || true
"""


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH directory with recording stand-ins for gcloud, sbatch and srun (none is installed here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "sbatch", "srun", "python"):
        (bin_dir / name).write_text(RECORDER.format(name=name, out=tmp_path))
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run(script, *args, fake_bin, env=None, check=True):
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin", "HOME": str(fake_bin.parent), **(env or {})}
    out = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def _recorded(fake_bin, name):
    path = fake_bin.parent / f"{name}.argv"
    return path.read_text().split("\0")[:-1] if path.exists() else None


def _dry(script, *args, fake_bin, env=None) -> list[list[str]]:
    """The commands a --dry-run prints, each parsed back into its argv; nothing may be executed."""
    out = _run(script, "--dry-run", *args, fake_bin=fake_bin, env=env)
    assert all(_recorded(fake_bin, n) is None for n in ("gcloud", "sbatch", "srun"))
    return [shlex.split(line) for line in out.stdout.splitlines()]


def _remote(argv) -> str:
    (command,) = [a for a in argv if a.startswith("--command=")]
    return command[len("--command="):]


TPU_ARGS = ["--name", "pod-1", "--zone", "us-central2-b", "--project", "my proj"]


def test_tpu_run_hands_the_overrides_to_every_worker_unchanged(fake_bin, tmp_path):
    (argv,) = _dry(TPU, *TPU_ARGS, "run", "configs/llama.py", *OVERRIDES, fake_bin=fake_bin)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1"]
    assert {"--worker=all", "--zone=us-central2-b", "--project=my proj"} <= set(argv)
    # Execute the workers' command with a real bash in a stand-in home: ~/regft_jax/.venv's python records its argv.
    home = tmp_path / "worker"
    (home / "regft_jax" / ".venv" / "bin").mkdir(parents=True)
    (home / "regft_jax" / ".venv" / "bin" / "activate").write_text(f"PATH={fake_bin}:$PATH\n")
    subprocess.run(["bash", "-c", _remote(argv)], cwd=home, env={"PATH": "/usr/bin:/bin", "HOME": str(home)},
                   check=True, timeout=30)
    deadline = time.time() + 20  # the run is started in the background (nohup ... &)
    while _recorded(fake_bin, "python") is None and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)
    assert _recorded(fake_bin, "python") == ["-m", "regft_jax.main", "--config=configs/llama.py",
                                              "--config.distributed=True", *OVERRIDES]
    assert (home / "regft_jax" / "run.pid").read_text().strip().isdigit()
    assert (home / "regft_jax" / "run.log").exists()


@pytest.mark.parametrize("command", [["create", "--type", "v4-32", "--spot"], ["queue", "--type", "v5litepod-64"],
                                     ["status"], ["install"], ["run", "configs/llama.py", *OVERRIDES], ["logs"],
                                     ["stop"], ["delete"], ["delete", "--queued"]])
def test_tpu_dry_run_prints_exactly_what_runs(fake_bin, command):
    (printed,) = _dry(TPU, *TPU_ARGS, *command, fake_bin=fake_bin)
    _run(TPU, *TPU_ARGS, *command, fake_bin=fake_bin)
    assert printed[0] == "gcloud" and _recorded(fake_bin, "gcloud") == printed[1:]


def test_tpu_commands(fake_bin):
    dry = lambda *a: _dry(TPU, "--name", "pod-1", "--zone", "z", *a, fake_bin=fake_bin)
    (create,) = dry("create", "--type", "v4-32", "--spot")
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod-1", "--zone=z", "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base", "--spot"]
    (queue,) = dry("queue", "--type", "v5litepod-64", "--version", "v2-alpha-tpuv5-lite")
    assert queue == ["gcloud", "compute", "tpus", "queued-resources", "create", "pod-1", "--zone=z", "--node-id=pod-1",
                     "--accelerator-type=v5litepod-64", "--runtime-version=v2-alpha-tpuv5-lite"]
    tar, scp, untar = dry("copy")
    assert tar[:2] == ["tar", "-czf"] and {"--exclude=./.git", "--exclude=./.venv", "-C", str(REPO)} <= set(tar)
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5:7] == [tar[2], "pod-1:regft_jax.tgz"]
    assert "--worker=all" in scp and "--worker=all" in untar
    assert _remote(untar) == "mkdir -p regft_jax && tar -xzf regft_jax.tgz -C regft_jax && rm regft_jax.tgz"
    (install,) = dry("install")
    assert "--worker=all" in install and shlex.split(_remote(install))[-3:] == ["-e", ".", "jax[tpu]==0.10.2"]
    (logs,) = dry("logs")
    assert "--worker=0" in logs and _remote(logs) == "tail -n 200 -F regft_jax/run.log"
    (stop,) = dry("stop")
    assert "--worker=all" in stop and "kill $(cat regft_jax/run.pid)" in _remote(stop)
    assert dry("delete")[0][4:] == ["delete", "pod-1", "--zone=z", "--quiet"]
    assert dry("delete", "--queued")[0][3:] == ["queued-resources", "delete", "pod-1", "--zone=z", "--force", "--quiet"]


@pytest.mark.parametrize("args,message", [
    (["run", "configs/llama.py"], "--name (or TPU_NAME) is required"),
    (["--name", "p", "run", "configs/llama.py"], "--zone (or TPU_ZONE) is required"),
    (["--name", "p", "--zone", "z", "launch"], "unknown command 'launch'"),
    (["--name", "p", "--zone", "z", "queue"], "queue: --type is required"),
    (["--name", "p", "--zone", "z", "create", "--type", "v9-8"], "no default runtime version for --type v9-8"),
    (["--name", "p", "--zone", "z", "run"], "run: expected CONFIG"),
])
def test_tpu_bad_arguments(fake_bin, args, message):
    out = _run(TPU, "--dry-run", *args, fake_bin=fake_bin, check=False)
    assert out.returncode == 2 and message in out.stderr and not out.stdout


def test_slurm_submit(fake_bin):
    args = ["--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time", "02:00:00", "--venv", "/sw/venv",
            "configs/llama.py", *OVERRIDES]
    (printed,) = _dry(SLURM, *args, fake_bin=fake_bin)
    assert printed == ["sbatch", "--nodes=2", "--gpus-per-node=4", "--partition=gpu", "--time=02:00:00",
                       "--export=ALL,VENV=/sw/venv", "launch/slurm.sbatch", "configs/llama.py", *OVERRIDES]
    _run(SLURM, *args, fake_bin=fake_bin)
    assert _recorded(fake_bin, "sbatch") == printed[1:]
    assert (fake_bin.parent / "sbatch.pwd").read_text().strip() == str(REPO)  # submitted from the repository
    out = _run(SLURM, "--nodes", "0", "configs/llama.py", fake_bin=fake_bin, check=False)
    assert out.returncode == 2 and "--nodes 0: expected a positive integer" in out.stderr


@pytest.mark.parametrize("gpus", [{"SLURM_GPUS_ON_NODE": "4"}, {"CUDA_VISIBLE_DEVICES": "3,5,6,7"}])
def test_slurm_job_runs_every_task_on_all_gpus_of_its_node(fake_bin, tmp_path, gpus):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("export VIRTUAL_ENV_ACTIVE=1\n")
    env = {"SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "VENV": str(venv), **gpus}
    source, export, srun = _dry(SBATCH, "configs/llama.py", *OVERRIDES, fake_bin=fake_bin, env=env)
    assert source == ["source", f"{venv}/bin/activate"] and export == ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"]
    assert srun == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python", "-m", "regft_jax.main",
                    "--config=configs/llama.py", "--config.distributed=True", *OVERRIDES]
    _run(SBATCH, "configs/llama.py", *OVERRIDES, fake_bin=fake_bin, env=env)
    assert _recorded(fake_bin, "srun") == srun[1:]
    assert (fake_bin.parent / "srun.env").read_text().splitlines() == ["JAX_LOCAL_DEVICE_IDS=0,1,2,3"]
    assert (fake_bin.parent / "srun.pwd").read_text().strip() == str(REPO)
    out = _run(SBATCH, "configs/llama.py", fake_bin=fake_bin, env={"SLURM_SUBMIT_DIR": str(REPO)}, check=False)
    assert out.returncode == 2 and "no GPUs allocated" in out.stderr


def test_jax_reads_the_slurm_task_environment(monkeypatch):
    """What the job relies on: jax.distributed's SLURM detection takes the coordinator (the step's
    first node), process count and id from srun's environment, and without JAX_LOCAL_DEVICE_IDS it
    would give each task the single GPU SLURM_LOCALID (hence the job's export)."""
    from jax._src import clusters

    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_NTASKS": "2",
                       "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
    coordinator, count, index, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, None)
    assert coordinator == f"gpu003:{4242 % 2**12 + 65535 - 2**12 + 1}" and (count, index) == (2, 1)
    assert local == [0]
