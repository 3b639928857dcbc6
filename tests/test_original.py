"""Import of the 152 released PETL-ViT files (original layout, byte-exact re-export)."""

from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from release_files import RELEASE

from bitpet import original, taskfile
from bitpet.models import vit

BINS = sorted(glob.glob(os.path.join(RELEASE, "models_bin", "*", "*.bin")))
pytestmark = pytest.mark.skipif(not BINS, reason=f"release files not found under {RELEASE}")

# REFERENCE scale table, spot checks: (method, release task, h) -> scale.
SCALES = {
    ("adaptformer", "cifar", 32): 0.1,
    ("adaptformer-bihead", "dsprites_ori", 32): 10.0,
    ("lora", "caltech101", 1): 100.0,
    ("lora-bihead", "cifar", 32): 0.01,
    ("lora-bihead", "svhn", 1): 100.0,
}


def _path(method, task, h):
    return os.path.join(RELEASE, "models_bin", method, f"{task}-bit1-dim{h}.bin")


def test_all_released_files_import_exactly():
    assert len(BINS) == 152
    seen = set()
    for path in BINS:
        spec, tensors, data = original.import_original(path)
        raw = open(path, "rb").read()
        seen.add((spec.method, spec.task, spec.h))
        # Size: matrices * (d*h*b/8 + 8) (+ binary head d*C/8 + 8, or float head 4*(d*C + C)).
        n = 24 if spec.adapter == "adaptformer" else 48
        head = (
            768 * spec.num_classes // 8 + 8
            if spec.head_bits == 1
            else 4 * (768 * spec.num_classes + spec.num_classes)
        )
        assert len(raw) == original.expected_size(spec) == n * (768 * spec.h // 8 + 8) + head
        # Every quantized matrix holds exactly two values; re-export is byte-exact.
        counts = original.distinct_values(tensors)
        assert len(counts) == n + (spec.head_bits == 1)
        assert set(counts.values()) == {2}, path
        assert original.encode_original(tensors, spec) == raw
        # The task file holds the same codes and stats, and decodes to the same weights.
        tf = taskfile.parse(data, path)
        assert tf.task == spec.task and tf.meta["scale"] == spec.scale
        assert tf.meta["std_mode"] == "unbiased" and tf.meta["bits"] == 1
        assert original.encode_original(tf.records, spec) == raw
        r = taskfile.size_report(tf)
        assert r.adapter_bytes + r.head_bytes == len(raw)
        assert r.header_bytes <= 1024
    assert len(seen) == 152
    assert {t for _, t, _ in seen} >= {"cifar100", "sun397", "smallnorb_ele"}
    assert "cifar" not in {t for _, t, _ in seen}


@pytest.mark.parametrize("key", sorted(SCALES))
def test_yaml_scales_and_names(key):
    method, task, h = key
    spec = original.read_yaml(original.find_yaml(_path(method, task, h)))
    assert spec.scale == SCALES[key] and spec.h == h and spec.method == method
    assert spec.task == original.TASK_NAMES.get(task, task)
    assert spec.bitpet_method == ("bi_lora" if method.startswith("lora") else "bi_adaptformer")


def test_layout_is_pytorch_out_in_row_major():
    """First matrix: AdaptFormer down (torch (32, 768)) -> flax kernel (768, 32)."""
    path = _path("adaptformer", "cifar", 32)
    spec, tensors, _ = original.import_original(path)
    raw = np.frombuffer(open(path, "rb").read(), np.uint8)
    bits = np.unpackbits(raw[: 768 * 32 // 8], bitorder="little").reshape(32, 768)
    down = tensors["Transformer/encoderblock_0/adaptformer/down/kernel"]
    assert down.spec.shape == (768, 32)
    assert np.array_equal(down.codes, bits.T)
    mu, sigma = np.frombuffer(raw[3072:3080].tobytes(), "<f4")
    w = down.decode()
    np.testing.assert_allclose(
        np.unique(w), [mu - 0.6744898 * sigma, mu + 0.6744898 * sigma], rtol=1e-6
    )
    head = tensors["head/kernel"]
    assert head.spec.shape == (768, 100) and head.spec.codebook == "float"


def test_imported_file_loads_onto_vit_b16(tmp_path):
    path = _path("lora-bihead", "dtd", 1)
    out = tmp_path / "dtd.bitpet"
    spec, tensors, _ = original.import_original(path, out=str(out))
    tf = taskfile.read(out)
    assert tf.fingerprint is None and tf.meta["head_bits"] == 1
    # A ViT-B/16 backbone at 32 px (zeros: only shapes matter here; no fingerprint recorded).
    model = tf.model()
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    shapes = vit.param_names(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    backbone = {n: np.zeros(s.shape, np.float32) for n, s in shapes.items() if "lora" not in n}
    got_model, params = taskfile.load_into(tf, backbone)
    assert got_model.materialized and got_model.adapter.std_mode == "unbiased"
    assert got_model.adapter.scale == spec.scale and got_model.num_classes == 47
    name = "Transformer/encoderblock_3/MultiHeadDotProductAttention_1/lora_v/up/kernel"
    kernel = np.asarray(vit.param_names(params)[name])
    assert kernel.shape == (1, 768)
    assert np.array_equal(kernel, tensors[name].decode())
    assert np.unique(np.asarray(params["head"]["kernel"])).size == 2


def test_wrong_yaml_is_rejected(tmp_path):
    path = _path("adaptformer", "dtd", 32)
    other_yaml = original.find_yaml(_path("adaptformer", "dtd", 1))
    with pytest.raises(original.OriginalFormatError, match="check that the yaml"):
        original.import_original(path, other_yaml)
    with pytest.raises(FileNotFoundError, match="--yaml"):
        original.find_yaml(str(tmp_path / "x.bin"))


def test_backbone_fingerprint_of_npz(tmp_path):
    from bitpet.checkpoints import TASK_PARAM_RE, backbone_fingerprint

    model = vit.VisionTransformer(num_classes=1, variant="testing")
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    shapes = vit.param_names(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    rng = np.random.default_rng(0)
    flat = {
        n: rng.normal(size=s.shape).astype(np.float32)
        for n, s in shapes.items()
        if not TASK_PARAM_RE.fullmatch(n)
    }
    np.savez(tmp_path / "b.npz", **flat)
    fp = original.backbone_fingerprint_of(str(tmp_path / "b.npz"), 16, "testing")
    assert fp == backbone_fingerprint(flat)
