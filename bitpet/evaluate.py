"""Exact evaluation: padded batches with a mask, accuracy = sum(correct * mask) / sum(mask)."""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def data_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device with the batch axis "data"."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Places this process's part of a global batch on the "data" axis."""
    sharding = NamedSharding(mesh, P("data"))
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
    }


def make_eval_step(model, mesh: jax.sharding.Mesh):
    """Jitted ``(params, batch) -> (num_correct, num_real)``, compiled once per batch shape."""

    def step(params, batch):
        logits = model.apply({"params": params}, batch["image"], train=False)
        correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        mask = batch["mask"].astype(jnp.float32)
        return jnp.sum(correct * mask), jnp.sum(mask)

    return jax.jit(step, out_shardings=NamedSharding(mesh, P()))


def evaluate(model, params, batches: Iterable[dict], mesh=None, eval_step=None) -> dict:
    """Accuracy of ``model`` over ``batches`` (each with image, label and mask).

    Returns:
      {"accuracy": float, "num_examples": int}.
    """
    mesh = mesh or data_mesh()
    eval_step = eval_step or make_eval_step(model, mesh)
    correct = total = 0.0
    for batch in batches:
        c, n = eval_step(params, shard_batch(batch, mesh))
        correct += float(c)
        total += float(n)
    if total == 0:
        raise ValueError("The evaluation split is empty.")
    return {"accuracy": correct / total, "num_examples": int(total)}


def evaluate_split(model, params, config, mesh=None, eval_step=None) -> dict:
    """Evaluates on the config's evaluation split (test for split=final, val200 for tune)."""
    from bitpet.data import sources

    batches = sources.get_source(config.get("data_source", "vtab")).eval_batches(
        config.task,
        split=config.split,
        batch_size=config.eval_batch_size,
        image_size=config.image_size,
        data_dir=config.data_dir or None,
        mock_data=config.mock_data,
        mock_num_examples=config.mock_num_examples,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return evaluate(model, params, batches, mesh, eval_step)
