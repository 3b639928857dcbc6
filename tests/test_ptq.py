"""Post-training quantization: k-means vs Gaussian codebook, and PTQ task files."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitpet import ptq, quant, taskfile
from bitpet.checkpoints import TASK_PARAM_RE
from bitpet.models import vit


def _matrix(kind: str, shape, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = {
        "normal": lambda: rng.normal(0.01, 0.05, shape),
        "lognormal": lambda: rng.lognormal(-3, 1.0, shape),  # strongly right-skewed
        "exponential": lambda: -rng.exponential(0.02, shape),  # left-skewed
        "bimodal": lambda: rng.normal(0, 0.01, shape) + rng.choice([-0.1, 0.2], shape),
        "outliers": lambda: rng.normal(0, 0.01, shape) * (1 + 50 * (rng.random(shape) < 0.02)),
        "uniform": lambda: rng.uniform(-1, 1, shape),
        "few_values": lambda: rng.integers(-2, 3, shape) * 0.01,
    }[kind]()
    return w.astype(np.float32)


def _sse(a, b):
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(np.sum(d * d))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(
        ["normal", "lognormal", "exponential", "bimodal", "outliers", "uniform", "few_values"]
    ),
    shape=st.sampled_from([(1, 7), (37, 5)]),  # few shapes: few XLA compiles
    bits=st.sampled_from([1, 1, 2, 2, 3, 4, 8]),
    std_mode=st.sampled_from(["population", "unbiased"]),
    seed=st.integers(0, 2**16),
)
def test_kmeans_never_worse_than_gaussian(kind, shape, bits, std_mode, seed):
    w = _matrix(kind, shape, seed)
    g_hat, *_ = ptq.gaussian_quantize(w, bits, std_mode=std_mode)
    k_hat, codes, levels = ptq.kmeans_quantize(w, bits, std_mode=std_mode)
    assert _sse(w, k_hat) <= _sse(w, g_hat)
    assert levels.shape == (2**bits,) and levels.dtype == np.float32
    assert np.all(np.diff(levels) >= 0)
    assert codes.shape == w.shape and codes.min() >= 0 and codes.max() < 2**bits
    assert np.array_equal(k_hat, levels[codes])


def test_kmeans_is_a_lloyd_fixed_point_and_beats_gaussian_on_skewed_data():
    w = _matrix("lognormal", (64, 48), 3)
    for bits in (1, 2, 4):
        k_hat, codes, levels = ptq.kmeans_quantize(w, bits)
        g_hat, *_ = ptq.gaussian_quantize(w, bits)
        assert _sse(w, k_hat) < 0.9 * _sse(w, g_hat)  # a real gain on skewed weights
        for j in np.unique(codes):  # every used level is the mean of its cell
            np.testing.assert_allclose(levels[j], w[codes == j].mean(), rtol=1e-5, atol=1e-7)


def test_lloyd_is_deterministic():
    x = _matrix("bimodal", (500,), 0)
    a = ptq.lloyd(x, np.quantile(x, [0.25, 0.75]))
    b = ptq.lloyd(x, np.quantile(x, [0.25, 0.75]))
    assert np.array_equal(a, b)


def _fp_model(kind, head_bits=32):
    return vit.VisionTransformer(
        num_classes=6,
        variant="testing",
        adapter=vit.AdapterSpec(kind=kind, hidden=4, bits=32, scale=0.5),
        head_bits=head_bits,
    )


def _params(model, seed=0):
    rng = np.random.default_rng(seed)
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    shapes = vit.param_names(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    flat = {}
    for n, s in shapes.items():
        w = rng.normal(0, 0.1, s.shape)
        if TASK_PARAM_RE.fullmatch(n):
            w = rng.lognormal(-2, 0.8, s.shape) * rng.choice([-1, 1], s.shape) * 0.3
        flat[n] = jnp.asarray(w.astype(np.float32))
    return vit.unflatten(flat)


def test_gaussian_ptq_equals_materialize_params():
    model = _fp_model("lora")
    params = _params(model)
    res = ptq.ptq(model, params, 2, codebook="gaussian", blocks=2)
    qmodel = model.clone(adapter=res.model.adapter)
    ref_model, ref_params = vit.materialize_params(qmodel, params)
    assert res.model == ref_model
    ref, got = vit.param_names(ref_params), vit.param_names(res.params)
    assert set(ref) == set(got)
    for n in ref:
        assert np.array_equal(np.asarray(ref[n]), np.asarray(got[n])), n


@pytest.mark.parametrize("kind,bits,codebook,head_bits", [
    ("adaptformer", 1, "kmeans", 32),
    ("lora", 2, "kmeans", 1),
    ("adaptformer", 4, "gaussian", 32),
])  # fmt: skip
def test_ptq_task_file_round_trip(tmp_path, kind, bits, codebook, head_bits):
    model = _fp_model(kind, head_bits)
    params = _params(model, seed=bits)
    res = ptq.ptq(model, params, bits, codebook=codebook)
    assert res.model.materialized and res.model.adapter.bits == bits
    path = tmp_path / "ptq.bitpet"
    n = ptq.write(path, res, task="dtd")
    tf = taskfile.read(path)
    assert tf.method == f"ptq-{codebook}" and tf.meta["bits"] == bits
    cbs = {r.spec.codebook for name, r in tf.records.items() if "encoderblock" in name}
    assert cbs == {codebook}
    # k-means stores 2**b float32 levels per matrix instead of mu/sigma.
    stats = 4 * 2**bits if codebook == "kmeans" else 8
    n_mat = 24 // 12 * 2 if kind == "adaptformer" else 8
    numel = 32 * 4
    assert taskfile.size_report(tf).adapter_bytes == n_mat * (numel * bits // 8 + stats)
    assert n == tf.nbytes
    got_model, got_params = taskfile.load_into(tf, params)
    assert got_model == res.model
    x = jnp.asarray(np.random.default_rng(0).random((2, 16, 16, 3)), jnp.float32)
    ref = res.model.apply({"params": res.params}, x)
    out = got_model.apply({"params": got_params}, x)
    assert np.array_equal(np.asarray(ref), np.asarray(out))
    # The Gaussian codebook's per-matrix error is never below k-means'.
    if codebook == "kmeans":
        g = ptq.ptq(model, params, bits, codebook="gaussian")
        for name, err in res.sse.items():
            assert err <= g.sse[name]


def test_ptq_rejects_non_fp_models():
    q = vit.VisionTransformer(
        num_classes=3, variant="testing", adapter=vit.AdapterSpec(kind="lora", hidden=4, bits=1)
    )
    with pytest.raises(ValueError, match="full-precision"):
        ptq.ptq(q, {}, 1)
    with pytest.raises(ValueError, match="bits"):
        ptq.ptq(_fp_model("lora"), {}, 9)
    with pytest.raises(ValueError, match="has none"):
        ptq.ptq(vit.VisionTransformer(num_classes=3, variant="testing"), {}, 1)


def test_kmeans_codebook_differs_from_gaussian():
    w = _matrix("lognormal", (32, 32), 1)
    _, _, levels = ptq.kmeans_quantize(w, 1)
    _, _, mu, sigma = ptq.gaussian_quantize(w, 1)
    g_levels = np.asarray(quant.codebook(1)[0], np.float32) * sigma[0] + mu[0]
    assert not np.allclose(levels, g_levels)
