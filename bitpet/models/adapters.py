"""Adapter building blocks: AdaptFormer and LoRA bottlenecks over low-precision matrices.

Every adapter matrix is a :class:`AdapterDense` with a single ``kernel`` of shape (in, out)
(flax layout; PyTorch stores its transpose). Its effective weight depends on ``bits``:

* 1..8: Gaussian-codebook quantization with Eq. (8) gradients (:func:`bitpet.quant.quantize`);
* 16: float16 rounding with a straight-through gradient (trained in full precision, stored and
  evaluated as float16);
* 32: the float32 weight itself.

``materialized=True`` uses the kernel as given: the evaluation form, whose kernels already hold
the dequantized weights (see :func:`bitpet.models.vit.materialize_params`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bitpet import quant

FLOAT_BITS = (16, 32)


def check_adapter_bits(bits: int) -> int:
    """Validates an adapter bit-width: 1..8 (quantized) or 16/32 (float)."""
    if isinstance(bits, bool) or int(bits) != bits:
        raise ValueError(f"bits={bits!r} must be an integer in 1..8, 16 or 32.")
    if int(bits) in FLOAT_BITS:
        return int(bits)
    return quant.check_bits(bits)


def torch_linear_init(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default nn.Linear initialisation."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def trunc_normal_init(std: float = 1e-3, cut: float = 2e-3):
    """Normal(0, std) truncated at +-cut: the original init of quantized up-projections."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.truncated_normal(key, -cut / std, cut / std, shape, dtype) * std

    return init


def effective_weight(kernel: jax.Array, bits: int, blocks: int, std_mode: str) -> jax.Array:
    """The weight an adapter computes with during training (see module docstring)."""
    if bits == 32:
        return kernel
    if bits == 16:
        rounded = kernel.astype(jnp.float16).astype(kernel.dtype)
        return kernel + jax.lax.stop_gradient(rounded - kernel)
    return quant.quantize(kernel, bits, blocks, std_mode)


class AdapterDense(nn.Module):
    """A bias-free dense layer whose kernel is stored at ``bits`` bits."""

    features: int
    bits: int = 32
    blocks: int = 1
    std_mode: str = "population"
    materialized: bool = False
    kernel_init: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = self.kernel_init or torch_linear_init(x.shape[-1])
        kernel = self.param("kernel", init, (x.shape[-1], self.features), jnp.float32)
        if not self.materialized:
            kernel = effective_weight(kernel, self.bits, self.blocks, self.std_mode)
        return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


class Bottleneck(nn.Module):
    """down (d -> h), optional ReLU, dropout, up (h -> out). No bias, no LayerNorm.

    With ``activation=True`` it is the AdaptFormer adapter; without, a LoRA branch.
    """

    hidden: int
    out_features: int
    bits: int = 32
    blocks: int = 1
    std_mode: str = "population"
    dropout: float = 0.1
    activation: bool = True
    materialized: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        # Float adapters start with a zero up-projection; a quantized one needs sigma > 0.
        up_init = nn.initializers.zeros if self.bits in FLOAT_BITS else trunc_normal_init()
        common = dict(
            bits=self.bits,
            blocks=self.blocks,
            std_mode=self.std_mode,
            materialized=self.materialized,
            dtype=self.dtype,
        )
        y = AdapterDense(self.hidden, name="down", **common)(x)
        if self.activation:
            y = nn.relu(y)
        y = nn.Dropout(self.dropout)(y, deterministic=not train)
        return AdapterDense(self.out_features, name="up", kernel_init=up_init, **common)(y)
