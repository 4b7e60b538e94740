"""Throughput of training loops: tokens/s and model-FLOPs utilization (MFU) every `log_every` steps.

Model FLOPs per trained token (the analytic count of PaLM, Chowdhery et al. 2022, appendix B):

    6·N + 12·L·(H·Q)·T        N: parameters in matrix multiplies (the layers' weights and the LM
                              head; the input embedding is a lookup), L layers, H·Q = heads × head
                              dimension, T = sequence length

i.e. forward 2·N + 4·L·H·Q·T (QKᵀ and the attention-weighted values over all T positions), backward
twice that. Causal and document masks are not subtracted and remat's recomputation is not added
(model FLOPs, not hardware FLOPs). MFU = tokens/s × FLOPs per token / (peak FLOP/s per device ×
devices of the mesh). For the method the count is the LLM's training on its corpus tokens (what SFT does), so
its extra work (extra forwards, the auxiliary model, sampling) shows as a lower MFU than SFT's.

Peak FLOP/s per device: `config.hardware.peak_tflops`, or with 0 the dense bf16 peak of
`jax.devices()[0].device_kind` from `PEAK_TFLOPS` (none for CPUs and unlisted devices: no MFU).
"""

from __future__ import annotations

import time
from typing import Optional

from regft_jax.config_utils import require
from regft_jax.models import ModelConfig

# Dense bf16 peak TFLOP/s per device, by a substring of jax's device_kind (first match wins).
PEAK_TFLOPS = (("TPU v6 lite", 918.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0),
               ("TPU v5", 459.0), ("TPU v4", 275.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0),
               ("A100", 312.0))


def matmul_params(cfg: ModelConfig) -> int:
    """N: the parameters that enter a matrix multiply per token (all but the input embedding,
    unless it is tied to the LM head; norms and biases are not counted)."""
    return cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward) per token: 6·N + 12·L·H·Q·T."""
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def device_peak_tflops(device_kind: str) -> Optional[float]:
    """The `PEAK_TFLOPS` entry of a device kind, or None."""
    return next((peak for name, peak in PEAK_TFLOPS if name.lower() in device_kind.lower()), None)


def check_config(config) -> None:
    require(config, "log_every", config.log_every >= 0, "an integer >= 0 (0: no throughput lines)")
    require(config, "hardware.peak_tflops", config.hardware.peak_tflops >= 0,
            f"a peak TFLOP/s per device >= 0 (0: known devices' peak: {dict(PEAK_TFLOPS)})")


def peak_flops(config, mesh) -> Optional[float]:
    """Peak FLOP/s of the mesh's devices together (`config.hardware.peak_tflops` per device, or the
    device kind's default); None when unknown."""
    per_device = config.hardware.peak_tflops or device_peak_tflops(mesh.devices.flat[0].device_kind)
    return per_device * 1e12 * mesh.devices.size if per_device else None


class Throughput:
    """tokens/s and MFU over the steps between two `measure` calls (host sync points: the caller
    has waited for the last step's outputs); `due(step)` every `every` steps."""

    def __init__(self, name: str, *, tokens_per_step: int, flops_per_token: float, peak_flops: Optional[float],
                 every: int, total_steps: int):
        self.name, self.tokens_per_step, self.flops_per_token = name, tokens_per_step, flops_per_token
        self.peak, self.every, self.total = peak_flops, every, total_steps
        self.reset(0)

    @classmethod
    def from_config(cls, config, name: str, cfg: ModelConfig, mesh, *, batch_size: int, seq_len: int,
                    total_steps: int) -> "Throughput":
        """`batch_size` rows of `seq_len` tokens per step, on `mesh`'s devices."""
        return cls(name, tokens_per_step=batch_size * seq_len, flops_per_token=train_flops_per_token(cfg, seq_len),
                   peak_flops=peak_flops(config, mesh), every=config.log_every, total_steps=total_steps)

    def reset(self, step: int) -> None:
        """Start a window after `step` (e.g. once compilation is done)."""
        self.step, self.time = step, time.perf_counter()

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def measure(self, step: int) -> dict:
        """{"tokens_per_s", "mfu" (with a known peak)} of the steps since the last call or reset; {} if none."""
        now = time.perf_counter()
        steps, seconds = step - self.step, max(now - self.time, 1e-9)
        self.reset(step)
        if steps <= 0:
            return {}
        tokens_per_s = steps * self.tokens_per_step / seconds
        out = {"tokens_per_s": tokens_per_s}
        if self.peak:
            out["mfu"] = tokens_per_s * self.flops_per_token / self.peak
        return out

    def line(self, step: int, metrics: dict, loss_key: str = "loss") -> str:
        """The compact printed line: name, step, loss, tokens/s, MFU."""
        parts = [f"{self.name} step {step}/{self.total}"]
        if loss_key in metrics:
            parts.append(f"loss {metrics[loss_key]:.4f}")
        if "tokens_per_s" in metrics:
            parts.append(f"{metrics['tokens_per_s']:,.0f} tokens/s")
        if "mfu" in metrics:
            parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
        return ", ".join(parts)
