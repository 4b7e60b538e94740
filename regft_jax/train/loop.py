"""A host-side training loop around a pure, jitted step: batches in, progress bar, metrics out.

    state, history = run_steps(step, state, batches, steps=300, desc="base")

`batches(step) -> dict of numpy arrays` gives this process's rows of global batch `step`
(see `global_batches`); the loop assembles global arrays, calls the step, and keeps the
metrics of every step (fetched lazily, so the host never waits on the device mid-run).
Steps skip non-finite updates themselves (`guarded_update`); more than `max_skipped` skipped
steps in a row stop the run with an error naming the step. SIGTERM/SIGINT checkpoint at the next
step boundary and raise `preemption.Preempted`; a `throughput.Throughput` meter logs tokens/s and MFU
every `log_every` steps.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Iterable, Optional

import jax
import numpy as np
from tqdm import tqdm

from regft_jax import multihost, preemption
from regft_jax import sharding as shd
from regft_jax.data.batching import MixtureBatcher, make_global_batch, process_row_positions
from regft_jax.train.throughput import Throughput


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; nothing after the offending step is kept."""


def corpus_keys(document_attention: bool, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The `MixtureBatcher` keys a corpus step reads: tokens and loss_mask, plus segment_ids and
    positions with document attention (`models.packed_inputs`), plus `extra` (e.g. "domain")."""
    keys = ("tokens", "loss_mask") + (("segment_ids", "positions") if document_attention else ())
    return keys + tuple(k for k in extra if k not in keys)


def global_batches(batcher: MixtureBatcher, mesh, keys: Iterable[str] = ("tokens", "loss_mask")) -> Callable:
    """step -> global batch (dict of jax.Array sharded over the data axes). Each process reads
    only its own rows of the deterministic global batch."""
    sharding = shd.batch_sharding(mesh, 2)
    positions = process_row_positions(sharding, batcher.global_batch_size)
    keys = tuple(keys)

    def get(step: int) -> dict:
        local = batcher.batch(step, positions)
        arrays = {k: local[k] for k in keys}
        shardings = {k: shd.batch_sharding(mesh, v.ndim) for k, v in arrays.items()}
        return make_global_batch(arrays, shardings, batcher.global_batch_size)

    return get


def run_steps(step_fn: Callable, state, batches: Callable[[int], dict], *, steps: int, desc: str,
              start: int = 0, max_skipped: int = 10, save: Optional[Callable] = None,
              save_every: int = 0, meter: Optional[Throughput] = None,
              log: Optional[Callable[[int, dict], None]] = None) -> tuple[object, list[dict]]:
    """Run steps start..steps−1 (`steps` is the total, `start` the first step index); returns
    (state, per-step metrics as floats of the steps run).

    Throughput ("tokens_per_s", from a "tokens" metric) excludes the first (compiling) step.
    save(step, state, history): called every `save_every` steps and after the last one, with the
    metrics of the steps run so far (a checkpoint; it must copy the state, which is donated next).
    meter: every `meter.every` steps, "tokens_per_s" and "mfu" of the window join that step's metrics
    and a line is printed. log(step, metrics): every step's metrics (1-based step), e.g. to a file.
    SIGTERM/SIGINT (`preemption`): the state is saved at the next step boundary, then `Preempted`.
    """
    pending, history = [], []
    bar = tqdm(range(start, steps), desc=desc, disable=not sys.stderr.isatty(), leave=False,
               initial=start, total=steps)
    first_done, skipped = None, 0
    with preemption.guard():
        for i in bar:
            state, metrics = step_fn(state, batches(i))
            pending.append(metrics)
            if i == start:
                jax.block_until_ready(metrics)
                first_done = time.perf_counter()
                if meter is not None:
                    meter.reset(i + 1)
            stop = preemption.requested()
            saving = save is not None and ((save_every and (i + 1) % save_every == 0) or i == steps - 1 or stop)
            window = meter is not None and meter.due(i + 1)
            if len(pending) >= 8 or i == steps - 1 or saving or window:  # fetch in groups: no per-step sync
                fetched = [{k: float(np.asarray(v)) for k, v in m.items()} for m in jax.device_get(pending)]
                if window:  # the device finished step i: a sync point
                    fetched[-1].update(meter.measure(i + 1))
                    if multihost.is_primary():
                        print(meter.line(i + 1, fetched[-1]), flush=True)
                for m in fetched:
                    history.append(m)
                    if log is not None:
                        log(start + len(history), m)
                    bad = m.get("skipped", 0.0) > 0 or not math.isfinite(m.get("loss", 0.0))
                    skipped = skipped + 1 if bad else 0
                    if skipped > max_skipped:
                        raise NonFiniteLossError(
                            f"{desc}: loss {m.get('loss')} is not finite for {skipped} steps in a row "
                            f"(last: step {start + len(history) - 1}); stopping, nothing of these steps is saved")
                pending = []
                bar.set_postfix(loss=f"{history[-1].get('loss', float('nan')):.3f}")
            if saving:
                save(i + 1, state, history)
            if stop:
                raise preemption.Preempted(i + 1, desc, saved=save is not None)
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - first_done if first_done else float("nan")
    if len(history) > 1 and "tokens" in history[0]:
        tokens = sum(h["tokens"] for h in history[1:])
        history[-1]["run_tokens_per_s"] = tokens / max(elapsed, 1e-9)  # the whole run's (after compilation)
        history[-1].setdefault("tokens_per_s", history[-1]["run_tokens_per_s"])  # (unless `meter` measured it)
    return state, history


def summarize(history: list[dict], keys: Optional[Iterable[str]] = None, rows: int = 5) -> str:
    """A small text table of selected metrics at evenly spaced steps."""
    if not history:
        return ""
    keys = list(keys or [k for k in history[0] if k != "tokens"])
    picks = sorted({round(i * (len(history) - 1) / max(rows - 1, 1)) for i in range(rows)})
    lines = [f"{'step':>7} " + " ".join(f"{k:>12}" for k in keys)]
    for i in picks:
        lines.append(f"{i + 1:>7} " + " ".join(f"{history[i].get(k, float('nan')):>12.4f}" for k in keys))
    return "\n".join(lines)
