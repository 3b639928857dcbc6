"""Shared helpers for the training tests: tiny, fast configs on mock data."""

from __future__ import annotations

from configs import vtab

TINY = dict(image_size=16, batch_size=8, eval_batch_size=16, mock_data=True, mock_num_examples=24)


def tiny_config(arg: str = "bi_lora,task=cifar100", **overrides):
    """A VTAB config shrunk to the "testing" ViT at 16 px on mock data."""
    config = vtab.get_config(arg)
    for key, value in {**TINY, **overrides}.items():
        config[key] = value
    config.model.variant = "testing"
    config.log_every_steps = 2
    return config
