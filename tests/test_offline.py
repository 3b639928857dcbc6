"""Tests of the offline data source (bitpet.data.offline): shapes, labels, splits, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from bitpet.data import offline, sources

SIZE = 16
TASKS = list(offline.TASKS)


def _hashes(images: np.ndarray) -> set[bytes]:
    return {np.ascontiguousarray(x).tobytes() for x in images}


def test_registered_as_source():
    assert sources.get_source("offline") is offline


@pytest.mark.parametrize("task", TASKS)
def test_train_set_shapes_and_labels(task):
    spec = offline.get_task(task)
    data = offline.load_train_set(task, split="final", image_size=SIZE)
    assert data["image"].shape == (spec.num_train, SIZE, SIZE, 3)
    assert data["image"].dtype == np.uint8
    assert data["label"].dtype == np.int32 and data["label"].shape == (spec.num_train,)
    assert set(np.unique(data["label"])) == set(range(spec.num_classes))  # every class present
    assert data["image"].max() > 128  # real content, not an empty canvas
    np.testing.assert_array_equal(data["image"][..., 0], data["image"][..., 2])  # grey tiled
    assert offline.num_classes(task) == spec.num_classes


@pytest.mark.parametrize("task", TASKS)
def test_eval_batches_padded_and_complete(task):
    spec = offline.get_task(task)
    batches = list(offline.eval_batches(task, split="final", batch_size=64, image_size=SIZE))
    assert all(b["image"].shape == (64, SIZE, SIZE, 3) for b in batches)
    assert all(b["image"].dtype == np.float32 for b in batches)
    images = np.concatenate([b["image"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert mask.sum() == spec.num_test == offline.num_eval_examples(task)
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert np.all(images[mask == 0] == 0) and np.all(labels[mask == 0] == 0)
    real = labels[mask == 1]
    assert real.min() >= 0 and real.max() < spec.num_classes
    np.testing.assert_array_equal(real, offline.eval_labels(task, image_size=SIZE))
    assert set(np.unique(real)) == set(range(spec.num_classes))


@pytest.mark.parametrize("task", TASKS)
def test_train_test_disjoint(task):
    raw = offline.raw_splits(task)
    train, test = _hashes(raw["train"][0]), _hashes(raw["test"][0])
    assert len(train) == len(raw["train"][0]) and len(test) == len(raw["test"][0])
    assert not train & test


@pytest.mark.parametrize("task", TASKS)
def test_tune_split_carved_from_train(task):
    full = offline.load_train_set(task, split="final", image_size=SIZE)
    sub = offline.load_train_set(task, split="tune", image_size=SIZE)
    n = len(full["label"])
    cut = (4 * n) // 5
    np.testing.assert_array_equal(sub["image"], full["image"][:cut])
    val = list(offline.eval_batches(task, split="tune", batch_size=500, image_size=SIZE))
    val_images = np.concatenate([b["image"][b["mask"] == 1] for b in val])
    assert len(val_images) == n - cut == offline.num_eval_examples(task, split="tune")
    expected = full["image"][cut:].astype(np.float32) / 255.0
    np.testing.assert_array_equal(val_images, expected)


@pytest.mark.parametrize("task", TASKS)
def test_deterministic(task):
    before = offline.fingerprint(task, SIZE)
    offline.raw_splits.cache_clear()
    offline._resized.cache_clear()
    assert offline.fingerprint(task, SIZE) == before


def test_generators_depend_only_on_seed():
    for name, (fn, seed) in offline._GENERATORS.items():
        a, la = fn(8, seed, 6)
        b, lb = fn(8, seed, 6)
        c, _ = fn(8, seed + 100, 6)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
        assert not np.array_equal(a, c), name


def test_pretraining_and_downstream_digits_do_not_overlap():
    pre = offline.raw_splits("mnist_0to4")
    down = offline.raw_splits("mnist_5to9")
    pre_h = _hashes(pre["train"][0]) | _hashes(pre["test"][0])
    assert not pre_h & (_hashes(down["train"][0]) | _hashes(down["test"][0]))


def test_labels_follow_the_generating_parameter():
    """shapes_loc: the shape's column of mass grows with its x-position label."""
    x, y = offline.raw_splits("shapes_loc")["train"]
    cols = np.arange(x.shape[2])
    centre = (x.astype(np.float64).sum(1) * cols).sum(1) / x.astype(np.float64).sum((1, 2))
    means = [centre[y == k].mean() for k in range(offline.num_classes("shapes_loc"))]
    assert all(a < b for a, b in zip(means, means[1:], strict=False))


def test_eval_batches_sharded_over_processes():
    task = "lfw_faces"
    parts = [
        list(
            offline.eval_batches(
                task, batch_size=32, image_size=SIZE, process_index=p, process_count=2
            )
        )
        for p in range(2)
    ]
    assert len(parts[0]) == len(parts[1])
    total = sum(float(b["mask"].sum()) for part in parts for b in part)
    assert total == offline.get_task(task).num_test
    assert all(b["image"].shape[0] == 16 for part in parts for b in part)


def test_resize_matches_native_size_passthrough():
    x, _ = offline.raw_splits("mnist_5to9")["train"]
    out = offline.resize(x[:3], 28)
    np.testing.assert_array_equal(out[..., 1], x[:3])


def test_errors_and_version():
    with pytest.raises(ValueError, match="valid offline tasks"):
        offline.num_classes("cifar100")
    with pytest.raises(ValueError, match="split"):
        offline.load_train_set("lfw_faces", split="test", image_size=SIZE)
    assert offline.dataset_version("mnist_5to9").startswith(f"offline/mnist_5to9:{offline.VERSION}")
    assert "generated" in offline.dataset_version("shapes_ori")
