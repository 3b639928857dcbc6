"""Tests of npz backbone loading (bitpet.checkpoints) on fake checkpoints with real names."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fake_checkpoints import IN21K_CLASSES, fake_vit_checkpoint, to_big_vision, write_npz

from bitpet import checkpoints
from bitpet.checkpoints import CheckpointError
from bitpet.models import vit
from bitpet.models.vit import AdapterSpec, VisionTransformer

TASK_NAMES = ("/adaptformer/", "/lora_q/", "/lora_v/")


def _is_task(name: str) -> bool:
    return name.startswith("head/") or any(t in name for t in TASK_NAMES)


def _shapes(model: VisionTransformer, image_size: int) -> dict:
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def _random_params(model: VisionTransformer, image_size: int, seed: int = 1) -> dict:
    """Params of ``model``'s structure filled with random numbers (no XLA compilation)."""
    rng = np.random.default_rng(seed)
    flat = vit.param_names(_shapes(model, image_size))
    return vit.unflatten(
        {k: rng.normal(0, 0.02, s.shape).astype(np.float32) for k, s in flat.items()}
    )


# ----------------------------------------------------------------------------- ViT-B/16 in21k


def test_fake_in21k_file_has_original_layout(b16_in21k_npz):
    with np.load(b16_in21k_npz) as f:
        names = set(f.files)
        assert len(names) == 12 * 16 + 10
        assert f["pre_logits/kernel"].shape == (768, 768)
        assert f["head/kernel"].shape == (768, IN21K_CLASSES)
        assert f["head/bias"].shape == (IN21K_CLASSES,)
        assert f["Transformer/posembed_input/pos_embedding"].shape == (1, 197, 768)
        assert f["Transformer/encoderblock_11/MultiHeadDotProductAttention_1/out/kernel"].shape == (
            12,
            64,
            768,
        )


def test_load_b16_in21k_and_forward(b16_in21k_npz):
    model = VisionTransformer(
        num_classes=10, variant="B/16", adapter=AdapterSpec("adaptformer", hidden=8, bits=1)
    )
    # Task params random; backbone zeros (they are all replaced; zeros cost no time at 86M).
    rng = np.random.default_rng(0)
    init = vit.unflatten(
        {
            k: rng.normal(0, 0.02, s.shape).astype(np.float32)
            if _is_task(k)
            else np.zeros(s.shape, np.float32)
            for k, s in vit.param_names(_shapes(model, 224)).items()
        }
    )
    loaded = checkpoints.load_pretrained(b16_in21k_npz, init)

    flat_init, flat = vit.param_names(init), vit.param_names(loaded)
    assert flat.keys() == flat_init.keys()
    n_backbone = 0
    with np.load(b16_in21k_npz) as f:
        file_names = set(f.files)
        for name, value in flat.items():
            assert np.shape(value) == np.shape(flat_init[name]), name
            if _is_task(name):  # adapters and the new head keep their initial values
                np.testing.assert_array_equal(value, flat_init[name], err_msg=name)
            else:
                n_backbone += 1
                assert np.asarray(value).dtype == np.float32
                np.testing.assert_array_equal(value, f[name], err_msg=name)
    assert n_backbone == 12 * 16 + 6 == len(file_names) - 4
    # pre_logits is dropped; the 21k-class head is replaced by the 10-class one.
    assert not any(k.startswith("pre_logits") for k in flat)
    assert flat["head/kernel"].shape == (768, 10) and flat["head/bias"].shape == (10,)
    assert sum(1 for k in flat if "/adaptformer/" in k) == 24

    x = jax.random.uniform(jax.random.key(0), (1, 224, 224, 3), jnp.float32)
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(loaded, x)
    assert logits.shape == (1, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    assert np.std(np.asarray(logits)) > 1e-3


def _bilinear_align_corners(grid: np.ndarray, new: int) -> np.ndarray:
    """Bilinear resize of an (old, old, d) grid, corners aligned (scipy.ndimage.zoom order 1)."""
    old = grid.shape[0]
    pos = np.arange(new) * (old - 1) / (new - 1)
    lo = np.minimum(np.floor(pos).astype(int), old - 2)
    t = pos - lo
    rows = grid[lo] * (1 - t)[:, None, None] + grid[lo + 1] * t[:, None, None]
    return rows[:, lo] * (1 - t)[None, :, None] + rows[:, lo + 1] * t[None, :, None]


@pytest.mark.parametrize("image_size,grid", [(384, 24), (112, 7)])
def test_posemb_resampled_on_load(b16_in21k_npz, image_size, grid):
    model = VisionTransformer(num_classes=10, variant="B/16")
    loaded = vit.param_names(checkpoints.load_pretrained(b16_in21k_npz, _shapes(model, image_size)))
    pos = loaded[checkpoints.POSEMB]
    assert pos.shape == (1, grid * grid + 1, 768) and pos.dtype == np.float32
    with np.load(b16_in21k_npz) as f:
        orig = f[checkpoints.POSEMB]
        np.testing.assert_array_equal(loaded["embedding/kernel"], f["embedding/kernel"])
    np.testing.assert_array_equal(pos[0, 0], orig[0, 0])  # class token kept
    expected = _bilinear_align_corners(orig[0, 1:].reshape(14, 14, 768).astype(np.float64), grid)
    np.testing.assert_allclose(pos[0, 1:].reshape(grid, grid, 768), expected, atol=1e-6)


def test_resample_posemb_tiny_grid_by_hand():
    # 2x2 grid [[a, b], [c, d]] -> 3x3, corners aligned; one channel, plus a class token.
    a, b, c, d = 1.0, 2.0, 5.0, 11.0
    posemb = np.array([[[-7.0], [a], [b], [c], [d]]], np.float32)
    out = checkpoints.resample_posemb(posemb, 10)
    expected = [
        [a, (a + b) / 2, b],
        [(a + c) / 2, (a + b + c + d) / 4, (b + d) / 2],
        [c, (c + d) / 2, d],
    ]
    assert out.shape == (1, 10, 1) and out.dtype == np.float32
    assert out[0, 0, 0] == -7.0
    np.testing.assert_allclose(out[0, 1:, 0].reshape(3, 3), expected, atol=1e-6)
    # 3x3 -> 2x2 keeps the corners; a linear ramp 10*i + j is reproduced exactly at 4x4.
    g3 = np.arange(9, dtype=np.float32).reshape(1, 9, 1)
    down = checkpoints.resample_posemb(np.concatenate([[[[0.5]]], g3], axis=1), 5)
    np.testing.assert_allclose(down[0, 1:, 0], [0, 2, 6, 8], atol=1e-6)
    ramp = np.array([[10 * i + j for j in range(3)] for i in range(3)], np.float32)
    up = checkpoints.resample_posemb(np.concatenate([[[[0.0]]], ramp.reshape(1, 9, 1)], 1), 17)
    s = np.arange(4) * 2 / 3
    np.testing.assert_allclose(up[0, 1:, 0].reshape(4, 4), 10 * s[:, None] + s[None, :], atol=1e-5)
    # Multi-channel grids resample channel by channel.
    rng = np.random.default_rng(0)
    pe = rng.normal(size=(1, 1 + 25, 3)).astype(np.float32)
    out = checkpoints.resample_posemb(pe, 1 + 64)
    want = _bilinear_align_corners(pe[0, 1:].reshape(5, 5, 3).astype(np.float64), 8)
    np.testing.assert_allclose(out[0, 1:].reshape(8, 8, 3), want, atol=1e-6)
    with pytest.raises(CheckpointError, match="square"):
        checkpoints.resample_posemb(pe, 1 + 50)


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def tiny_ckpt() -> dict[str, np.ndarray]:
    """vit_jax-named checkpoint of the "testing" variant at 16 px, with pre_logits and head."""
    return fake_vit_checkpoint("testing", image_size=16, num_classes=13, seed=5)


def _testing_model(kind: str = "lora", **kw) -> VisionTransformer:
    return VisionTransformer(
        num_classes=3, variant="testing", adapter=AdapterSpec(kind, hidden=2, bits=1), **kw
    )


def test_wrong_variant_lists_names(tmp_path, tiny_ckpt):
    path = write_npz(tmp_path / "testing.npz", tiny_ckpt)
    bigger = VisionTransformer(num_classes=3, variant="mini/4")
    with pytest.raises(CheckpointError) as e:
        checkpoints.load_pretrained(path, _shapes(bigger, 16))
    msg = str(e.value)
    assert "wrong variant" in msg and path in msg
    assert "missing from the checkpoint" in msg
    assert "Transformer/encoderblock_2/LayerNorm_0/scale" in msg
    assert "shape mismatch" in msg
    assert "Transformer/encoderblock_0/LayerNorm_0/scale: checkpoint (32,) vs model (64,)" in msg
    assert "32 missing from the checkpoint" in msg  # blocks 2 and 3
    assert isinstance(e.value, ValueError)


def test_b16_file_into_s16_model_fails(b16_in21k_npz):
    with pytest.raises(CheckpointError, match="shape mismatch") as e:
        checkpoints.load_pretrained(
            b16_in21k_npz, _shapes(VisionTransformer(num_classes=10, variant="S/16"), 224)
        )
    msg = str(e.value)
    assert "198 shape mismatch" in msg
    assert "Transformer/encoderblock_0/LayerNorm_0/scale: checkpoint (768,) vs model (384,)" in msg
    assert "... and 178 more" in msg  # long lists are truncated, with a count
    assert "missing from" not in msg and "unexpected" not in msg


def test_missing_key_wrong_shape_and_unexpected_key(tmp_path, tiny_ckpt):
    init = _shapes(_testing_model(), 16)
    ckpt = dict(tiny_ckpt)
    del ckpt["Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"]
    path = write_npz(tmp_path / "missing.npz", ckpt)
    with pytest.raises(CheckpointError, match="1 missing from the checkpoint") as e:
        checkpoints.load_pretrained(path, init)
    assert "Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias (64,)" in str(e.value)
    assert "shape mismatch" not in str(e.value)

    ckpt = dict(tiny_ckpt)
    ckpt["Transformer/encoderblock_0/LayerNorm_2/scale"] = np.ones(33, np.float32)
    path = write_npz(tmp_path / "shape.npz", ckpt)
    with pytest.raises(CheckpointError, match="1 shape mismatch") as e:
        checkpoints.load_pretrained(path, init)
    assert "Transformer/encoderblock_0/LayerNorm_2/scale: checkpoint (33,) vs model (32,)" in str(
        e.value
    )
    assert "missing from" not in str(e.value)

    ckpt = dict(tiny_ckpt)
    ckpt["Transformer/encoderblock_0/extra/kernel"] = np.ones(3, np.float32)
    path = write_npz(tmp_path / "extra.npz", ckpt)
    with pytest.raises(CheckpointError, match="1 unexpected in the checkpoint") as e:
        checkpoints.load_pretrained(path, init)
    assert "Transformer/encoderblock_0/extra/kernel" in str(e.value)


def test_missing_file_and_unreadable_file(tmp_path):
    missing = str(tmp_path / "nowhere" / "ViT-B_16.npz")
    with pytest.raises(FileNotFoundError) as e:
        checkpoints.load_pretrained(missing, {})
    msg = str(e.value)
    assert missing in msg and "Download" in msg
    assert "gs://vit_models/imagenet21k/ViT-B_16.npz" in msg
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="Cannot read"):
        checkpoints.load_pretrained(str(bad), {})


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("prefix", ["params/", "opt/target/", ""])
def test_big_vision_names_load_like_vit_jax(tmp_path, tiny_ckpt, scan, prefix):
    init = _random_params(_testing_model("adaptformer"), 16)
    ref = vit.param_names(
        checkpoints.load_pretrained(write_npz(tmp_path / "vit_jax.npz", tiny_ckpt), init)
    )
    bv = to_big_vision(tiny_ckpt, scan=scan, prefix=prefix)
    assert any("MultiHeadDotProductAttention_0" in k for k in bv)
    assert any("/LayerNorm_1/" in k for k in bv) and any("MlpBlock_0" in k for k in bv)
    if scan:
        stacked = bv[f"{prefix}Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"]
        assert stacked.shape == (2, 32, 64)
        assert not any("encoderblock_" in k for k in bv)
    path = write_npz(tmp_path / "big_vision.npz", bv)
    got = vit.param_names(checkpoints.load_pretrained(path, init))
    assert got.keys() == ref.keys()
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    # Block i is block i (not just the same set of arrays).
    np.testing.assert_array_equal(
        got["Transformer/encoderblock_1/LayerNorm_2/scale"],
        tiny_ckpt["Transformer/encoderblock_1/LayerNorm_2/scale"],
    )


def test_big_vision_b16_names_normalize_to_vit_jax(b16_in21k_npz):
    ckpt = checkpoints.read_npz(b16_in21k_npz)
    want = checkpoints.normalize_names(ckpt)
    assert not any(k.startswith(("head/", "pre_logits/")) for k in want)
    assert len(want) == 12 * 16 + 6
    for scan in (False, True):
        got = checkpoints.normalize_names(to_big_vision(ckpt, scan=scan))
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# ----------------------------------------------------------------------------- fingerprint / save


def test_backbone_fingerprint(tmp_path, tiny_ckpt):
    init = _random_params(_testing_model("lora"), 16)
    params = checkpoints.load_pretrained(write_npz(tmp_path / "t.npz", tiny_ckpt), init)
    fp = checkpoints.backbone_fingerprint(params)
    assert isinstance(fp, str) and len(fp) == 16 and int(fp, 16) >= 0
    assert checkpoints.backbone_fingerprint(jax.tree_util.tree_map(jnp.asarray, params)) == fp
    flat = vit.param_names(params)
    seen = {fp}
    n_backbone = n_task = 0
    for name, value in flat.items():
        changed = np.array(value, np.float32, copy=True)
        changed.reshape(-1)[-1] = np.nextafter(changed.reshape(-1)[-1], np.float32(np.inf))
        new_fp = checkpoints.backbone_fingerprint(vit.unflatten({**flat, name: changed}))
        if _is_task(name):
            n_task += 1
            assert new_fp == fp, name
        else:
            n_backbone += 1
            assert new_fp not in seen, name
            seen.add(new_fp)
    assert n_backbone == 2 * 16 + 6 and n_task == 2 + 2 * 4
    # Adding or removing task params does not change it either.
    no_adapters = {k: v for k, v in flat.items() if not _is_task(k)}
    assert checkpoints.backbone_fingerprint(vit.unflatten(no_adapters)) == fp


def test_save_npz_roundtrip(tmp_path, tiny_ckpt):
    init = _random_params(_testing_model("adaptformer"), 16)
    params = checkpoints.load_pretrained(write_npz(tmp_path / "t.npz", tiny_ckpt), init)
    flat = vit.param_names(params)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    path = str(out_dir / "backbone.npz")
    checkpoints.save_npz(path, params)
    checkpoints.save_npz(path, params)  # overwriting works (atomic replace)
    assert os.listdir(out_dir) == ["backbone.npz"]
    saved = checkpoints.read_npz(path)
    assert set(saved) == {k for k in flat if not _is_task(k)}
    for name, value in saved.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, flat[name])
    # The saved backbone loads back into a fresh model exactly.
    reloaded = vit.param_names(
        checkpoints.load_pretrained(path, _random_params(_testing_model("adaptformer"), 16, seed=9))
    )
    for name in saved:
        np.testing.assert_array_equal(reloaded[name], flat[name])
    assert checkpoints.backbone_fingerprint(vit.unflatten(reloaded)) == (
        checkpoints.backbone_fingerprint(params)
    )
    # With the task params, everything round-trips.
    full = str(out_dir / "full.npz")
    checkpoints.save_npz(full, params, include_task_params=True)
    everything = checkpoints.read_npz(full)
    assert everything.keys() == flat.keys()
    for name in flat:
        np.testing.assert_array_equal(everything[name], flat[name])
    assert sorted(os.listdir(out_dir)) == ["backbone.npz", "full.npz"]
