"""Tests of the Gaussian-codebook quantizer (bitpet.quant), paper §4.2, Eq. 3-9."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitpet import quant

ALL_BITS = list(range(1, 9))
ALLOWED_MSG = "[1, 2, 3, 4, 5, 6, 7, 8]"

# REFERENCE.md's table (k-medians of N(0, 1)); positive halves, the codebooks are symmetric.
TABLE = {
    1: ([0.674490], []),
    2: ([0.377754, 1.265720], [0.821737]),
    4: (
        [0.105550, 0.319036, 0.540072, 0.775192, 1.034006, 1.333107, 1.707738, 2.265491],
        [0.212293, 0.429554, 0.657632, 0.904599, 1.183556, 1.520422, 1.986614],
    ),
}


def _symmetric(pos: list[float], zero: bool) -> np.ndarray:
    pos = np.asarray(pos, np.float64)
    return np.concatenate([-pos[::-1], [0.0] if zero else [], pos])


# ----------------------------------------------------------------------------- codebook


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_codebook_matches_reference_table(bits):
    levels, bounds = quant.codebook(bits)
    pos_levels, pos_bounds = TABLE[bits]
    np.testing.assert_allclose(levels, _symmetric(pos_levels, zero=False), atol=1e-5, rtol=0)
    np.testing.assert_allclose(bounds, _symmetric(pos_bounds, zero=True), atol=1e-5, rtol=0)


def test_codebook_1bit_is_gaussian_quartile():
    # Phi^-1(0.75): the median of the positive half-normal.
    levels, _ = quant.codebook(1)
    np.testing.assert_allclose(levels, [-0.6744897501960817, 0.6744897501960817], atol=1e-9)


def test_codebook_8bit_is_converged_k_medians():
    levels, bounds = quant.codebook(8)
    assert levels.shape == (256,) and bounds.shape == (255,)
    assert np.unique(levels).size == 256
    assert np.all(np.diff(levels) > 0)
    np.testing.assert_array_equal(levels, -levels[::-1])
    # A converged run ends near +-3.8; the released code's 500 iterations from zeros stop at 2.81.
    assert abs(levels[-1] - 3.8) < 0.05 and abs(levels[0] + 3.8) < 0.05


def test_codebook_is_fixed_point_of_median_update():
    # Each level is the conditional median of N(0, 1) in its cell (k-medians, not k-means).
    from scipy import special

    for bits in ALL_BITS:
        levels, bounds = quant.codebook(bits)
        cdf = np.concatenate([[0.0], special.ndtr(bounds), [1.0]])
        medians = special.ndtri(0.5 * (cdf[1:] + cdf[:-1]))
        np.testing.assert_allclose(levels, medians, atol=1e-6)
    # k-means would put the 1-bit level at E|z| = sqrt(2/pi) = 0.798, not at 0.674.
    assert abs(quant.codebook(1)[0][1] - np.sqrt(2 / np.pi)) > 0.1


@pytest.mark.parametrize("bits", ALL_BITS)
def test_codebook_sorted_symmetric_midpoints(bits):
    levels, bounds = quant.codebook(bits)
    assert levels.dtype == np.float64 and levels.shape == (2**bits,)
    assert bounds.shape == (2**bits - 1,)
    assert np.all(np.diff(levels) > 0)
    np.testing.assert_allclose(levels, -levels[::-1], atol=1e-12)
    np.testing.assert_allclose(bounds, 0.5 * (levels[1:] + levels[:-1]), atol=1e-12)
    assert np.all((bounds > levels[:-1]) & (bounds < levels[1:]))


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_codebook_cached_and_read_only(bits):
    a = quant.codebook(bits)
    b = quant.codebook(bits)
    assert a[0] is b[0] and a[1] is b[1]
    for arr in a:
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 123.0
    assert quant.codebook(bits)[0][0] != 123.0


@pytest.mark.parametrize("bad", [0, 9, 16, 32, 3.5, True, False, -1])
def test_invalid_bits_raise_with_allowed_values(bad):
    w = jnp.ones((4, 4), jnp.float32) * jnp.arange(16.0).reshape(4, 4)
    for call in (
        lambda: quant.codebook(bad),
        lambda: quant.check_bits(bad),
        lambda: quant.quantize(w, bad),
        lambda: quant.quantize_with_codes(w, bad),
        lambda: jax.grad(lambda x: quant.quantize(x, bad).sum())(w),
        lambda: quant.pack(np.zeros(4, np.int32), bad),
        lambda: quant.materialize(w, bad),
    ):
        with pytest.raises(ValueError, match=re.escape(f"allowed values are {ALLOWED_MSG}")):
            call()


def test_invalid_std_mode_and_blocks_raise():
    w = jnp.arange(12.0).reshape(3, 4)
    with pytest.raises(ValueError, match="population"):
        quant.quantize(w, 2, 1, "sample")
    with pytest.raises(ValueError, match="population"):
        jax.grad(lambda x: quant.quantize(x, 2, 1, "sample").sum())(w)
    for blocks in (0, 5, -2):
        with pytest.raises(ValueError, match="divisor"):
            quant.quantize(w, 2, blocks)
        with pytest.raises(ValueError, match="divisor"):
            jax.grad(lambda x, b=blocks: quant.quantize(x, 2, b).sum())(w)


# ----------------------------------------------------------------------------- gradients


def _grad_cases():
    """Every bit-width twice; each (std_mode, one block / several blocks) pair 4 times."""
    rng = np.random.default_rng(1234)
    cases = []
    for bits in ALL_BITS:
        for std_mode, multi_block in (
            [("population", False), ("unbiased", True)]
            if bits % 2
            else [("population", True), ("unbiased", False)]
        ):
            rows = int(rng.integers(1, 6))
            cols = int(rng.integers(2, 9))
            if multi_block:
                rows = 2 * rows  # the flattened size is divisible by 2 and by rows
                blocks = int(rng.choice([2, rows]))
            else:
                blocks = 1
            cases.append((bits, std_mode, (rows, cols), blocks, int(rng.integers(1 << 30))))
    return cases


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _both_vjps(w, g, bits, blocks, std_mode):
    """(forward, gradient) of the custom_vjp quantizer and of the autodiff STE reference."""
    out, vjp = jax.vjp(lambda x: quant.quantize(x, bits, blocks, std_mode), w)
    ref, ref_vjp = jax.vjp(lambda x: quant.quantize_ste_reference(x, bits, blocks, std_mode), w)
    return out, vjp(g)[0], ref, ref_vjp(g)[0]


@pytest.mark.parametrize("bits,std_mode,shape,blocks,seed", _grad_cases())
def test_custom_vjp_matches_autodiff_of_straight_through(x64, bits, std_mode, shape, blocks, seed):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(0.3, 2.0, shape), jnp.float64)
    g = jnp.asarray(rng.normal(size=shape), jnp.float64)
    out, grad, ref_out, ref_grad = _both_vjps(w, g, bits, blocks, std_mode)
    assert out.dtype == jnp.float64 and grad.dtype == jnp.float64
    np.testing.assert_allclose(out, ref_out, atol=1e-12)
    np.testing.assert_allclose(grad, ref_grad, atol=1e-6, rtol=0)
    # Not the plain straight-through estimator: mu and sigma carry gradient too.
    assert np.max(np.abs(np.asarray(grad) - np.asarray(g))) > 1e-6


def test_gradient_under_jit_and_keyword_arguments(x64):
    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.normal(size=(6, 8)), jnp.float64)
    f = lambda x: jnp.sum(jnp.sin(quant.quantize(x, 3, blocks=4, std_mode="unbiased")))
    r = lambda x: jnp.sum(jnp.sin(quant.quantize_ste_reference(x, 3, 4, "unbiased")))
    np.testing.assert_allclose(jax.jit(jax.grad(f))(w), jax.jit(jax.grad(r))(w), atol=1e-9)


def _numpy_eq8_jacobian(w: np.ndarray, bits: int) -> np.ndarray:
    """Eq. (8), written out independently: d w_hat_i / d w_k = [i==k] + w'_k (q_i - w'_i) / m."""
    flat = w.reshape(-1).astype(np.float64)
    m = flat.size
    mu = flat.sum() / m
    sigma = np.sqrt(((flat - mu) ** 2).sum() / m)  # population std
    wp = (flat - mu) / sigma
    levels, _ = quant.codebook(bits)
    q = levels[np.argmin(np.abs(wp[:, None] - levels[None, :]), axis=1)]
    jac = np.eye(m)
    for i in range(m):
        for k in range(m):
            jac[i, k] += wp[k] * (q[i] - wp[i]) / m
    return jac


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_full_jacobian_equals_eq8(x64, bits):
    rng = np.random.default_rng(bits)
    w = rng.normal(0.1, 0.05, (4, 6))  # 24 elements, as in REFERENCE.md
    jac = jax.jit(jax.jacrev(lambda x: quant.quantize(x, bits)))(jnp.asarray(w, jnp.float64))
    jac = np.asarray(jac).reshape(w.size, w.size)
    expected = _numpy_eq8_jacobian(w, bits)
    np.testing.assert_allclose(jac, expected, atol=1e-10, rtol=0)
    # The mu/sigma terms matter (they shrink with the rounding error, ~1e-4 at 8 bits).
    assert np.max(np.abs(expected - np.eye(w.size))) > (1e-3 if bits < 8 else 1e-5)


def test_unbiased_jacobian_differs_slightly_from_eq8(x64):
    # REFERENCE: torch's unbiased std with sigma + 1e-5 changes the Jacobian by ~1e-3 (m = 24).
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 6))
    jac = jax.jit(jax.jacrev(lambda x: quant.quantize(x, 1, 1, "unbiased")))(jnp.asarray(w))
    diff = np.abs(np.asarray(jac).reshape(24, 24) - _numpy_eq8_jacobian(w, 1)).max()
    assert 1e-5 < diff < 1e-1


# ----------------------------------------------------------------------------- forward


def _block_stats(w: np.ndarray, blocks: int):
    wb = w.reshape(blocks, -1).astype(np.float64)
    mu = wb.mean(axis=1, keepdims=True)
    sigma = np.sqrt(((wb - mu) ** 2).mean(axis=1, keepdims=True))
    return wb, mu, sigma


@pytest.mark.parametrize("bits,blocks", [(b, 1 if b % 2 else 4) for b in ALL_BITS])
def test_forward_values_are_codebook_levels(bits, blocks):
    rng = np.random.default_rng(100 + bits)
    w = rng.normal(-0.2, 0.7, (32, 40)).astype(np.float32)
    w_hat, idx, mu, sigma = quant.quantize_with_codes(jnp.asarray(w), bits, blocks=blocks)
    w_hat, idx = np.asarray(w_hat), np.asarray(idx)
    assert w_hat.dtype == np.float32 and w_hat.shape == w.shape
    assert idx.dtype == np.int32 and idx.min() >= 0 and idx.max() < 2**bits
    np.testing.assert_array_equal(w_hat, np.asarray(quant.quantize(jnp.asarray(w), bits, blocks)))

    levels, bounds = quant.codebook(bits)
    wb, mu64, sigma64 = _block_stats(w, blocks)
    np.testing.assert_allclose(np.asarray(mu), mu64[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(sigma), sigma64[:, 0], rtol=1e-5)
    hat_b, idx_b = w_hat.reshape(blocks, -1), idx.reshape(blocks, -1)
    for j in range(blocks):
        assert np.unique(hat_b[j]).size <= 2**bits
        np.testing.assert_allclose(
            hat_b[j], levels[idx_b[j]] * sigma64[j] + mu64[j], rtol=2e-6, atol=2e-6
        )
    # Each index is the nearest level of the standardised weight (ties only within float error).
    wp = (wb - mu64) / sigma64
    nearest = np.argmin(np.abs(wp[..., None] - levels), axis=-1)
    differ = nearest != idx_b
    if differ.any():
        dist = np.min(np.abs(wp[differ][:, None] - bounds[None, :]), axis=1)
        assert np.all(dist < 1e-5), dist
    assert differ.mean() < 1e-3


def test_forward_uses_every_level_and_blocks_are_independent():
    rng = np.random.default_rng(5)
    a = rng.normal(0.0, 1.0, 4096).astype(np.float32)
    b = rng.normal(50.0, 0.01, 4096).astype(np.float32)
    w = np.stack([a, b])
    out = np.asarray(quant.quantize(jnp.asarray(w), 2, 2))
    assert np.unique(out[0]).size == 4 and np.unique(out[1]).size == 4
    np.testing.assert_allclose(out[1].mean(), 50.0, atol=1e-3)
    # One block: the second row collapses to a single value (2 levels around mu ~ 25 +- 25).
    one = np.asarray(quant.quantize(jnp.asarray(w), 2, 1))
    assert np.unique(one).size <= 4 and np.unique(one[1]).size == 1


@pytest.mark.parametrize("std_mode", quant.STD_MODES)
@pytest.mark.parametrize("value", [0.0, 0.3, -7.25])
def test_constant_matrix_is_finite(std_mode, value):
    w = jnp.full((5, 7), value, jnp.float32)
    out = quant.quantize(w, 1, 1, std_mode)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, value, atol=1e-5)
    g = jax.grad(
        lambda x: jnp.sum(quant.quantize(x, 1, 1, std_mode) * jnp.arange(35.0).reshape(5, 7))
    )(w)
    assert np.all(np.isfinite(g))


def test_jit_and_vmap():
    rng = np.random.default_rng(11)
    ws = jnp.asarray(rng.normal(size=(3, 8, 6)), jnp.float32)
    eager = np.stack([np.asarray(quant.quantize(w, 2, 2)) for w in ws])
    jitted = jax.jit(quant.quantize, static_argnums=(1, 2, 3))
    np.testing.assert_allclose(np.stack([jitted(w, 2, 2) for w in ws]), eager, rtol=1e-6)
    vmapped = jax.jit(jax.vmap(lambda w: quant.quantize(w, 2, 2)))(ws)
    np.testing.assert_allclose(vmapped, eager, rtol=1e-6)
    # Gradients batch too, and each matrix only sees its own statistics.
    grad = jax.grad(lambda w: jnp.sum(jnp.cos(quant.quantize(w, 2, 2))))
    gv = jax.jit(jax.vmap(grad))(ws)
    gj = jax.jit(grad)
    ge = np.stack([np.asarray(gj(w)) for w in ws])
    np.testing.assert_allclose(gv, ge, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ge[0], ge[1])


@pytest.mark.parametrize("bits", [1, 4])
def test_bfloat16_inputs(bits):
    rng = np.random.default_rng(13)
    w32 = jnp.asarray(rng.normal(0.0, 0.02, (64, 16)), jnp.float32)
    w16 = w32.astype(jnp.bfloat16)
    out16 = quant.quantize(w16, bits)
    assert out16.dtype == jnp.bfloat16 and out16.shape == w16.shape
    # Statistics run in float32: exactly the float32 result on the bf16 values, rounded to bf16.
    np.testing.assert_array_equal(
        np.asarray(out16, np.float32),
        np.asarray(quant.quantize(w16.astype(jnp.float32), bits).astype(jnp.bfloat16), np.float32),
    )
    # Close to the float32 quantization of the unrounded weights (a few elements may switch cell).
    ref = np.asarray(quant.quantize(w32, bits))
    diff = np.abs(np.asarray(out16, np.float32) - ref)
    assert np.mean(diff < 1e-2 * np.abs(ref).max()) > 0.95
    assert np.median(diff) <= 0.01 * np.abs(ref).max()
    g = jax.grad(lambda x: jnp.sum(quant.quantize(x, bits).astype(jnp.float32) ** 2))(w16)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


# ----------------------------------------------------------------------------- pack / unpack


def _stream_reference(codes: np.ndarray, bits: int) -> bytes:
    """Continuous LSB-first bit stream: element i occupies bits [i*b, (i+1)*b)."""
    value = 0
    for i, c in enumerate(codes.tolist()):
        value |= int(c) << (i * bits)
    return value.to_bytes((codes.size * bits + 7) // 8, "little")


@settings(max_examples=150, deadline=None, database=None)
@given(data=st.data(), bits=st.integers(1, 8), n=st.integers(0, 300))
def test_pack_unpack_roundtrip(data, bits, n):
    codes = np.asarray(
        data.draw(st.lists(st.integers(0, 2**bits - 1), min_size=n, max_size=n)), np.int64
    )
    packed = quant.pack(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == quant.packed_size(n, bits) == (n * bits + 7) // 8
    assert packed.tobytes() == _stream_reference(codes, bits)
    out = quant.unpack(packed, bits, n)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, codes)
    np.testing.assert_array_equal(quant.unpack(packed.tobytes(), bits, n), codes)
    # Extra trailing bytes are ignored; too few raise.
    np.testing.assert_array_equal(quant.unpack(np.append(packed, np.uint8(255)), bits, n), codes)
    if n:
        with pytest.raises(ValueError, match="needed"):
            quant.unpack(packed[:-1], bits, n)
        with pytest.raises(ValueError, match="needed"):
            quant.unpack(packed.tobytes()[:-1], bits, n)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_layout_matches_release(bits):
    # REFERENCE: element i at bit (i mod (8/b)) * b of byte i * b // 8 (LSB-first).
    rng = np.random.default_rng(bits)
    n = 203
    codes = rng.integers(0, 2**bits, n)
    expected = np.zeros((n * bits + 7) // 8, np.uint8)
    per_byte = 8 // bits
    for i, c in enumerate(codes):
        expected[i * bits // 8] |= np.uint8(int(c) << ((i % per_byte) * bits))
    np.testing.assert_array_equal(quant.pack(codes, bits), expected)
    np.testing.assert_array_equal(quant.pack(codes.reshape(7, 29), bits), expected)


def test_pack_examples_and_errors():
    assert quant.pack([1, 0, 0, 0, 0, 0, 0, 1, 1], 1).tolist() == [0b10000001, 0b1]
    assert quant.pack([3, 0, 1, 2], 2).tolist() == [0b10010011]
    assert quant.pack([0xA, 0x5], 4).tolist() == [0x5A]
    assert quant.pack([7, 1], 3).tolist() == [0b001111]
    for bad in ([2], [-1]):
        with pytest.raises(ValueError, match=r"\[0, 2\)"):
            quant.pack(bad, 1)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        quant.pack([256], 8)


@pytest.mark.parametrize(
    "bits,blocks,std_mode",
    [(b, (1, 3)[b % 2], quant.STD_MODES[(b // 2) % 2]) for b in ALL_BITS],
)
def test_dequantize_materialize_forward_agree(bits, blocks, std_mode):
    rng = np.random.default_rng(bits * 10 + blocks)
    w = rng.normal(0.01, 0.3, (12, 9)).astype(np.float32)
    w_hat, idx, mu, sigma = quant.quantize_with_codes(
        jnp.asarray(w), bits, blocks=blocks, std_mode=std_mode
    )
    assert mu.shape == (blocks,) and sigma.shape == (blocks,)
    # What a task file stores: packed codes + float32 mu and sigma.
    codes = quant.unpack(quant.pack(np.asarray(idx), bits), bits, w.size).reshape(w.shape)
    deq = quant.dequantize(codes, np.asarray(mu, np.float32), np.asarray(sigma, np.float32), bits)
    mat = quant.materialize(w, bits, blocks=blocks, std_mode=std_mode)
    assert deq.dtype == np.float32 and mat.dtype == np.float32 and deq.shape == w.shape
    np.testing.assert_array_equal(deq, mat)
    np.testing.assert_allclose(deq, np.asarray(w_hat), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        mat,
        np.asarray(quant.quantize(jnp.asarray(w), bits, blocks, std_mode)),
        rtol=1e-6,
        atol=1e-7,
    )
    for j in range(blocks):
        assert np.unique(mat.reshape(blocks, -1)[j]).size <= 2**bits


def test_dequantize_rejects_bad_codes():
    with pytest.raises(ValueError, match="out of range"):
        quant.dequantize(np.array([0, 4]), [0.0], [1.0], 2)
    with pytest.raises(ValueError, match="blocks"):
        quant.dequantize(np.array([0, 1, 2]), [0.0, 0.0], [1.0, 1.0], 2)
