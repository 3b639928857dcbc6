"""Tests of the VTAB-1k task table and its label derivations (bitpet.data.vtab)."""

import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from bitpet.data import vtab

# REFERENCE.md, "VTAB-1k in TFDS": task -> (tfds name, train800, val200, test, classes).
REFERENCE_TABLE = {
    "caltech101": ("caltech101:3.*.*", "train[:800]", "train[2754:2954]", "test", 102),
    "cifar100": ("cifar100:3.*.*", "train[:800]", "train[45000:45200]", "test", 100),
    "dtd": ("dtd:3.*.*", "train[:800]", "validation[:200]", "test", 47),
    "oxford_flowers102": (
        "oxford_flowers102:2.*.*", "train[:800]", "validation[:200]", "test", 102),
    "oxford_iiit_pet": ("oxford_iiit_pet:3.*.*", "train[:800]", "train[2944:3144]", "test", 37),
    "svhn": ("svhn_cropped:3.*.*", "train[:800]", "train[65931:66131]", "test", 10),
    "sun397": ("sun397/tfds:4.*.*", "train[:800]", "validation[:200]", "test", 397),
    "patch_camelyon": ("patch_camelyon:2.*.*", "train[:800]", "validation[:200]", "test", 2),
    "eurosat": ("eurosat/rgb:2.*.*", "train[:800]", "train[16200:16400]", "train[21600:]", 10),
    "resisc45": ("resisc45:3.*.*", "train[:800]", "train[18900:19100]", "train[25200:]", 45),
    "diabetic_retinopathy": (
        "diabetic_retinopathy_detection/btgraham-300:3.*.*", "train[:800]", "validation[:200]",
        "test", 5),
    "clevr_count": ("clevr:3.*.*", "train[:800]", "train[63000:63200]", "validation", 8),
    "clevr_dist": ("clevr:3.*.*", "train[:800]", "train[63000:63200]", "validation", 6),
    "dmlab": ("dmlab:2.0.1", "train[:800]", "validation[:200]", "test", 6),
    "kitti": ("kitti:3.*.*", "train[:800]", "validation[:200]", "test", 4),
    "dsprites_loc": ("dsprites:2.*.*", "train[:800]", "train[589824:590024]", "train[663552:]",
                     16),
    "dsprites_ori": ("dsprites:2.*.*", "train[:800]", "train[589824:590024]", "train[663552:]",
                     16),
    "smallnorb_azi": ("smallnorb:2.*.*", "train[:800]", "test[:200]", "test[50%:]", 18),
    "smallnorb_ele": ("smallnorb:2.*.*", "train[:800]", "test[:200]", "test[50%:]", 9),
}  # fmt: skip

PAPER_ORDER = (
    "cifar100", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
    "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy",
    "clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori",
    "smallnorb_azi", "smallnorb_ele",
)  # fmt: skip


def test_task_order_and_groups():
    assert vtab.TASK_NAMES == tuple(vtab.TASKS) == PAPER_ORDER
    assert vtab.GROUPS == {
        "natural": PAPER_ORDER[:7],
        "specialized": PAPER_ORDER[7:11],
        "structured": PAPER_ORDER[11:],
    }
    for name, t in vtab.TASKS.items():
        assert t.name == name and name in vtab.GROUPS[t.group]


@pytest.mark.parametrize("name", PAPER_ORDER)
def test_split_strings_match_reference(name):
    t = vtab.get_task(name)
    assert (t.tfds_name, t.train800, t.val200, t.test, t.num_classes) == REFERENCE_TABLE[name]
    assert t.trainval == (t.train800, t.val200)


def test_flags():
    manual = {t.name for t in vtab.TASKS.values() if t.manual_download}
    assert manual == {"resisc45", "diabetic_retinopathy"}
    for name in manual:
        assert vtab.get_task(name).manual_url.startswith("https://")
    grey = {t.name for t in vtab.TASKS.values() if t.grey}
    assert grey == {"dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele"}
    scaled = {t.name: t.image_scale for t in vtab.TASKS.values() if t.image_scale != 1.0}
    assert scaled == {"dsprites_loc": 255.0, "dsprites_ori": 255.0}


def test_unknown_task_lists_names():
    with pytest.raises(ValueError) as e:
        vtab.get_task("imagenet")
    for name in ("imagenet", "cifar100", "kitti", "smallnorb_ele"):
        assert name in str(e.value)


def test_import_does_not_load_tensorflow():
    code = "import sys, bitpet.data.vtab; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------
# Label derivations on hand-made feature dicts.


def _label(fn, features):
    out = fn(features)
    assert out.dtype == tf.int32 and out.shape == ()
    return int(out)


def _clevr(depths):
    depths = np.asarray(depths, np.float32)
    coords = np.stack([np.zeros_like(depths), np.zeros_like(depths), depths], axis=1)
    return {"objects": {"size": np.zeros(len(depths), np.int64), "pixel_coords": coords}}


def _task_adaptation_bin(value, thresholds):
    """task_adaptation's rule, written out: max(where(thresholds - value < 0))."""
    return int(np.max(np.where(np.asarray(thresholds) - value < 0)[0]))


@pytest.mark.parametrize("n", range(3, 11))
def test_clevr_count(n):
    assert _label(vtab.clevr_count_label, _clevr(np.full(n, 9.0))) == n - 3


@pytest.mark.parametrize(
    "depth,label",
    [
        (0.5, 0), (7.99, 0), (8.0, 0),  # a value on a threshold falls in the lower bin
        (8.01, 1), (8.5, 1), (8.51, 2), (9.0, 2), (9.01, 3), (9.5, 3),
        (9.51, 4), (10.0, 4), (10.01, 5), (50.0, 5), (100.0, 5),
    ],
)  # fmt: skip
def test_clevr_dist_bins(depth, label):
    # The minimum depth decides; the other objects are farther.
    assert _label(vtab.clevr_dist_label, _clevr([depth + 3, depth, depth + 1])) == label


def test_clevr_dist_matches_task_adaptation_rule():
    for d in np.linspace(0.01, 100.0, 997, dtype=np.float32):
        got = _label(vtab.clevr_dist_label, _clevr([d]))
        assert got == _task_adaptation_bin(d, vtab.CLEVR_DIST_THRESHOLDS), d


def _kitti(objects):
    types = np.asarray([t for t, _ in objects], np.int64)
    loc = np.asarray([[1.0, 2.0, z] for _, z in objects], np.float32).reshape(-1, 3)
    return {"objects": {"type": types, "location": loc}}


CAR, VAN, TRUCK, PEDESTRIAN, PERSON_SITTING, CYCLIST, TRAM, MISC = range(8)


def test_kitti_vehicle_type_ids_match_tfds():
    import tensorflow_datasets as tfds

    names = tfds.builder("kitti:3.*.*").info.features["objects"]["type"].names
    assert names[:3] == ["Car", "Van", "Truck"]
    assert names.index("Pedestrian") == PEDESTRIAN and names.index("Tram") == TRAM


@pytest.mark.parametrize(
    "objects,label",
    [
        ([(CAR, 5.0)], 0),
        ([(CAR, 8.0)], 0),  # threshold edge: lower bin
        ([(VAN, 8.5)], 1),
        ([(TRUCK, 20.0)], 1),
        ([(TRUCK, 25.0)], 2),
        ([(CAR, 999.0)], 2),
        ([(CAR, 30.0), (VAN, 12.0), (TRUCK, 40.0)], 1),  # closest vehicle
        ([(PEDESTRIAN, 2.0), (CAR, 15.0)], 1),  # non-vehicles are ignored
        ([(TRAM, 3.0), (MISC, 4.0), (CYCLIST, 5.0), (CAR, 25.0)], 2),
        ([(PEDESTRIAN, 2.0), (PERSON_SITTING, 3.0), (CYCLIST, 4.0), (TRAM, 5.0)], 3),  # none
        ([], 3),  # no objects at all: depth 1000
    ],
)
def test_kitti_closest_vehicle(objects, label):
    assert _label(vtab.kitti_dist_label, _kitti(objects)) == label


def test_kitti_matches_task_adaptation_rule():
    for z in np.linspace(-50.0, 1100.0, 577, dtype=np.float32):
        got = _label(vtab.kitti_dist_label, _kitti([(PEDESTRIAN, 0.5), (VAN, z)]))
        want = _task_adaptation_bin(min(z, 1000.0), vtab.KITTI_DIST_THRESHOLDS)
        assert got == want, z


def test_dsprites_labels():
    for x in range(32):
        assert _label(vtab.dsprites_loc_label, {"label_x_position": np.int64(x)}) == x // 2
    for o in range(40):
        got = _label(vtab.dsprites_ori_label, {"label_orientation": np.int64(o)})
        assert got == o * 16 // 40 == int(np.floor(np.float32(o) / np.float32(40 / 16)))
    oris = {_label(vtab.dsprites_ori_label, {"label_orientation": o}) for o in range(40)}
    assert oris == set(range(16))


def test_smallnorb_and_plain_labels():
    ex = {"label_azimuth": np.int64(17), "label_elevation": np.int64(8), "label": np.int64(4)}
    assert _label(vtab.get_task("smallnorb_azi").label_fn, ex) == 17
    assert _label(vtab.get_task("smallnorb_ele").label_fn, ex) == 8
    assert _label(vtab.get_task("svhn").label_fn, ex) == 4


def test_label_fns_run_inside_tf_data():
    ds = tf.data.Dataset.from_tensors(_kitti([(PEDESTRIAN, 2.0), (CAR, 15.0)]))
    assert [int(x) for x in ds.map(vtab.kitti_dist_label)] == [1]
    ds = tf.data.Dataset.from_tensors(_clevr([12.0, 8.7, 30.0, 9.9]))
    assert [int(x) for x in ds.map(vtab.clevr_dist_label)] == [2]
    assert [int(x) for x in ds.map(vtab.clevr_count_label)] == [1]
