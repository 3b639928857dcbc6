"""Gaussian-codebook quantization of adapter weights (paper §4.2, Eq. 3-9).

Each weight matrix (or each of its ``blocks`` equal, contiguous chunks in row-major order) is
standardised with its own mean and standard deviation, snapped to the nearest level of a
codebook computed once on N(0, 1) by k-medians (Lloyd's iteration with median updates), and
de-standardised. The backward pass is the straight-through estimator for the rounding only;
the gradient still flows through the mean and the standard deviation (Eq. 8), computed here in
O(m) per matrix.

Supported widths: 1 to 8 bits. ``pack``/``unpack`` store b-bit code indices LSB-first as one
continuous bit stream: element ``i`` occupies bits ``[i*b, (i+1)*b)``. For b in {1, 2, 4, 8}
this is exactly "element i at bit (i mod (8/b))*b of byte i*b // 8", the layout of the
original release; for 3, 5, 6 and 7 bits codes straddle byte boundaries.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

SUPPORTED_BITS = tuple(range(1, 9))
STD_MODES = ("population", "unbiased")
# The released PyTorch code standardises with (sigma + 1e-5) and torch's unbiased std.
UNBIASED_EPS = 1e-5


def check_bits(bits: int) -> int:
    """Returns ``bits`` as int or raises ValueError naming the supported widths."""
    try:
        valid = not isinstance(bits, bool) and int(bits) == bits and int(bits) in SUPPORTED_BITS
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(
            f"bits={bits!r} is not supported by the Gaussian-codebook quantizer; "
            f"allowed values are {list(SUPPORTED_BITS)} (use 16 or 32 for float adapters)."
        )
    return int(bits)


def _check_std_mode(std_mode: str) -> str:
    if std_mode not in STD_MODES:
        raise ValueError(f"std_mode={std_mode!r}; allowed values are {list(STD_MODES)}.")
    return std_mode


@functools.cache
def _codebook64(bits: int) -> tuple[np.ndarray, np.ndarray]:
    n = 2**bits
    # Start from the Gaussian quantiles (close to the optimum, unlike an all-zero start) and run
    # Lloyd's iteration for the L1 loss: boundaries are midpoints of neighbouring levels, and each
    # level is the median of N(0, 1) restricted to its cell.
    levels = special.ndtri((np.arange(n) + 0.5) / n)
    for _ in range(200_000):
        bounds = 0.5 * (levels[1:] + levels[:-1])
        cdf = np.concatenate([[0.0], special.ndtr(bounds), [1.0]])
        new = special.ndtri(0.5 * (cdf[1:] + cdf[:-1]))
        new = 0.5 * (new - new[::-1])  # exact symmetry
        delta = np.max(np.abs(new - levels))
        levels = new
        if delta < 1e-13:
            break
    bounds = 0.5 * (levels[1:] + levels[:-1])
    levels.setflags(write=False)
    bounds.setflags(write=False)
    return levels, bounds


def codebook(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The k-medians codebook of a standard Gaussian at ``bits`` bits.

    Args:
      bits: 1..8.

    Returns:
      ``(levels, boundaries)``: float64 arrays of 2**bits sorted levels and 2**bits - 1
      boundaries (midpoints of neighbouring levels). Computed once per width and cached;
      the arrays are read-only.
    """
    return _codebook64(check_bits(bits))


def _blocked(w: jax.Array, blocks: int) -> jax.Array:
    size = int(np.prod(w.shape))
    if blocks < 1 or size % blocks:
        raise ValueError(
            f"blocks={blocks} must be a positive divisor of the matrix size {size} "
            f"(shape {tuple(w.shape)})."
        )
    return w.reshape(blocks, size // blocks)


def _stats(wb: jax.Array, std_mode: str):
    """Per-block mean, std and the standardisation denominator (float32 or float64)."""
    m = wb.shape[1]
    mu = jnp.mean(wb, axis=1, keepdims=True)
    centred = wb - mu
    ddof = 1 if (std_mode == "unbiased" and m > 1) else 0
    sigma = jnp.sqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / (m - ddof))
    if std_mode == "unbiased":
        denom = sigma + UNBIASED_EPS
    else:
        denom = jnp.where(sigma > 0, sigma, 1.0)  # constant block: w' = 0, no NaN
    return mu, sigma, denom, centred, m - ddof


def _nearest(wp: jax.Array, bits: int):
    levels, bounds = codebook(bits)
    idx = jnp.searchsorted(jnp.asarray(bounds, wp.dtype), wp, side="left")
    return idx, jnp.asarray(levels, wp.dtype)[idx]


def _compute_dtype(dtype) -> jnp.dtype:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def quantize_with_codes(w: jax.Array, bits: int, *, blocks: int = 1, std_mode: str = "population"):
    """Quantizes ``w`` and also returns what a task file stores.

    Args:
      w: weight array of any shape (any float dtype; statistics in float32, or float64).
      bits: 1..8.
      blocks: number of equal contiguous chunks of the row-major flattened ``w``, each with its
        own mean and std.
      std_mode: "population" (paper, Eq. 8) or "unbiased" (released code: ddof=1, sigma+1e-5).

    Returns:
      ``(w_hat, indices, mu, sigma)``: ``w_hat`` has ``w``'s shape and dtype; ``indices`` are
      int32 code indices (0 = most negative level) of ``w``'s shape; ``mu`` and ``sigma`` have
      shape ``[blocks]`` in the compute dtype.
    """
    bits = check_bits(bits)
    _check_std_mode(std_mode)
    cdt = _compute_dtype(w.dtype)
    wb = _blocked(jnp.asarray(w, cdt), blocks)
    mu, sigma, denom, centred, _ = _stats(wb, std_mode)
    idx, q = _nearest(centred / denom, bits)
    w_hat = (q * sigma + mu).reshape(w.shape).astype(w.dtype)
    return w_hat, idx.reshape(w.shape).astype(jnp.int32), mu[:, 0], sigma[:, 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def quantize(w: jax.Array, bits: int, blocks: int = 1, std_mode: str = "population") -> jax.Array:
    """Quantizes ``w`` to ``bits`` bits with the Gaussian codebook; Eq. (8) gradients.

    Forward: ``w_hat = c[j] * sigma + mu`` with ``j`` the codebook cell of ``(w - mu) / sigma``
    (per block). Backward: straight-through for the rounding, exact through mu and sigma:
    ``g_k = G_k + (w'_k / m) * sum_i G_i (q_i - w'_i)`` (population std), the analogous
    exact expression for ``std_mode="unbiased"``.

    Args:
      w: weights; float32, bfloat16 or float64. Statistics run in float32 (float64 for float64).
      bits: 1..8 (static).
      blocks: number of equal row-major chunks with their own statistics (static).
      std_mode: "population" or "unbiased" (static).

    Returns:
      The quantized weights, same shape and dtype as ``w``.
    """
    return quantize_with_codes(w, bits, blocks=blocks, std_mode=std_mode)[0]


def _quantize_fwd(w, bits, blocks, std_mode):
    bits = check_bits(bits)
    _check_std_mode(std_mode)
    cdt = _compute_dtype(w.dtype)
    wb = _blocked(jnp.asarray(w, cdt), blocks)
    mu, sigma, denom, centred, _ = _stats(wb, std_mode)
    wp = centred / denom
    _, q = _nearest(wp, bits)
    w_hat = (q * sigma + mu).reshape(w.shape).astype(w.dtype)
    return w_hat, (wp, q, sigma, denom)


def _quantize_bwd(bits, blocks, std_mode, res, g):
    wp, q, sigma, denom = res
    gb = g.astype(wp.dtype).reshape(wp.shape)
    m = wp.shape[1]
    n_dof = m - 1 if (std_mode == "unbiased" and m > 1) else m
    # w_hat = r * (w - mu) + mu + sigma * sg(q - w'),  r = sigma / denom.
    r = jnp.where(sigma > 0, sigma / denom, 1.0)
    sum_g = jnp.sum(gb, axis=1, keepdims=True)
    sum_gd = jnp.sum(gb * (q - wp), axis=1, keepdims=True)
    if std_mode == "unbiased":
        # d r / d sigma = eps / denom^2, and (w_i - mu) = w'_i * denom.
        sum_gd = sum_gd + jnp.sum(gb * wp, axis=1, keepdims=True) * UNBIASED_EPS / denom
    # d sigma / d w_k = (w_k - mu) / (n_dof * sigma) = w'_k * denom / (n_dof * sigma).
    dsigma = jnp.where(sigma > 0, wp * denom / (n_dof * jnp.where(sigma > 0, sigma, 1.0)), 0.0)
    gw = r * gb + (1.0 - r) * sum_g / m + dsigma * sum_gd
    return (gw.reshape(g.shape).astype(g.dtype),)


quantize.defvjp(_quantize_fwd, _quantize_bwd)


def quantize_ste_reference(w, bits: int, blocks: int = 1, std_mode: str = "population"):
    """Straight-through formulation differentiated by autodiff (for tests and as documentation).

    ``w_hat = (w' + stop_gradient(q(w') - w')) * sigma + mu``; autodiff through mu and sigma.
    """
    cdt = _compute_dtype(w.dtype)
    wb = _blocked(jnp.asarray(w, cdt), blocks)
    mu, sigma, denom, centred, _ = _stats(wb, std_mode)
    wp = centred / denom
    _, q = _nearest(jax.lax.stop_gradient(wp), bits)
    w_hat = (wp + jax.lax.stop_gradient(q - wp)) * sigma + mu
    return w_hat.reshape(w.shape).astype(w.dtype)


def dequantize(indices, mu, sigma, bits: int) -> np.ndarray:
    """Rebuilds weights from stored codes (Eq. 9): ``c[j] * sigma + mu`` per block, in NumPy.

    Args:
      indices: integer code indices, any shape (blocks are equal row-major chunks).
      mu, sigma: per-block statistics, shape ``[blocks]`` (float32 as stored).
      bits: 1..8.

    Returns:
      float32 array of ``indices``' shape. Deterministic: the same inputs always give the same
      bits, so a model rebuilt from a task file reproduces the materialised weights exactly.
    """
    levels = np.asarray(codebook(bits)[0], np.float32)
    idx = np.asarray(indices)
    if idx.size and (idx.min() < 0 or idx.max() >= levels.size):
        raise ValueError(f"code index out of range for {bits}-bit codebook")
    mu = np.asarray(mu, np.float32).reshape(-1, 1)
    sigma = np.asarray(sigma, np.float32).reshape(-1, 1)
    blocks = mu.shape[0]
    if idx.size % blocks:
        raise ValueError(f"{idx.size} codes cannot be split into {blocks} blocks")
    out = levels[idx.reshape(blocks, -1)] * sigma + mu
    return out.astype(np.float32).reshape(idx.shape)


def materialize(w, bits: int, *, blocks: int = 1, std_mode: str = "population") -> np.ndarray:
    """Evaluation form of a quantized weight: codes and float32 stats, then :func:`dequantize`."""
    _, idx, mu, sigma = quantize_with_codes(
        jnp.asarray(w, jnp.float32), bits, blocks=blocks, std_mode=std_mode
    )
    return dequantize(
        np.asarray(idx), np.asarray(mu, np.float32), np.asarray(sigma, np.float32), bits
    )


def packed_size(n: int, bits: int) -> int:
    """Bytes needed to pack ``n`` codes of ``bits`` bits (bit stream, rounded up to a byte)."""
    return (n * check_bits(bits) + 7) // 8


def pack(indices, bits: int) -> np.ndarray:
    """Packs integer codes into a uint8 bit stream, LSB-first.

    Element ``i`` (row-major) occupies bits ``i*bits .. i*bits+bits-1`` of the stream, where bit
    ``k`` of the stream is bit ``k % 8`` of byte ``k // 8``. Trailing bits of the last byte are 0.

    Args:
      indices: integers in ``[0, 2**bits)``, any shape.
      bits: 1..8.

    Returns:
      uint8 array of ``packed_size(indices.size, bits)`` bytes.
    """
    bits = check_bits(bits)
    idx = np.asarray(indices).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits}-bit packing")
    idx = idx.astype(np.uint8)
    bit_planes = (idx[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # [n, bits], LSB first
    return np.packbits(bit_planes.reshape(-1), bitorder="little")


def unpack(data, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack`: the first ``count`` codes of a packed stream, as int32.

    Raises ValueError when ``data`` is shorter than ``packed_size(count, bits)``.
    """
    bits = check_bits(bits)
    buf = np.frombuffer(bytes(data), np.uint8) if not isinstance(data, np.ndarray) else data
    need = packed_size(count, bits)
    if buf.size < need:
        raise ValueError(f"packed data holds {buf.size} bytes, {need} needed for {count} codes")
    stream = np.unpackbits(buf[:need].astype(np.uint8), bitorder="little")[: count * bits]
    planes = stream.reshape(count, bits).astype(np.int32)
    return (planes << np.arange(bits, dtype=np.int32)).sum(axis=1).astype(np.int32)
