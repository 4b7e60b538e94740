"""Preemption: SIGTERM or SIGINT while a training loop runs → a checkpoint at the next step boundary,
then a clean exit with `EXIT_CODE`; the same command started again resumes from that checkpoint.

    with preemption.guard():                  # the handlers are installed while the loop runs
        for step in range(start, steps):
            state = train_step(state, ...)
            if preemption.requested():        # every step boundary; the same answer on every process
                save(step + 1, state)
                raise preemption.Preempted(step + 1, "sft")

Every process takes the decision at the same boundary, even when the signal reached only some hosts:
in a multi-process run jax's preemption service (set up by `jax.distributed.initialize`) catches SIGTERM
and spreads the notice to every process, and `requested` is `multihost_utils.reached_preemption_sync_point`
(a local check until a notice arrives); SIGINT is forwarded to it as SIGTERM. Without that service
(`jax_enable_preemption_service=False`) every boundary all-gathers the processes' flags instead (one
tiny collective per step). One process: no synchronization.

In a single process a second signal acts at once (SIGINT: KeyboardInterrupt; SIGTERM: termination).
Outside `guard` signals keep their usual effect (no loop runs there; the loops' checkpoints are
written before they return). `REGFT_JAX_STEP_SLEEP` (seconds) sleeps at every boundary: tests use it
to make a tiny run slow enough to interrupt mid-way; it changes no result.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, retry the same command
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_state = {"signal": None, "boundaries": 0, "depth": 0, "previous": {}}


class Preempted(RuntimeError):
    """A loop stopped on a signal at `step` (after checkpointing it, when `saved`)."""

    def __init__(self, step: int, run: str, saved: bool = True):
        self.step, self.run, self.saved = step, run, saved
        tail = ("run the same command again to resume" if saved else
                "nothing was checkpointed (checkpoints are off), the same command starts this run over")
        super().__init__(f"preempted at step {step} of {run}; {tail}")


def _synced() -> bool:
    """Whether jax's preemption service takes the decision (multi-process runs)."""
    import jax

    return jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)


def _on_signal(signum, frame) -> None:
    _state["signal"] = signum
    signal.signal(signum, _state["previous"][signum])  # a second one acts as usual
    # os.write, not print: the main thread may be inside a buffered write to the same stream
    os.write(2, f"\nreceived {signal.Signals(signum).name}: checkpointing at the next step boundary, then "
                f"exiting with status {EXIT_CODE} (send it again to stop at once)\n".encode())


def _forward_to_service(signum, frame) -> None:
    os.write(2, b"\nreceived SIGINT: forwarded to jax's preemption service as SIGTERM\n")
    os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def guard():
    """Handle SIGTERM/SIGINT as a preemption request while the block runs (main thread only;
    nested guards share the outer one's handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _state["depth"] == 0:  # (a signal that came after the previous loop's last boundary still counts)
        handlers = ({signal.SIGINT: _forward_to_service} if _synced() else  # SIGTERM: jax's own handler
                    {s: _on_signal for s in SIGNALS})
        _state["previous"] = {s: signal.signal(s, h) for s, h in handlers.items()}
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0:
            for s, h in _state["previous"].items():
                signal.signal(s, h)


def requested() -> bool:
    """Call at every step boundary of a guarded loop, on every process: whether to checkpoint and
    stop there. A collective in multi-process runs (every process calls it equally often)."""
    delay = float(os.environ.get("REGFT_JAX_STEP_SLEEP", "0") or 0)
    if delay > 0:
        time.sleep(delay)
    _state["boundaries"] += 1
    import jax

    if _synced():
        from jax.experimental import multihost_utils

        return bool(multihost_utils.reached_preemption_sync_point(_state["boundaries"]))
    local = _state["signal"] is not None
    if jax.process_count() == 1:
        _state["signal"] = None  # consumed: this boundary stops
        return local
    from regft_jax import multihost

    return not multihost.all_agree(not local)
