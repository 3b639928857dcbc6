"""Inference-time merging (bitpet.models.merge): merged models compute what unmerged ones do."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitpet.models import merge, vit

NUM_CLASSES = 5
# float32 tolerance of merged vs unmerged logits: x (W + s D U) and x W + s (x D) U differ only
# in the rounding of the matmuls (observed max abs error ~4e-7 on logits of magnitude ~1).
RTOL = ATOL = 1e-5


def _model(kind="lora", bits=32, *, scale=3.0, head_bits=32, blocks=1, hidden=4):
    return vit.VisionTransformer(
        num_classes=NUM_CLASSES,
        variant="testing",
        adapter=vit.AdapterSpec(kind=kind, hidden=hidden, bits=bits, scale=scale, blocks=blocks),
        head_bits=head_bits,
    )


def _images(n=3, size=16, seed=1):
    return jax.random.uniform(jax.random.PRNGKey(seed), (n, size, size, 3))


def _trained_params(model, images):
    """Initial params plus noise, so that the (zero-initialised) up-projections are non-zero."""
    params = model.init(jax.random.PRNGKey(0), images)["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def _logits(model, params, images):
    return np.asarray(model.apply({"params": params}, images, train=False))


@pytest.mark.parametrize(
    "bits,blocks,head_bits", [(1, 1, 32), (2, 1, 32), (32, 1, 32), (1, 2, 1), (16, 1, 32)]
)
def test_merged_lora_matches_evaluation_form(bits, blocks, head_bits):
    model = _model("lora", bits, blocks=blocks, head_bits=head_bits)
    images = _images()
    params = _trained_params(model, images)
    ref = _logits(*vit.materialize_params(model, params), images)
    merged_model, merged_params = merge.merge_for_inference(model, params)
    assert merged_model.adapter.kind == "none"
    out = _logits(merged_model, merged_params, images)
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
    assert np.abs(ref).max() > 0.1  # not trivially zero


def test_lora_branch_actually_changes_the_output():
    """The comparison above is meaningful: dropping the LoRA branches changes the logits."""
    model = _model("lora", 1)
    images = _images()
    params = _trained_params(model, images)
    ref = _logits(*vit.materialize_params(model, params), images)
    flat = vit.param_names(params)
    plain = vit.unflatten({k: v for k, v in flat.items() if "/lora_" not in k})
    without = _logits(model.clone(adapter=vit.AdapterSpec()), plain, images)
    assert np.abs(without - ref).max() > 100 * ATOL


@pytest.mark.parametrize("head_bits", [32, 1])
def test_merged_lora_param_tree_is_the_plain_vit(head_bits):
    model = _model("lora", 1, head_bits=head_bits)
    images = _images()
    _, merged_params = merge.merge_for_inference(model, _trained_params(model, images))
    plain = vit.VisionTransformer(num_classes=NUM_CLASSES, variant="testing", head_bits=head_bits)
    plain_params = plain.init(jax.random.PRNGKey(0), images)["params"]
    got = {k: np.shape(v) for k, v in vit.param_names(merged_params).items()}
    want = {k: np.shape(v) for k, v in vit.param_names(plain_params).items()}
    assert got == want
    assert all(np.asarray(v).dtype == np.float32 for v in vit.param_names(merged_params).values())


@pytest.mark.parametrize("bits", [1, 32])
def test_adaptformer_stays_a_materialised_adapter(bits):
    model = _model("adaptformer", bits)
    images = _images()
    params = _trained_params(model, images)
    ref_model, ref_params = vit.materialize_params(model, params)
    merged_model, merged_params = merge.merge_for_inference(model, params)
    assert merged_model == ref_model and merged_model.adapter.kind == "adaptformer"
    jax.tree.map(np.testing.assert_array_equal, merged_params, ref_params)
    np.testing.assert_array_equal(
        _logits(merged_model, merged_params, images), _logits(ref_model, ref_params, images)
    )


def test_already_materialised_model_is_not_quantized_twice():
    model = _model("lora", 1)
    images = _images()
    params = _trained_params(model, images)
    once = merge.merge_for_inference(model, params)
    twice = merge.merge_for_inference(*vit.materialize_params(model, params))
    jax.tree.map(np.testing.assert_array_equal, once[1], twice[1])


def test_merged_bf16_model_is_close():
    """A bf16-compute LoRA model merges too (the fold stays float32)."""
    model = _model("lora", 1).clone(dtype=jnp.bfloat16)
    images = _images()
    params = _trained_params(model, images)
    ref = _logits(*vit.materialize_params(model, params), images)
    merged_model, merged_params = merge.merge_for_inference(model, params)
    assert merged_model.dtype == jnp.bfloat16
    out = _logits(merged_model, merged_params, images)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 5e-2


def test_fold_lora_rejects_an_incomplete_branch():
    model = _model("lora", 32)
    images = _images()
    flat = vit.param_names(_trained_params(model, images))
    del flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/lora_q/up/kernel"]
    with pytest.raises(ValueError, match="lora_q lacks"):
        merge.fold_lora(vit.unflatten(flat), 1.0)
