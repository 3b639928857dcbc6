"""Run checkpoints with orbax: trainable params, optimizer state, step, data position, evals.

Only the trainable partition is saved (the frozen backbone is reloaded from its file). Orbax
writes each step to a temporary directory and renames it when complete, so a crash never
leaves a half-written checkpoint behind; restarting with the same workdir resumes.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def manager(workdir: str, max_to_keep: int = 2) -> ocp.CheckpointManager:
    """The CheckpointManager of ``workdir/checkpoints``."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=options,
        item_names=("state", "meta"),
    )


def save(mngr: ocp.CheckpointManager, step: int, state: dict, meta: dict) -> None:
    """Saves ``state`` (a pytree of arrays) and JSON ``meta`` at ``step``; blocks until done."""
    mngr.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    mngr.wait_until_finished()


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: dict):
    """Restores the latest step as ``(state, meta)``, or ``(None, None)`` when there is none.

    Args:
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` (with shardings) or arrays giving the
        structure, shapes and placement to restore into.
    """
    step = mngr.latest_step()
    if step is None:
        return None, None
    abstract = jax.tree.map(
        lambda x: (
            x
            if isinstance(x, jax.ShapeDtypeStruct)
            else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        ),
        abstract_state,
    )
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
    )
    return out["state"], out["meta"]
