"""Tests of the VTAB-1k input pipeline (bitpet.data.pipeline).

Mock mode (tfds.testing.mock_data) covers all 19 tasks; the real-mode code path (split
strings, metadata counts, image decoding) runs on TFDS's tiny DummyMnist, prepared
offline in a temporary directory.
"""

import dataclasses
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from bitpet.data import pipeline, vtab

SIZE = 32
M = 20  # mock examples per split: train800 -> 16, val200 -> 4, test -> 20


def _rows(batches):
    """(label, image bytes) of the real (mask 1) rows of eval batches."""
    rows = []
    for b in batches:
        for img, lab, m in zip(b["image"], b["label"], b["mask"], strict=True):
            if m:
                rows.append((int(lab), np.round(img * 255).astype(np.uint8).tobytes()))
    return rows


def _check_eval_batches(batches, batch_size, num_examples, num_classes):
    assert len(batches) == -(-num_examples // batch_size)
    masks = np.concatenate([b["mask"] for b in batches])
    # Real rows first, then padding: every example counted exactly once.
    np.testing.assert_array_equal(masks, np.arange(len(masks)) < num_examples)
    for b in batches:
        assert b["image"].shape == (batch_size, SIZE, SIZE, 3)
        assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32
        assert b["mask"].dtype == np.float32
        assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert np.all((b["label"] >= 0) & (b["label"] < num_classes))
        assert np.all(b["image"][b["mask"] == 0] == 0)


@pytest.mark.parametrize("name", vtab.TASK_NAMES)
def test_mock_task(name):
    spec = vtab.get_task(name)
    kw = dict(image_size=SIZE, mock_data=True, mock_num_examples=M)
    data = pipeline.load_train_set(name, **kw)
    assert data["image"].shape == (M, SIZE, SIZE, 3) and data["image"].dtype == np.uint8
    assert data["label"].shape == (M,) and data["label"].dtype == np.int32
    assert np.all((data["label"] >= 0) & (data["label"] < spec.num_classes))
    assert data["image"].max() > 0

    n = pipeline.num_eval_examples(name, mock_data=True, mock_num_examples=M)
    assert n == M
    batches = list(pipeline.eval_batches(name, batch_size=7, **kw))  # 20 = 7 + 7 + 6 + pad
    _check_eval_batches(batches, 7, n, spec.num_classes)
    assert pipeline.dataset_version(name, mock_data=True).startswith("mock:")


def test_mock_tune_split_and_multiprocess_eval():
    kw = dict(image_size=SIZE, mock_data=True, mock_num_examples=M)
    tune = pipeline.load_train_set("dsprites_loc", split="tune", **kw)
    assert tune["image"].shape == (16, SIZE, SIZE, 3)
    # dSprites 0/1 pixels are scaled to 0/255 (the mock's random pixels clip at 255).
    assert tune["image"].max() == 255
    final = pipeline.load_train_set("dsprites_loc", split="final", **kw)
    np.testing.assert_array_equal(final["label"][:16], tune["label"])
    n_tune = pipeline.num_eval_examples(
        "dsprites_loc", split="tune", mock_data=True, mock_num_examples=M
    )
    assert n_tune == 4
    tune_eval = list(pipeline.eval_batches("dsprites_loc", split="tune", batch_size=3, **kw))
    _check_eval_batches(tune_eval, 3, 4, 16)

    kw["mock_num_examples"] = 19  # shards of 10 and 9 examples
    single = list(pipeline.eval_batches("svhn", batch_size=4, **kw))
    per_proc = [
        list(pipeline.eval_batches("svhn", batch_size=4, process_index=p, process_count=2, **kw))
        for p in range(2)
    ]
    assert len(per_proc[0]) == len(per_proc[1]) == 5  # batches of 2 rows
    assert [sum(b["mask"].sum() for b in bs) for bs in per_proc] == [10, 9]
    assert all(b["image"].shape[0] == 2 for bs in per_proc for b in bs)
    assert sorted(_rows(per_proc[0]) + _rows(per_proc[1])) == sorted(_rows(single))


def test_pet_reference_version_falls_back_when_unavailable():
    # tensorflow-datasets 4.9 only builds oxford_iiit_pet 4.0.0; REFERENCE names 3.*.*.
    version = pipeline.dataset_version("oxford_iiit_pet", mock_data=True)
    assert version.startswith("mock:oxford_iiit_pet:")


def test_invalid_arguments():
    with pytest.raises(ValueError, match="cifar100"):
        pipeline.load_train_set("nope", mock_data=True)
    with pytest.raises(ValueError, match="final"):
        pipeline.load_train_set("svhn", split="test", mock_data=True)
    with pytest.raises(ValueError):
        pipeline.eval_batches("svhn", batch_size=3, process_count=2, mock_data=True)


# ---------------------------------------------------------------------------------------
# Unprepared datasets fail fast.


@pytest.mark.parametrize("name", vtab.TASK_NAMES)
def test_unprepared_dataset_fails_fast(name, tmp_path):
    spec = vtab.get_task(name)
    calls = [
        lambda: pipeline.load_train_set(name, data_dir=str(tmp_path)),
        lambda: pipeline.eval_batches(name, batch_size=8, data_dir=str(tmp_path)),
        lambda: pipeline.dataset_version(name, data_dir=str(tmp_path)),
        lambda: pipeline.num_eval_examples(name, data_dir=str(tmp_path)),
    ]
    for call in calls:
        start = time.monotonic()
        with pytest.raises(pipeline.DataNotPreparedError) as e:
            call()
        assert time.monotonic() - start < 10.0
        msg = str(e.value)
        assert "tfds build" in msg and str(tmp_path) in msg
        if spec.manual_download:
            assert "manual_dir" in msg and spec.manual_url in msg
    assert not any(tmp_path.iterdir())  # nothing was downloaded or created


# ---------------------------------------------------------------------------------------
# Real-mode path on a tiny prepared dataset.


@pytest.fixture(scope="module")
def dummy_task(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    tfds.testing.DummyMnist(data_dir=data_dir).download_and_prepare()  # 20 train, 20 test
    spec = dataclasses.replace(
        vtab.get_task("smallnorb_azi"),  # grey, like MNIST
        name="dummy",
        tfds_name="dummy_mnist:3.*.*",
        train800="train[:6]",
        val200="train[10:14]",
        test="test[3:]",
        num_classes=10,
        label_fn=vtab.feature_label,
    )
    return spec, data_dir


def _reference_examples(data_dir, split):
    ds = tfds.builder("dummy_mnist", data_dir=data_dir).as_dataset(split=split)
    ims, labs = [], []
    for ex in ds:
        img = pipeline.preprocess_image(ex["image"], SIZE, grey=True)
        ims.append(img.numpy())
        labs.append(int(ex["label"]))
    return np.stack(ims), np.array(labs, np.int32)


def test_real_path_train_set(dummy_task):
    spec, data_dir = dummy_task
    assert pipeline.dataset_version(spec, data_dir=data_dir) == "dummy_mnist:3.0.1"
    data = pipeline.load_train_set(spec, image_size=SIZE, data_dir=data_dir)
    ims, labs = _reference_examples(data_dir, "train[:6]+train[10:14]")
    np.testing.assert_array_equal(data["label"], labs)
    np.testing.assert_array_equal(data["image"], ims)
    assert data["image"].shape == (10, SIZE, SIZE, 3)
    tune = pipeline.load_train_set(spec, split="tune", image_size=SIZE, data_dir=data_dir)
    np.testing.assert_array_equal(tune["label"], labs[:6])


@pytest.mark.parametrize("batch_size,process_count", [(4, 1), (17, 1), (32, 1), (6, 2), (4, 4)])
def test_real_path_eval_exactly_once(dummy_task, batch_size, process_count):
    spec, data_dir = dummy_task
    n = pipeline.num_eval_examples(spec, data_dir=data_dir)
    assert n == 17
    ims, labs = _reference_examples(data_dir, "test[3:]")
    want = [(int(lab), (im / 255.0).astype(np.float32)) for lab, im in zip(labs, ims, strict=True)]
    got, counts = [], []
    for p in range(process_count):
        batches = list(
            pipeline.eval_batches(
                spec,
                batch_size=batch_size,
                image_size=SIZE,
                data_dir=data_dir,
                process_index=p,
                process_count=process_count,
            )
        )
        counts.append(len(batches))
        local = batch_size // process_count
        _check_eval_batches_local(batches, local, len(range(p, n, process_count)))
        for b in batches:
            rows = zip(b["image"], b["label"], b["mask"], strict=True)
            got += [(int(lab), im) for im, lab, m in rows if m]
    assert len(set(counts)) == 1  # every process yields the same number of batches
    got.sort(key=lambda r: (r[0], r[1].tobytes()))
    want.sort(key=lambda r: (r[0], r[1].tobytes()))
    assert len(got) == len(want) == n
    for (gl, gi), (wl, wi) in zip(got, want, strict=True):
        assert gl == wl
        np.testing.assert_array_equal(gi, wi)


def _check_eval_batches_local(batches, local_bs, local_n):
    masks = np.concatenate([b["mask"] for b in batches])
    assert len(masks) == len(batches) * local_bs
    np.testing.assert_array_equal(masks, np.arange(len(masks)) < local_n)


# ---------------------------------------------------------------------------------------
# Preprocessing.


def test_preprocess_image_channels_and_scale():
    grey = np.zeros((64, 64, 1), np.uint8)
    grey[:32] = 1  # dSprites-style 0/1 pixels
    grey[40, 3] = 1
    out = pipeline.preprocess_image(tf.constant(grey), 16, grey=True, scale=255.0).numpy()
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])
    assert np.all(out[:6] == 255) and np.all(out[11:] <= 60)  # 0/1 became 0/255
    rgba = tf.constant(np.full((8, 8, 4), 7), tf.uint8)
    assert np.all(pipeline.preprocess_image(rgba, 8).numpy() == 7)
    flat = tf.constant(np.full((5, 9), 300.0), tf.float32)  # odd dtype, rank 2, overflow
    assert np.all(pipeline.preprocess_image(flat, 4).numpy() == 255)


# ---------------------------------------------------------------------------------------
# TrainIterator.


def _toy(n=37, hw=2):
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, hw, hw, 3))
    return {"image": np.ascontiguousarray(images), "label": np.arange(n, dtype=np.int64)}


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_train_iterator_epochs_and_types():
    data = _toy()
    it = pipeline.TrainIterator(data, batch_size=8, seed=42)
    assert it.steps_per_epoch == 4  # 37 // 8, remainder dropped
    batches = _take(it, 8)
    assert it.step == 8 and it.epoch == 2
    for e in range(2):
        perm = np.random.default_rng([42, e]).permutation(37)
        labels = np.concatenate([b["label"] for b in batches[4 * e : 4 * e + 4]])
        np.testing.assert_array_equal(labels, perm[:32])
        assert len(set(labels)) == 32
    b = batches[0]
    assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32
    assert b["image"].shape == (8, 2, 2, 3)
    np.testing.assert_allclose(b["image"][:, 0, 0, 0] * 255, b["label"], atol=1e-4)


def test_train_iterator_deterministic_and_resumable():
    data = _toy()
    full = _take(pipeline.TrainIterator(data, batch_size=8, seed=3), 11)
    again = _take(pipeline.TrainIterator(data, batch_size=8, seed=3), 11)
    other = _take(pipeline.TrainIterator(data, batch_size=8, seed=4), 11)
    for k in (0, 5, 6, 10):
        resumed = pipeline.TrainIterator(data, batch_size=8, seed=3, start_step=k)
        for a, b in zip(full[k:], _take(resumed, 11 - k), strict=True):
            np.testing.assert_array_equal(a["label"], b["label"])
            np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(full, again, strict=True):
        np.testing.assert_array_equal(a["label"], b["label"])
    assert any(not np.array_equal(a["label"], b["label"]) for a, b in zip(full, other, strict=True))


def test_train_iterator_process_slices():
    data = _toy()
    single = _take(pipeline.TrainIterator(data, batch_size=8, seed=1, start_step=3), 6)
    procs = [
        _take(
            pipeline.TrainIterator(
                data, batch_size=8, seed=1, start_step=3, process_index=p, process_count=2
            ),
            6,
        )
        for p in range(2)
    ]
    for k in range(6):
        assert procs[0][k]["label"].shape == (4,)
        for key in ("image", "label"):
            joined = np.concatenate([procs[0][k][key], procs[1][k][key]])
            np.testing.assert_array_equal(joined, single[k][key])


def test_train_iterator_rejects_bad_sizes():
    with pytest.raises(ValueError):
        pipeline.TrainIterator(_toy(5), batch_size=8, seed=0)
    with pytest.raises(ValueError):
        pipeline.TrainIterator(_toy(), batch_size=6, seed=0, process_count=4)


def test_version_fallback_prefers_reference_copy_on_disk(tmp_path):
    """How oxford_iiit_pet's 3.*.* (no longer built by this TFDS) resolves, on DummyMnist."""
    import json
    import shutil

    data_dir = str(tmp_path)
    tfds.testing.DummyMnist(data_dir=data_dir).download_and_prepare()  # version 3.0.1
    spec = dataclasses.replace(
        vtab.get_task("svhn"),
        name="dummy",
        tfds_name="dummy_mnist:2.*.*",  # not buildable by the installed code
        tfds_fallback="dummy_mnist:3.*.*",
    )
    assert pipeline.dataset_version(spec, data_dir=data_dir) == "dummy_mnist:3.0.1"
    # A copy of the reference version prepared earlier (by an older TFDS) wins.
    old = tmp_path / "dummy_mnist" / "2.5.0"
    shutil.copytree(tmp_path / "dummy_mnist" / "3.0.1", old)
    info = json.loads((old / "dataset_info.json").read_text())
    (old / "dataset_info.json").write_text(json.dumps({**info, "version": "2.5.0"}))
    assert pipeline.dataset_version(spec, data_dir=data_dir) == "dummy_mnist:2.5.0"
    no_fallback = dataclasses.replace(spec, tfds_name="dummy_mnist:1.*.*", tfds_fallback=None)
    with pytest.raises(pipeline.DataNotPreparedError, match="dummy_mnist:1"):
        pipeline.dataset_version(no_fallback, data_dir=data_dir)
