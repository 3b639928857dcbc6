"""Tests of the ViT backbone with adapter hooks (bitpet.models.vit / adapters)."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitpet.models import vit
from bitpet.models.vit import AdapterSpec, VisionTransformer

IMG = 16  # "testing" variant (patch 4): a 4x4 grid, 17 tokens


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _shapes(model: VisionTransformer, image_size: int):
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def _image_size(v: vit.Variant) -> int:
    # The real backbones at 224 px; the tiny test variants at a small size of their own.
    return 224 if v.patch_size >= 16 else 8 * v.patch_size


def expected_param_count(v: vit.Variant, image_size: int, num_classes: int) -> int:
    """The architecture formula, written out by hand."""
    d, p, L, mlp = v.hidden_size, v.patch_size, v.num_layers, v.mlp_dim
    tokens = (image_size // p) ** 2 + 1
    patch = p * p * 3 * d + d  # conv kernel + bias
    cls = d
    posemb = tokens * d
    block = (
        2 * (2 * d)  # LayerNorm_0, LayerNorm_2: scale + bias
        + 3 * (d * d + d)  # query, key, value
        + (d * d + d)  # out
        + (d * mlp + mlp)  # MlpBlock_3/Dense_0
        + (mlp * d + d)  # MlpBlock_3/Dense_1
    )
    encoder_norm = 2 * d
    head = d * num_classes + num_classes
    return patch + cls + posemb + L * block + encoder_norm + head


# Pinned integers (1000-class head, adapter none): timm's well-known counts for the real ones.
PINNED = {
    "Ti/16": 5_717_416,
    "S/16": 22_050_664,
    "B/16": 86_567_656,
    "L/16": 304_326_632,
    "testing": 53_832,
}


@pytest.mark.parametrize("name", sorted(vit.VARIANTS))
def test_parameter_count_per_variant(name):
    v = vit.VARIANTS[name]
    size = _image_size(v)
    params = _shapes(VisionTransformer(num_classes=1000, variant=name), size)
    n = _count(params)
    assert n == expected_param_count(v, size, 1000)
    if name in PINNED:
        assert n == PINNED[name]


def test_b16_parameter_count_pinned():
    params = _shapes(VisionTransformer(num_classes=1000, variant="B/16"), 224)
    assert _count(params) == 86_567_656
    flat = vit.param_names(params)
    assert flat["Transformer/posembed_input/pos_embedding"].shape == (1, 197, 768)
    assert flat["embedding/kernel"].shape == (16, 16, 3, 768)
    assert flat["head/kernel"].shape == (768, 1000)


@functools.cache
def _count_for(
    variant: str, size: int, kind: str = "none", h: int = 8, bits: int = 32, head_bits=32
):
    model = VisionTransformer(
        num_classes=10,
        variant=variant,
        adapter=AdapterSpec(kind, hidden=h, bits=bits),
        head_bits=head_bits,
    )
    return _count(_shapes(model, size))


@pytest.mark.parametrize(
    "variant,size,h,bits", [("B/16", 224, 8, 1), ("B/16", 224, 1, 32), ("testing", 16, 3, 2)]
)
def test_adapter_parameter_counts(variant, size, h, bits):
    v = vit.VARIANTS[variant]
    L, d = v.num_layers, v.hidden_size
    base = _count_for(variant, size)
    assert _count_for(variant, size, "adaptformer", h, bits) - base == L * 2 * d * h
    assert _count_for(variant, size, "lora", h, bits) - base == L * 4 * d * h
    # A quantized head has no bias.
    assert base - _count_for(variant, size, head_bits=1) == 10


def test_adapter_kernel_shapes():
    for kind, n in (("adaptformer", 2), ("lora", 4)):
        model = VisionTransformer(
            num_classes=10, variant="testing", adapter=AdapterSpec(kind, hidden=3, bits=1)
        )
        flat = vit.param_names(_shapes(model, IMG))
        kernels = {k: x.shape for k, x in flat.items() if re.search(r"/(down|up)/kernel$", k)}
        assert len(kernels) == 2 * n
        assert sorted(set(kernels.values())) == [(3, 32), (32, 3)]
        for k, shape in kernels.items():  # down: d -> h, up: h -> d (flax (in, out) layout)
            assert shape == ((32, 3) if "/down/" in k else (3, 32)), k


def _expected_names(num_layers: int, kind: str, head_bias: bool = True) -> set[str]:
    names = {"cls", "embedding/kernel", "embedding/bias", "head/kernel"}
    names |= {"head/bias"} if head_bias else set()
    names |= {"Transformer/posembed_input/pos_embedding"}
    names |= {"Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias"}
    for i in range(num_layers):
        b = f"Transformer/encoderblock_{i}"
        att = f"{b}/MultiHeadDotProductAttention_1"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            names |= {f"{b}/{ln}/scale", f"{b}/{ln}/bias"}
        for proj in ("query", "key", "value", "out"):
            names |= {f"{att}/{proj}/kernel", f"{att}/{proj}/bias"}
        for dense in ("Dense_0", "Dense_1"):
            names |= {f"{b}/MlpBlock_3/{dense}/kernel", f"{b}/MlpBlock_3/{dense}/bias"}
        if kind == "adaptformer":
            names |= {f"{b}/adaptformer/down/kernel", f"{b}/adaptformer/up/kernel"}
        if kind == "lora":
            for branch in ("lora_q", "lora_v"):
                names |= {f"{att}/{branch}/down/kernel", f"{att}/{branch}/up/kernel"}
    return names


@pytest.mark.parametrize("kind", vit.ADAPTERS)
@pytest.mark.parametrize("remat", [False, True])
def test_explicit_parameter_names(kind, remat):
    model = VisionTransformer(
        num_classes=5, variant="testing", adapter=AdapterSpec(kind, hidden=2, bits=1), remat=remat
    )
    names = set(vit.param_names(_shapes(model, IMG)))
    assert names == _expected_names(2, kind)
    # No auto-generated flax names anywhere (Dense_2, DenseGeneral_0, AdapterDense_0, ...).
    assert not any(
        re.search(r"Dense_[2-9]|DenseGeneral|AdapterDense|Bottleneck|Conv_", n) for n in names
    )
    qhead = VisionTransformer(
        num_classes=5, variant="testing", adapter=AdapterSpec(kind), head_bits=1
    )
    assert set(vit.param_names(_shapes(qhead, IMG))) == _expected_names(2, kind, head_bias=False)


# ----------------------------------------------------------------------------- behaviour
# Forward and backward passes run op by op (no jit) unless jit is what is tested: the tiny
# model's per-op compilations are shared by all tests, whereas each jitted program of the whole
# model costs seconds to compile on a CPU.

BATCH, CLASSES = 4, 5


@functools.cache
def _images(n: int = BATCH, size: int = IMG, seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), jnp.float32)


def _init(model: VisionTransformer, seed: int = 0) -> dict:
    """The model's own initialisers (a fast PRNG: only the distribution matters here)."""
    return model.init(jax.random.key(seed, impl="rbg"), _images(1))["params"]


def _apply(model: VisionTransformer, params: dict, x: jax.Array, **kw) -> jax.Array:
    return model.apply({"params": params}, x, **kw)


def _strip_adapters(params: dict) -> dict:
    flat = vit.param_names(params)
    return vit.unflatten(
        {k: v for k, v in flat.items() if not re.search(r"/(adaptformer|lora_[qv])/", k)}
    )


@pytest.mark.parametrize("kind", ["adaptformer", "lora"])
def test_zero_up_projection_is_identity_bit_for_bit(kind):
    spec = AdapterSpec(kind, hidden=4, bits=32, scale=10.0)
    model = VisionTransformer(num_classes=CLASSES, variant="testing", adapter=spec)
    params = _init(model)
    flat = vit.param_names(params)
    ups = [v for k, v in flat.items() if k.endswith("/up/kernel")]
    downs = [v for k, v in flat.items() if k.endswith("/down/kernel")]
    assert ups and all(np.all(np.asarray(u) == 0) for u in ups)  # float adapters start at 0
    assert all(np.any(np.asarray(d) != 0) for d in downs)
    plain = VisionTransformer(num_classes=CLASSES, variant="testing")
    x = _images()
    with_adapters = _apply(model, params, x)
    without = _apply(plain, _strip_adapters(params), x)
    assert with_adapters.dtype == jnp.float32 and with_adapters.shape == (BATCH, CLASSES)
    np.testing.assert_array_equal(np.asarray(with_adapters), np.asarray(without))
    # ... and the adapters are live: a non-zero up-projection changes the logits.
    # (Random, not constant: AdaptFormer adds the same value to every feature for a constant
    # up-projection, which the next LayerNorm removes.)
    rng = np.random.default_rng(0)
    flat = {
        k: (v + rng.normal(0, 0.01, v.shape).astype(np.float32) if k.endswith("/up/kernel") else v)
        for k, v in flat.items()
    }
    changed = _apply(model, vit.unflatten(flat), x)
    assert np.max(np.abs(np.asarray(changed) - np.asarray(without))) > 1e-4


@pytest.mark.parametrize("kind", ["adaptformer", "lora"])
def test_quantized_adapters_initialise_nonzero_up(kind):
    model = VisionTransformer(
        num_classes=CLASSES, variant="testing", adapter=AdapterSpec(kind, hidden=4, bits=1)
    )
    for name, value in vit.param_names(_init(model)).items():
        v = np.asarray(value)
        if name.endswith("/up/kernel"):  # trunc_normal(0.001, +-0.002): sigma > 0
            assert v.std() > 0 and np.abs(v).max() <= 0.002 + 1e-7
        if name.endswith("/down/kernel"):  # U(+-1/sqrt(d)), PyTorch's Linear default
            bound = 1 / np.sqrt(v.shape[0])
            assert np.abs(v).max() <= bound and np.abs(v).max() > 0.5 * bound


def _capture_calls(model, params, x, **kw):
    """{(module path, "in" | "out"): array} of every module call in one forward pass."""
    seen = {}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            path = "/".join(context.module.scope.path)
            seen[(path, "in")], seen[(path, "out")] = args[0], out
        return out

    with nn.intercept_methods(capture):
        _apply(model, params, x, **kw)
    return {k: np.asarray(v) for k, v in seen.items()}


def test_adaptformer_wiring():
    # x' = x + drop_path(MLP(LN2(x))) + s * up(relu(down(x))): the adapter reads the residual
    # stream (LN2's input, not its output) and bypasses stochastic depth.
    spec = AdapterSpec("adaptformer", hidden=4, bits=32, scale=10.0, dropout=0.0)
    model = VisionTransformer(num_classes=CLASSES, variant="testing", adapter=spec, drop_path=0.9)
    rng = np.random.default_rng(0)
    flat = vit.param_names(_init(model))
    flat = {k: (rng.normal(0, 0.1, v.shape) if "/up/" in k else v) for k, v in flat.items()}
    seen = _capture_calls(
        model, vit.unflatten(flat), _images(), train=True, rngs={"dropout": jax.random.key(0)}
    )
    b = "Transformer/encoderblock_1"
    x = seen[(f"{b}/LayerNorm_2", "in")]
    np.testing.assert_array_equal(seen[(f"{b}/adaptformer", "in")], x)
    z = seen[(f"{b}/adaptformer", "out")]
    mlp = seen[(f"{b}/drop_path_mlp", "out")]
    dropped = np.all(mlp == 0, axis=(1, 2))
    assert dropped.any()  # rate 0.9 at the last block
    np.testing.assert_allclose(seen[(b, "out")], x + mlp + 10.0 * z, rtol=1e-5, atol=1e-5)
    assert np.abs(z[dropped]).max() > 1e-3  # the adapter still contributes where MLP dropped
    down = np.asarray(flat[f"{b}/adaptformer/down/kernel"])
    up = np.asarray(flat[f"{b}/adaptformer/up/kernel"])
    np.testing.assert_allclose(z, np.maximum(x @ down, 0) @ up, rtol=1e-4, atol=1e-5)


def test_lora_wiring():
    # q += s * up(down(LN1(x))), the same for v; k untouched.
    spec = AdapterSpec("lora", hidden=4, bits=32, scale=10.0, dropout=0.0)
    model = VisionTransformer(num_classes=CLASSES, variant="testing", adapter=spec)
    rng = np.random.default_rng(1)
    flat = vit.param_names(_init(model))
    flat = {k: (rng.normal(0, 0.1, v.shape) if "/up/" in k else v) for k, v in flat.items()}
    seen = _capture_calls(model, vit.unflatten(flat), _images())
    att = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1"
    ln1 = seen[("Transformer/encoderblock_0/LayerNorm_0", "out")]
    for branch in ("lora_q", "lora_v"):
        np.testing.assert_array_equal(seen[(f"{att}/{branch}", "in")], ln1)
        down = np.asarray(flat[f"{att}/{branch}/down/kernel"])
        up = np.asarray(flat[f"{att}/{branch}/up/kernel"])
        np.testing.assert_allclose(
            seen[(f"{att}/{branch}", "out")], ln1 @ down @ up, rtol=1e-4, atol=1e-5
        )
    np.testing.assert_array_equal(seen[(f"{att}/query", "in")], ln1)
    # With the LoRA update on q and v, attention differs from the plain block's.
    plain_seen = _capture_calls(
        VisionTransformer(num_classes=CLASSES, variant="testing"),
        _strip_adapters(vit.unflatten(flat)),
        _images(),
    )
    assert np.abs(plain_seen[(f"{att}/out", "in")] - seen[(f"{att}/out", "in")]).max() > 1e-3


def test_stochastic_depth_only_in_train_mode():
    x = _images()
    model = VisionTransformer(num_classes=CLASSES, variant="testing", drop_path=0.5)
    no_dp = model.clone(drop_path=0.0)
    params = _init(no_dp)
    eval_out = np.asarray(_apply(model, params, x, train=False))
    np.testing.assert_array_equal(eval_out, _apply(no_dp, params, x, train=False))
    # Nothing else in the backbone is stochastic: rate 0 in train mode is the eval output.
    rng1, rng2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(
        _apply(no_dp, params, x, train=True, rngs={"dropout": rng1}), eval_out
    )
    t1 = np.asarray(_apply(model, params, x, train=True, rngs={"dropout": rng1}))
    t2 = np.asarray(_apply(model, params, x, train=True, rngs={"dropout": rng2}))
    np.testing.assert_array_equal(t1, _apply(model, params, x, train=True, rngs={"dropout": rng1}))
    assert np.max(np.abs(t1 - eval_out)) > 1e-4
    assert np.max(np.abs(t1 - t2)) > 1e-4


def test_drop_path_rate_increases_linearly():
    model = VisionTransformer(num_classes=CLASSES, variant="mini/4", drop_path=0.3)
    x = jax.ShapeDtypeStruct((1, IMG, IMG, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    rates = {}

    def capture(next_fun, args, kwargs, context):
        if isinstance(context.module, vit.DropPath):
            path = context.module.scope.path
            rates[(path[-2], path[-1])] = context.module.rate
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    expected = {
        (f"encoderblock_{i}", branch): 0.1 * i
        for i in range(4)
        for branch in ("drop_path_attn", "drop_path_mlp")
    }
    assert rates == pytest.approx(expected)


def _loss(model, params, x, y, rng):
    logits = _apply(model, params, x, train=True, rngs={"dropout": rng})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def test_remat_gives_same_loss_and_grads():
    spec = AdapterSpec("adaptformer", hidden=4, bits=1, scale=1.0)
    plain = VisionTransformer(num_classes=CLASSES, variant="testing", adapter=spec, drop_path=0.2)
    remat = plain.clone(remat=True)
    params = _init(plain)
    x, y = _images(), jnp.array([0, 1, 2, 3])
    rng = jax.random.key(3)
    l0, g0 = jax.jit(jax.value_and_grad(functools.partial(_loss, plain)))(params, x, y, rng)
    l1, g1 = jax.jit(jax.value_and_grad(functools.partial(_loss, remat)))(params, x, y, rng)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    flat0, flat1 = vit.param_names(g0), vit.param_names(g1)
    assert flat0.keys() == flat1.keys()
    for name in flat0:
        np.testing.assert_allclose(flat1[name], flat0[name], rtol=1e-5, atol=1e-7, err_msg=name)
    up = "Transformer/encoderblock_1/adaptformer/up/kernel"
    assert np.any(np.asarray(flat0[up]) != 0)
    # Stochastic depth was active: a different rng gives a different loss.
    l2 = jax.jit(functools.partial(_loss, plain))(params, x, y, jax.random.key(4))
    assert abs(float(l2) - float(l1)) > 1e-6


BF16_TOLERANCE = 0.03  # max |logits_bf16 - logits_f32| / max |logits_f32|


def test_bfloat16_compute_close_to_float32():
    spec = AdapterSpec("adaptformer", hidden=4, bits=1, scale=1.0)
    f32 = VisionTransformer(num_classes=CLASSES, variant="testing", adapter=spec)
    bf16 = f32.clone(dtype=jnp.bfloat16)
    params = _init(f32)
    x = _images()
    a = np.asarray(_apply(f32, params, x))
    b = jax.jit(functools.partial(_apply, bf16))(params, x)
    assert b.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    # Parameters stay float32.
    assert {p.dtype for p in jax.tree_util.tree_leaves(_shapes(bf16, IMG))} == {
        jnp.dtype("float32")
    }
    err = np.max(np.abs(a - np.asarray(b))) / np.max(np.abs(a))
    assert 0 < err < BF16_TOLERANCE


@pytest.mark.parametrize(
    "kind,bits,blocks,head_bits,std_mode",
    [
        ("adaptformer", 1, 1, 32, "population"),
        ("lora", 2, 1, 1, "population"),
        ("adaptformer", 4, 2, 1, "unbiased"),
        ("lora", 16, 1, 32, "population"),
    ],
)
def test_materialize_params(kind, bits, blocks, head_bits, std_mode):
    spec = AdapterSpec(kind, hidden=4, bits=bits, scale=10.0, blocks=blocks, std_mode=std_mode)
    model = VisionTransformer(
        num_classes=CLASSES, variant="testing", adapter=spec, head_bits=head_bits
    )
    # Train-like adapter weights (the init's up-projection is tiny).
    rng = np.random.default_rng(0)
    flat = {
        k: (v + rng.normal(0, 0.05, v.shape).astype(np.float32) if "/up/" in k else v)
        for k, v in vit.param_names(_init(model)).items()
    }
    params = vit.unflatten(flat)
    mat_model, mat_params = vit.materialize_params(model, params)
    assert mat_model.materialized and not model.materialized
    x = _images()
    logits = _apply(model, params, x)
    mat_logits = _apply(mat_model, mat_params, x)
    np.testing.assert_allclose(mat_logits, logits, rtol=1e-6, atol=1e-6)

    mat_flat = vit.param_names(mat_params)
    assert mat_flat.keys() == flat.keys()
    quantized = [k for k in mat_flat if re.search(r"/(adaptformer|lora_[qv])/(down|up)/kernel", k)]
    assert len(quantized) == 2 * (1 if kind == "adaptformer" else 2) * 2
    for name in quantized:
        w = np.asarray(mat_flat[name])
        assert w.dtype == np.float32
        if bits <= 8:
            for block in w.reshape(blocks, -1):
                assert np.unique(block).size <= 2**bits
        else:  # 16 bits: float16 values
            np.testing.assert_array_equal(w, w.astype(np.float16).astype(np.float32))
        assert not np.array_equal(w, np.asarray(flat[name]))
    if head_bits <= 8:
        assert np.unique(np.asarray(mat_flat["head/kernel"])).size <= 2**head_bits
    else:
        np.testing.assert_array_equal(mat_flat["head/kernel"], flat["head/kernel"])
    for name in mat_flat:  # the backbone is untouched
        if name not in quantized and name != "head/kernel":
            np.testing.assert_array_equal(mat_flat[name], flat[name])
    # The quantizing model does not compute with the raw kernels.
    raw_logits = _apply(model.clone(materialized=True), params, x)
    assert np.max(np.abs(np.asarray(raw_logits) - np.asarray(logits))) > (
        1e-4 if bits <= 8 else 1e-7
    )
    # The variables dict instead of the params collection would silently quantize nothing.
    if bits <= 8:
        with pytest.raises(ValueError, match="params"):
            vit.materialize_params(model, {"params": params})


def test_invalid_configs_raise():
    with pytest.raises(ValueError, match="valid variants"):
        _shapes(VisionTransformer(num_classes=2, variant="B/32"), IMG)
    with pytest.raises(ValueError, match="valid adapters"):
        AdapterSpec("prefix")
    for bad in (0, 9, 12, 3.5, True):
        with pytest.raises(ValueError):
            AdapterSpec("lora", bits=bad)
    with pytest.raises(ValueError, match=">= 1"):
        AdapterSpec("adaptformer", hidden=0)
