"""Optimizer and learning-rate schedule of the paper's recipe.

AdamW (lr 1e-3, weight decay 1e-4 on every trainable tensor) with a linear warm-up from
``warmup_lr`` followed by a cosine decay to ``min_lr``. Like timm's CosineLRScheduler used by
the original code, the cosine is a function of the absolute epoch t: after warm-up,
``lr(t) = min_lr + (lr - min_lr) * (1 + cos(pi * t / T)) / 2``; during warm-up,
``lr(t) = warmup_lr + t * (lr - warmup_lr) / warmup``. With ``lr_per_epoch`` t is the whole
epoch (the original steps its schedule once per epoch); otherwise it is fractional.
A run shortened with ``total_steps`` keeps the warm-up's fraction of the run.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def make_schedule(config, steps_per_epoch: int, total_steps: int):
    """Returns ``step -> learning rate`` (jit-compatible)."""
    total_epochs = total_steps / steps_per_epoch
    warmup = config.warmup_epochs * total_epochs / config.epochs

    def schedule(step):
        t = jnp.asarray(step, jnp.float32) / steps_per_epoch
        if config.lr_per_epoch:
            t = jnp.floor(t)
        warm = config.warmup_lr + t * (config.lr - config.warmup_lr) / max(warmup, 1e-9)
        cos = config.min_lr + 0.5 * (config.lr - config.min_lr) * (
            1.0 + jnp.cos(jnp.pi * t / total_epochs)
        )
        return jnp.where(t < warmup, warm, cos)

    return schedule


def make_optimizer(config, steps_per_epoch: int, total_steps: int):
    """AdamW with the schedule above; returns ``(optax transformation, schedule)``."""
    schedule = make_schedule(config, steps_per_epoch, total_steps)
    tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay)
    return tx, schedule
