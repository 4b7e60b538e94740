"""Train states and pure, jitted, mesh-sharded train steps."""

from regft_jax.train.steps import (
    TrainState,
    init_train_state,
    jit_sharded,
    make_optimizer,
    sft_loss,
    sft_step,
    train_state_shardings,
)

__all__ = [
    "TrainState", "init_train_state", "jit_sharded", "make_optimizer", "sft_loss", "sft_step",
    "train_state_shardings",
]
