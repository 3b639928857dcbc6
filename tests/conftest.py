"""Shared fixtures for bitpet's tests."""

from __future__ import annotations

import os
import sys

# XLA's CPU backend spends most of a small test model's compile time in LLVM optimisations;
# without them programs compile ~5x faster and the tests' tiny computations barely slow down
# (matmuls and convolutions call precompiled kernels either way). Must be set before JAX
# initialises its backend; an explicit setting in XLA_FLAGS wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fake_checkpoints  # noqa: E402


@pytest.fixture
def x64():
    """Enables float64 in JAX for one test and restores the previous setting afterwards."""
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture(scope="session")
def b16_in21k_npz(tmp_path_factory) -> str:
    """Path of a fake ImageNet-21k ``ViT-B_16.npz`` (exact names and shapes, random values).

    About 400 MB in a session temp dir, written once per test session.
    """
    path = tmp_path_factory.mktemp("ckpt") / "ViT-B_16.npz"
    return fake_checkpoints.write_npz(path, fake_checkpoints.fake_vit_checkpoint("B/16"))
