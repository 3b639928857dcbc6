"""The 19 VTAB-1k tasks: TFDS names, split strings, label functions, class counts.

This module only describes the tasks; it performs no I/O and does not even import
TensorFlow at import time (the label functions import it lazily), so configs can read
``num_classes`` cheaply. Reading the data is ``bitpet.data.pipeline``'s job.

The split strings follow the VTAB-1k protocol of google-research/task_adaptation, as
tabulated in ``shared/REFERENCE.md``: ``train800`` is the first 800 examples of the
task's train source, ``val200`` the first 200 of its validation source, and ``test``
the evaluation split. They are slices of TFDS's deterministic order, so the dataset
version must be logged (``pipeline.dataset_version``).

Label derivations are pure TensorFlow functions of a TFDS feature dict, so they run
inside ``tf.data`` and can be tested on hand-made dicts. Binned labels follow
task_adaptation's convention exactly: ``label = max{i : t_i < value}``, i.e. the bin is
the half-open interval ``(t_i, t_{i+1}]`` (a value equal to a threshold falls in the
*lower* bin). Where task_adaptation would produce an invalid label (a value below the
first threshold, or a CLEVR depth above 100), the label is clipped to
``[0, num_classes)``. This never happens on the real datasets and keeps randomly
mocked data valid.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Mapping
from typing import Any

NATURAL = "natural"
SPECIALIZED = "specialized"
STRUCTURED = "structured"

# Thresholds of the binned labels (task_adaptation: clevr.py, kitti.py).
CLEVR_DIST_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)
KITTI_DIST_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)
# TFDS kitti `objects/type` ClassLabel names (tensorflow_datasets/datasets/kitti):
# Car=0, Van=1, Truck=2, Pedestrian=3, Person_sitting=4, Cyclist=5, Tram=6, Misc=7.
KITTI_VEHICLE_TYPES = (0, 1, 2)
KITTI_NO_VEHICLE_DEPTH = 1000.0


LabelFn = Callable[[Mapping[str, Any]], Any]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One VTAB-1k task.

    Attributes:
      name: bitpet's task name (the paper's, e.g. "svhn").
      tfds_name: TFDS "name[/config]:version" string, e.g. "svhn_cropped:3.*.*".
      train800: TFDS split string of the 800 training examples.
      val200: TFDS split string of the 200 validation examples.
      test: TFDS split string of the test set.
      num_classes: number of classes of the derived label.
      group: "natural", "specialized" or "structured".
      label_fn: TF function mapping a TFDS feature dict to an int32 scalar label.
      manual_download: the TFDS builder needs files downloaded by hand into manual_dir.
      manual_url: where to fetch those files from (manual_download tasks only).
      grey: images have one channel and are tiled to three.
      image_scale: factor applied to the raw pixel values (dSprites stores 0/1: 255).
      tfds_fallback: TFDS name used when the installed TFDS can neither build nor find
        `tfds_name` (its builder code no longer supports that version). None: no fallback.
    """

    name: str
    tfds_name: str
    train800: str
    val200: str
    test: str
    num_classes: int
    group: str
    label_fn: LabelFn
    manual_download: bool = False
    manual_url: str | None = None
    grey: bool = False
    image_scale: float = 1.0
    tfds_fallback: str | None = None

    @property
    def trainval(self) -> tuple[str, str]:
        """The two split strings of train800val200, in concatenation order."""
        return (self.train800, self.val200)


# ---------------------------------------------------------------------------------------
# Label functions.


def feature_label(features: Mapping[str, Any], key: str = "label") -> Any:
    """Returns an integer feature as the int32 label.

    Args:
      features: TFDS feature dict.
      key: feature holding the class index.

    Returns:
      int32 scalar tensor.
    """
    import tensorflow as tf

    return tf.cast(features[key], tf.int32)


def _bin_index(value: Any, thresholds: tuple[float, ...], num_classes: int) -> Any:
    """task_adaptation's `max(where(thresholds < value))`, clipped to [0, num_classes)."""
    import tensorflow as tf

    thr = tf.constant(thresholds, dtype=tf.float32)
    below = tf.cast(thr < tf.cast(value, tf.float32), tf.int32)
    idx = tf.reduce_sum(below) - 1  # thresholds are increasing: the last one below value
    return tf.clip_by_value(idx, 0, num_classes - 1)


def _num_objects(objects: Mapping[str, Any]) -> Any:
    import tensorflow as tf

    # task_adaptation counts entries of objects/size; every per-object field has the
    # same length in the real data.
    key = "size" if "size" in objects else next(iter(objects))
    return tf.shape(objects[key])[0]


def clevr_count_label(features: Mapping[str, Any]) -> Any:
    """CLEVR counting: number of objects - 3 (scenes hold 3..10 objects: 8 classes).

    Args:
      features: TFDS clevr feature dict with an "objects" sequence.

    Returns:
      int32 scalar in [0, 8).
    """
    import tensorflow as tf

    n = tf.cast(_num_objects(features["objects"]), tf.int32)
    return tf.clip_by_value(n - 3, 0, 7)


def clevr_dist_label(features: Mapping[str, Any]) -> Any:
    """CLEVR closest-object distance: bin of the minimum object depth (6 classes).

    The depth is `objects/pixel_coords[:, 2]`; thresholds 0, 8, 8.5, 9, 9.5, 10, 100;
    class i covers (t_i, t_{i+1}] (task_adaptation's convention).

    Args:
      features: TFDS clevr feature dict.

    Returns:
      int32 scalar in [0, 6).
    """
    import tensorflow as tf

    depth = tf.cast(features["objects"]["pixel_coords"], tf.float32)[:, 2]
    return _bin_index(tf.reduce_min(depth), CLEVR_DIST_THRESHOLDS, 6)


def kitti_dist_label(features: Mapping[str, Any]) -> Any:
    """KITTI closest-vehicle distance (4 classes).

    The minimum depth `objects/location[:, 2]` over objects of type Car, Van or Truck
    (ClassLabel ids 0, 1, 2), 1000 when there is none; thresholds -100, 8, 20, 999;
    class i covers (t_i, t_{i+1}], so "no vehicle" is class 3 (together with vehicles
    farther than 20 m).

    Args:
      features: TFDS kitti feature dict with "objects/type" and "objects/location".

    Returns:
      int32 scalar in [0, 4).
    """
    import tensorflow as tf

    objects = features["objects"]
    types = tf.reshape(tf.cast(objects["type"], tf.int32), [-1])
    depth = tf.reshape(tf.cast(objects["location"], tf.float32), [-1, 3])[:, 2]
    n = tf.minimum(tf.shape(types)[0], tf.shape(depth)[0])  # equal on real data
    types, depth = types[:n], depth[:n]
    is_vehicle = tf.reduce_any(types[:, None] == tf.constant(KITTI_VEHICLE_TYPES)[None], 1)
    vehicle_depth = tf.boolean_mask(depth, is_vehicle)
    dist = tf.reduce_min(tf.concat([vehicle_depth, [KITTI_NO_VEHICLE_DEPTH]], axis=0))
    return _bin_index(dist, KITTI_DIST_THRESHOLDS, 4)


def dsprites_loc_label(features: Mapping[str, Any]) -> Any:
    """dSprites x position: label_x_position // 2 (32 positions -> 16 classes).

    Args:
      features: TFDS dsprites feature dict.

    Returns:
      int32 scalar in [0, 16).
    """
    import tensorflow as tf

    return tf.cast(features["label_x_position"], tf.int32) // 2


def dsprites_ori_label(features: Mapping[str, Any]) -> Any:
    """dSprites orientation: label_orientation * 16 // 40 (40 angles -> 16 classes).

    Args:
      features: TFDS dsprites feature dict.

    Returns:
      int32 scalar in [0, 16).
    """
    import tensorflow as tf

    return tf.cast(features["label_orientation"], tf.int32) * 16 // 40


smallnorb_azi_label = functools.partial(feature_label, key="label_azimuth")
smallnorb_ele_label = functools.partial(feature_label, key="label_elevation")


# ---------------------------------------------------------------------------------------
# The task table (order of the paper's Table 3).

_RESISC45_URL = "https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs"
_RETINOPATHY_URL = "https://www.kaggle.com/c/diabetic-retinopathy-detection/data"


def _task(name, tfds_name, train800, val200, test, num_classes, group, **kw) -> TaskSpec:
    kw.setdefault("label_fn", feature_label)
    return TaskSpec(name, tfds_name, train800, val200, test, num_classes, group, **kw)


_TASK_LIST = (
    _task("cifar100", "cifar100:3.*.*", "train[:800]", "train[45000:45200]", "test", 100,
          NATURAL),
    _task("caltech101", "caltech101:3.*.*", "train[:800]", "train[2754:2954]", "test", 102,
          NATURAL),
    _task("dtd", "dtd:3.*.*", "train[:800]", "validation[:200]", "test", 47, NATURAL),
    _task("oxford_flowers102", "oxford_flowers102:2.*.*", "train[:800]", "validation[:200]",
          "test", 102, NATURAL),
    _task("oxford_iiit_pet", "oxford_iiit_pet:3.*.*", "train[:800]", "train[2944:3144]",
          "test", 37, NATURAL, tfds_fallback="oxford_iiit_pet:4.*.*"),
    _task("svhn", "svhn_cropped:3.*.*", "train[:800]", "train[65931:66131]", "test", 10,
          NATURAL),
    _task("sun397", "sun397/tfds:4.*.*", "train[:800]", "validation[:200]", "test", 397,
          NATURAL),
    _task("patch_camelyon", "patch_camelyon:2.*.*", "train[:800]", "validation[:200]",
          "test", 2, SPECIALIZED),
    _task("eurosat", "eurosat/rgb:2.*.*", "train[:800]", "train[16200:16400]",
          "train[21600:]", 10, SPECIALIZED),
    _task("resisc45", "resisc45:3.*.*", "train[:800]", "train[18900:19100]",
          "train[25200:]", 45, SPECIALIZED, manual_download=True, manual_url=_RESISC45_URL),
    _task("diabetic_retinopathy", "diabetic_retinopathy_detection/btgraham-300:3.*.*",
          "train[:800]", "validation[:200]", "test", 5, SPECIALIZED, manual_download=True,
          manual_url=_RETINOPATHY_URL),
    _task("clevr_count", "clevr:3.*.*", "train[:800]", "train[63000:63200]", "validation",
          8, STRUCTURED, label_fn=clevr_count_label),
    _task("clevr_dist", "clevr:3.*.*", "train[:800]", "train[63000:63200]", "validation",
          6, STRUCTURED, label_fn=clevr_dist_label),
    _task("dmlab", "dmlab:2.0.1", "train[:800]", "validation[:200]", "test", 6, STRUCTURED),
    _task("kitti", "kitti:3.*.*", "train[:800]", "validation[:200]", "test", 4, STRUCTURED,
          label_fn=kitti_dist_label),
    _task("dsprites_loc", "dsprites:2.*.*", "train[:800]", "train[589824:590024]",
          "train[663552:]", 16, STRUCTURED, label_fn=dsprites_loc_label, grey=True,
          image_scale=255.0),
    _task("dsprites_ori", "dsprites:2.*.*", "train[:800]", "train[589824:590024]",
          "train[663552:]", 16, STRUCTURED, label_fn=dsprites_ori_label, grey=True,
          image_scale=255.0),
    _task("smallnorb_azi", "smallnorb:2.*.*", "train[:800]", "test[:200]", "test[50%:]", 18,
          STRUCTURED, label_fn=smallnorb_azi_label, grey=True),
    _task("smallnorb_ele", "smallnorb:2.*.*", "train[:800]", "test[:200]", "test[50%:]", 9,
          STRUCTURED, label_fn=smallnorb_ele_label, grey=True),
)  # fmt: skip

# Read-only {name: TaskSpec}, in the order of the paper's Table 3.
TASKS: Mapping[str, TaskSpec] = types.MappingProxyType({t.name: t for t in _TASK_LIST})

TASK_NAMES: tuple[str, ...] = tuple(TASKS)

GROUPS: dict[str, tuple[str, ...]] = {
    g: tuple(n for n, t in TASKS.items() if t.group == g)
    for g in (NATURAL, SPECIALIZED, STRUCTURED)
}


def get_task(name: str) -> TaskSpec:
    """Looks a task up by name.

    Args:
      name: one of `TASK_NAMES`.

    Returns:
      The task's `TaskSpec`.

    Raises:
      ValueError: unknown name; the message lists the valid names.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"Unknown VTAB-1k task {name!r}; valid tasks: {', '.join(TASK_NAMES)}"
        ) from None
