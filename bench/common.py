"""Shared by the benchmarks: loading a config file, the model pair (a random HF Llama and its regft_jax
conversion), timing, the machine's matmul peak and copy bandwidth, printing a result and appending it
to RESULTS.md.

Importing this module sets XLA_PYTHON_CLIENT_PREALLOCATE=false (unless set): on a GPU, JAX would
otherwise reserve 75% of the device memory at start and leave too little for the PyTorch side of a
comparison. On CPU it applies regft_jax.hostmem's malloc settings, as `regft_jax.main` does: they hold
for the whole process, so for both sides of a comparison. Nothing here imports ml_collections (the GPU
machine has none).
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from regft_jax.hostmem import reuse_freed_host_memory  # noqa: E402

HOST_MALLOC = reuse_freed_host_memory()


def load_config(path: str):
    """`get_config()` of a configs/*.py file."""
    from regft_jax.config_utils import load_config_file

    return load_config_file(path)


def cpu_model() -> str:
    """The host CPU's model name (with "AMX" where it has AMX tiles, which bf16 matmuls use), from
    /proc/cpuinfo on Linux; the architecture elsewhere. The same bench gives different ratios on
    different CPUs (bench/RESULTS.md), so every header names it."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict((key.strip(), value.strip()) for key, value in
                  (line.split(":", 1) for line in info.splitlines() if ":" in line))
    amx = "amx_bf16" in fields.get("flags", "").split()
    return fields.get("model name", platform.machine()) + (", AMX" if amx else "")


def machine() -> str:
    """The devices and cores a result was measured on."""
    import jax

    device = jax.devices()[0]
    kind = f" ({device.device_kind})" if device.platform != "cpu" else ""
    return (f"{jax.device_count()} {device.platform} device(s){kind}, jax {jax.__version__}, "
            f"{cpu_model()}, {os.cpu_count()} cores"
            + ("; glibc malloc: one arena, no mmap, no trim (regft_jax/hostmem.py, both sides)" if HOST_MALLOC else ""))


def report(title: str, script: str, argv, header: str, table: str, write: bool) -> None:
    """Print `header` and `table`; with `write`, append them to bench/RESULTS.md under `title`
    with the command that produced them."""
    print(header)
    print(table)
    if write:
        command = f"python bench/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(os.path.join(REPO, "bench", "RESULTS.md"), "a") as f:
            f.write(f"\n## {title} ({time.strftime('%Y-%m-%d')})\n\n`{command.strip()}`\n\n{header}\n\n{table}\n")


# ----------------------------------------------------------------------------- options


def parse_shapes(text: str, layers: int) -> list[tuple[int, int]]:
    """"128,256x8" -> [(128, layers), (256, 8)]: comma-separated widths, each optionally "xLAYERS"."""
    shapes = []
    for item in text.split(","):
        width, _, depth = item.strip().lower().partition("x")
        shapes.append((int(width), int(depth) if depth else layers))
    return shapes


def heads_for(width: int, heads: int = 0) -> int:
    """`heads`, or with 0 the default: width // 64 (head dimension 64), at least 4."""
    heads = heads or max(4, width // 64)
    if width % heads:
        raise SystemExit(f"width {width} is not a multiple of {heads} heads")
    return heads


def torch_device(name: Optional[str]) -> str:
    """`name`, or by default "cuda" when PyTorch sees a GPU, else "cpu"."""
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def torch_sync(device: str) -> None:
    """Wait for PyTorch's queued device work (a no-op on CPU)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def torch_info(device: str) -> str:
    import torch

    where = (torch.cuda.get_device_name() if device.startswith("cuda")
             else f"cpu, {torch.get_num_threads()} threads")
    return f"torch {torch.__version__} ({where})"


def set_float32_matmuls(tf32: bool) -> str:
    """Same float32 matmul precision on both sides: full float32 by default (JAX on a GPU would
    otherwise use TF32 and PyTorch not), or TF32 on both. Returns a description for headers."""
    import jax
    import torch

    jax.config.update("jax_default_matmul_precision", None if tf32 else "highest")
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    return "float32 matmuls: TF32 allowed (both)" if tf32 else "float32 matmuls: full precision (both)"


# ----------------------------------------------------------------------------- the model pair


def hf_llama(vocab: int, width: int, layers: int, heads: int, mlp: int, *, device: str = "cpu",
             max_positions: int = 512, seed: int = 0):
    """A random HF `LlamaForCausalLM` (float32, multi-head attention), built on `device`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=mlp,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=heads, max_position_embeddings=max_positions)
    with torch.device(device):
        return transformers.LlamaForCausalLM(cfg).float()


def to_regft(hf_model, **load_kw):
    """(ModelConfig, params) of `hf_model` read by `regft_jax.models.load_hf` from a `save_pretrained`
    copy: the same weights on both sides. `load_kw`: load_hf's mesh, param_dtype and runtime fields."""
    from transformers.utils import logging

    from regft_jax import models

    logging.disable_progress_bar()  # "Writing model shards" on every save
    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        return models.load_hf(d, **load_kw)


def free_torch(device: str) -> None:
    """Return PyTorch's cached device memory (between shapes of one run)."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- timing


def interleaved_times(fns: Sequence[Callable[[], object]], repeats: int, warmup: int = 1) -> list[np.ndarray]:
    """Seconds per call of each fn (which must wait for its own results), after `warmup` calls each
    (compilation); timed in `repeats` interleaved rounds, one call of every fn per round, so drifts
    of a shared machine hit all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [np.asarray(t) for t in times]


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()
    return float(interleaved_times([fn], repeats, warmup=0)[0].min())


def jax_matmul_flops(n: int, dtype: str, repeats: int = 5) -> float:
    """FLOP/s of a jitted [n, n] @ [n, n] in `dtype` on JAX's default device (best of `repeats`); 16-bit
    operands are summed in float32, as the models' bf16 matmuls are (on the CPU: its bf16 units)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    acc = jnp.float32 if jnp.dtype(dtype).itemsize == 2 else None
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=acc))
    return 2.0 * n ** 3 / _best(lambda: f(a, b).block_until_ready(), repeats)


def torch_matmul_flops(n: int, dtype: str, device: str, repeats: int = 5) -> float:
    """FLOP/s of torch.matmul of two [n, n] `dtype` tensors on `device` (best of `repeats`)."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype), generator=gen) for _ in range(2))

    def run():
        a @ b
        torch_sync(device)

    return 2.0 * n ** 3 / _best(run, repeats)


def jax_copy_bandwidth(megabytes: int, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s, STREAM "scale" style: a jitted x <- 2·x over a float32 array of
    `megabytes` (bytes read + written per second; best of `repeats`). The array is donated, so each call
    writes into the buffer it reads (without donation a CPU run mostly measures page faults on a
    freshly allocated output: 3 instead of 16 GB/s here)."""
    import jax
    import jax.numpy as jnp

    holder = [jnp.ones((megabytes * 2 ** 20 // 4,), jnp.float32)]
    f = jax.jit(lambda x: x * 2.0, donate_argnums=0)

    def run():
        holder[0] = f(holder[0]).block_until_ready()

    return 2.0 * holder[0].nbytes / _best(run, repeats)
