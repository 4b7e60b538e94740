"""regft_jax.hostmem: with the malloc settings, an XLA CPU program's large temporary block is reused
between calls instead of being mapped (and page-faulted) afresh each time. Each case runs in a fresh
process: the settings must precede JAX's backend."""

import os
import subprocess
import sys
import textwrap

import pytest

from regft_jax import hostmem

# exp(a @ b) @ c keeps a [4096, 5120] float32 temporary: 80 MiB, above glibc's largest mmap threshold (32 MiB)
# and a thread arena's 64 MiB heaps. Prints the median page faults of 5 calls, after 3 warm-up calls (the
# heap's layout settles in the first calls).
_SCRIPT = textwrap.dedent("""
    import resource, sys
    from regft_jax.hostmem import reuse_freed_host_memory
    keep = None if sys.argv[1] == "None" else int(sys.argv[1])
    print("applied", reuse_freed_host_memory(keep_bytes=keep))
    import jax, jax.numpy as jnp
    f = jax.jit(lambda a, b, c: jnp.exp(a @ b) @ c)
    a, b, c = jnp.ones((4096, 64)) / 64, jnp.ones((64, 5120)), jnp.ones((5120, 4))
    faults = []
    for _ in range(8):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(a, b, c).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    print("faults", sorted(faults[3:])[2])
""")
_PAGES = 4096 * 5120 * 4 // os.sysconf("SC_PAGE_SIZE")

glibc_only = pytest.mark.skipif(hostmem.glibc() is None, reason="glibc malloc settings (Linux) only")


def _run(setting: str, keep_bytes=None) -> tuple[bool, float]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", hostmem.ENV: setting}
    env.pop("GLIBC_TUNABLES", None)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(keep_bytes)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    values = dict(line.split(" ") for line in proc.stdout.splitlines() if line)
    return values["applied"] == "True", float(values["faults"])


def _transparent_huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@glibc_only
def test_temporaries_are_not_page_faulted_again():
    applied, faults = _run("1")
    assert applied
    assert faults < 0.01 * _PAGES, faults  # the block's pages stay mapped between calls
    applied, faults = _run("0")
    assert not applied
    if not _transparent_huge_pages_always():  # (2 MiB pages would fault far less often)
        assert faults > 0.9 * _PAGES, faults  # without: every call maps and faults the whole block again


@glibc_only
@pytest.mark.skipif(_transparent_huge_pages_always(), reason="2 MiB pages fault far less often")
def test_a_finite_trim_threshold_below_the_temporaries_faults_them_again():
    """With keep_bytes under the 80 MiB block, glibc returns the block's pages at every free (the former
    1 GiB default did that to steps with larger temporaries); the default never trims."""
    applied, faults = _run("1", keep_bytes=16 << 20)
    assert applied
    assert faults > 0.9 * _PAGES, faults


@glibc_only
def test_not_applied_once_backends_exist(monkeypatch):
    import jax

    jax.devices()  # this process's backends exist: XLA's threads already have their arenas
    monkeypatch.setenv(hostmem.ENV, "1")
    with pytest.warns(UserWarning, match="backends already exist"):
        assert not hostmem.reuse_freed_host_memory()
    with pytest.raises(ValueError, match="keep_bytes"):
        hostmem.reuse_freed_host_memory(keep_bytes=4 << 30)  # beyond mallopt's C int


def test_cpu_only_detection(monkeypatch):
    for name in hostmem._ACCELERATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    assert hostmem.jax_runs_on_cpu_only("cpu")
    assert hostmem.jax_runs_on_cpu_only("CPU,")
    assert not hostmem.jax_runs_on_cpu_only("cuda,cpu")
    assert not hostmem.jax_runs_on_cpu_only("tpu")
    monkeypatch.setenv("TPU_LIBRARY_PATH", "/lib/libtpu.so")
    assert not hostmem.jax_runs_on_cpu_only("")  # unset platforms: an accelerator library is configured
    assert hostmem.jax_runs_on_cpu_only("cpu")  # named platforms decide


def test_the_default_never_trims(monkeypatch):
    """The settings passed to mallopt: one arena, no mmap, and M_TRIM_THRESHOLD -1 (never trim) unless a
    finite keep_bytes is given."""
    calls = []

    class Libc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    monkeypatch.setattr(hostmem, "glibc", Libc)
    monkeypatch.setattr(hostmem, "jax_runs_on_cpu_only", lambda platforms=None: True)
    monkeypatch.setattr(hostmem, "_backends_exist", lambda: False)
    monkeypatch.setenv(hostmem.ENV, "1")
    assert hostmem.reuse_freed_host_memory()
    expected = [(hostmem._M_ARENA_MAX, 1), (hostmem._M_MMAP_MAX, 0), (hostmem._M_TRIM_THRESHOLD, -1)]
    assert sorted(calls) == sorted(expected)
    calls.clear()
    assert hostmem.reuse_freed_host_memory(keep_bytes=1 << 20)
    assert (hostmem._M_TRIM_THRESHOLD, 1 << 20) in calls
