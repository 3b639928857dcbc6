"""VTAB-1k input pipeline: in-memory train set, resumable train iterator, padded eval.

Preprocessing (REFERENCE "Training recipe"), identical for train and eval: decode, tile
grey images to 3 channels, scale dSprites' 0/1 pixels by 255, resize to
``image_size x image_size`` with ``tf.image.resize(method="bicubic", antialias=True)``,
round and clip to [0, 255], cast to uint8; the model sees ``uint8 / 255`` as float32 in
[0, 1]. No mean/std normalisation, no augmentation. (antialias=True: the original feeds
PIL images to torchvision's ``Resize((224, 224), interpolation=3)``, and PIL's bicubic
filter is antialiased when downscaling.)

Data is never downloaded: builders are opened with ``tfds.builder(..., data_dir)`` and
``is_prepared()`` is checked first, so a missing dataset raises `DataNotPreparedError`
in well under a second instead of TFDS's ~200 s of offline retries.

Mock mode (``mock_data=True``) serves random examples from ``tfds.testing.mock_data``
(policy USE_CODE). Mock splits hold ``mock_num_examples`` (M, default 32) examples and
ignore slicing, so REFERENCE's split strings (e.g. ``train[589824:590024]``) cannot be
served. In mock mode each role reads the *source* split named by its real split string
(``train[2754:2954]`` -> ``train``) and takes a fixed slice of it: train800 ->
``[0, 4M/5)``, val200 -> ``[4M/5, M)``, test -> ``[0, M)``. So the "final" train set
has exactly M examples, the "tune" one 4M/5, and the final eval split M. (TFDS mocks
every split name with the same random examples, so mock splits are never truly
disjoint anyway.) Real mode always uses the real split strings of `bitpet.data.vtab`.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import logging

from bitpet.data import vtab

DEFAULT_MOCK_EXAMPLES = 32
_TRAIN_READ_BATCH = 128


class DataNotPreparedError(RuntimeError):
    """The TFDS dataset of a task is not prepared in the data directory."""


# ---------------------------------------------------------------------------------------
# Builders.


def _spec(task: str | vtab.TaskSpec) -> vtab.TaskSpec:
    return task if isinstance(task, vtab.TaskSpec) else vtab.get_task(task)


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def _default_data_dir() -> str:
    from tensorflow_datasets.core import constants

    return os.fspath(constants.get_default_data_dir())


def _versioned_name(builder) -> str:
    config = f"/{builder.builder_config.name}" if builder.builder_config else ""
    return f"{builder.name}{config}:{builder.version}"


@contextlib.contextmanager
def _mock_context(enabled: bool, num_examples: int):
    """tfds.testing.mock_data, with TFDS/TF deprecation chatter muted while it is open."""
    if not enabled:
        yield
        return
    tfds = _tfds()
    loggers = [pylogging.getLogger(name) for name in ("absl", "tensorflow")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(pylogging.ERROR)
    try:
        with tfds.testing.mock_data(
            num_examples=num_examples, policy=tfds.testing.MockPolicy.USE_CODE
        ):
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _not_prepared_message(spec: vtab.TaskSpec, builder, data_dir: str | None) -> str:
    root = data_dir or _default_data_dir()
    name = _versioned_name(builder) if builder is not None else spec.tfds_name
    lines = [
        f"VTAB task {spec.name!r}: TFDS dataset {name} is not prepared in {root} "
        "(bitpet never downloads data).",
        "Prepare it on a machine with network access, then point data_dir at it:",
    ]
    if spec.manual_download:
        manual_dir = os.path.join(root, "downloads", "manual")
        lines += [
            f"  1. download the source files by hand from {spec.manual_url}",
            f"     and place them in the manual_dir, e.g. {manual_dir}",
            f"  2. tfds build {name} --data_dir={root} --manual_dir={manual_dir}",
        ]
        instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
        if instructions:
            lines.append("TFDS manual download instructions:\n" + instructions.rstrip())
    else:
        lines.append(f"  tfds build {name} --data_dir={root}")
    return "\n".join(lines)


def _open_builder(spec: vtab.TaskSpec, data_dir: str | None, mock_data: bool):
    """Returns the task's TFDS builder; raises DataNotPreparedError if it has no data."""
    tfds = _tfds()
    candidates = [spec.tfds_name] + ([spec.tfds_fallback] if spec.tfds_fallback else [])
    builder, errors = None, []
    for i, name in enumerate(candidates):
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except (AssertionError, ValueError, tfds.core.registered.DatasetNotFoundError) as e:
            # The installed TFDS no longer ships this version and none is on disk.
            errors.append(f"{name}: {str(e).splitlines()[0]}")
            continue
        if i > 0:
            logging.warning(
                "VTAB task %s: %s is unavailable with this tensorflow-datasets (%s); "
                "using %s instead. Its example order may differ from the reference.",
                spec.name,
                spec.tfds_name,
                "; ".join(errors),
                _versioned_name(builder),
            )
        break
    if builder is None:
        raise DataNotPreparedError(
            f"VTAB task {spec.name!r}: no usable TFDS builder: " + "; ".join(errors)
        )
    if not mock_data and not builder.is_prepared():
        msg = _not_prepared_message(spec, builder, data_dir)
        if errors:
            msg += (
                f"\nThe reference version {spec.tfds_name} is unavailable with this "
                f"tensorflow-datasets ({'; '.join(errors)}); a copy prepared by an older "
                "tensorflow-datasets in the same data_dir would be used instead."
            )
        raise DataNotPreparedError(msg)
    return builder


def dataset_version(
    task: str | vtab.TaskSpec, data_dir: str | None = None, mock_data: bool = False
) -> str:
    """The exact TFDS dataset a task reads, for logging.

    Args:
      task: task name (or a `vtab.TaskSpec`).
      data_dir: TFDS data directory; None: TFDS default (~/tensorflow_datasets or
        $TFDS_DATA_DIR).
      mock_data: describe the mocked dataset instead.

    Returns:
      "name[/config]:version", e.g. "svhn_cropped:3.1.0"; prefixed "mock:" in mock mode.

    Raises:
      DataNotPreparedError: the dataset is not prepared (real mode).
    """
    spec = _spec(task)
    with _mock_context(mock_data, 1):
        builder = _open_builder(spec, data_dir, mock_data)
    return ("mock:" if mock_data else "") + _versioned_name(builder)


# ---------------------------------------------------------------------------------------
# Reading one role (train800 / val200 / test) of a task.

_SOURCE_RE = re.compile(r"^\s*([A-Za-z_][\w-]*)")


def _mock_range(role: str, m: int) -> tuple[int, int]:
    cut = (4 * m) // 5
    return {"train800": (0, cut), "val200": (cut, m), "test": (0, m)}[role]


def _role_split(spec: vtab.TaskSpec, role: str) -> str:
    return {"train800": spec.train800, "val200": spec.val200, "test": spec.test}[role]


def _eval_role(split: str) -> str:
    if split == "final":
        return "test"
    if split == "tune":
        return "val200"
    raise ValueError(f"split must be 'final' or 'tune', got {split!r}")


def _train_roles(split: str) -> tuple[str, ...]:
    if split == "final":
        return ("train800", "val200")
    if split == "tune":
        return ("train800",)
    raise ValueError(f"split must be 'final' or 'tune', got {split!r}")


def _role_count(spec, builder, role: str, mock_num_examples: int | None) -> int:
    if mock_num_examples is not None:
        lo, hi = _mock_range(role, mock_num_examples)
        return hi - lo
    return int(builder.info.splits[_role_split(spec, role)].num_examples)


def _role_dataset(spec, builder, role: str, mock_num_examples: int | None):
    """tf.data.Dataset of one role, in TFDS's deterministic order.

    Real mode reads the split string with the image left encoded (it is decoded after
    sharding). Mock mode reads the source split with no decoders at all, because TFDS's
    mock encoder rejects its own random sequences and boxes; its images arrive decoded.
    """
    tfds = _tfds()
    split = _role_split(spec, role)
    if mock_num_examples is None:
        return builder.as_dataset(
            split=split,
            shuffle_files=False,
            decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False),
        )
    ds = builder.as_dataset(split=_SOURCE_RE.match(split).group(1), shuffle_files=False)
    lo, hi = _mock_range(role, mock_num_examples)
    return ds.skip(lo).take(hi - lo)


def preprocess_image(image, image_size: int, *, grey: bool = False, scale: float = 1.0):
    """Converts one decoded image to a uint8 [image_size, image_size, 3] tensor.

    Any channel count is accepted (1: tiled to RGB; 4: alpha dropped), any dtype.

    Args:
      image: [H, W] or [H, W, C] tensor.
      image_size: output height and width.
      grey: the dataset is grey (documentation only: 1-channel images are always tiled).
      scale: factor applied to the raw values before resizing (dSprites: 255).

    Returns:
      uint8 tensor [image_size, image_size, 3].
    """
    del grey
    import tensorflow as tf

    img = tf.cast(image, tf.float32)
    if img.shape.rank == 2:
        img = img[..., None]
    channels = tf.shape(img)[-1]
    img = tf.gather(img, tf.minimum(tf.range(3), channels - 1), axis=-1)  # 1 -> tiled
    if scale != 1.0:
        img = img * scale
    img = tf.image.resize(img, (image_size, image_size), method="bicubic", antialias=True)
    img = tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(img, (image_size, image_size, 3))


def _example_fn(spec: vtab.TaskSpec, builder, image_size: int, decode: bool):
    import tensorflow as tf

    decode_image = builder.info.features["image"].decode_example

    def fn(ex):
        image = decode_image(ex["image"]) if decode else ex["image"]
        image = preprocess_image(image, image_size, grey=spec.grey, scale=spec.image_scale)
        label = tf.cast(spec.label_fn(ex), tf.int32)
        return {"image": image, "label": tf.ensure_shape(label, ())}

    return fn


def _resolve_mock(mock_data: bool, mock_num_examples: int | None) -> int | None:
    if not mock_data:
        return None
    m = DEFAULT_MOCK_EXAMPLES if mock_num_examples is None else int(mock_num_examples)
    if m < 4:
        raise ValueError(f"mock_num_examples must be >= 4, got {m}")
    return m


# ---------------------------------------------------------------------------------------
# Training data.


def load_train_set(
    task: str | vtab.TaskSpec,
    *,
    split: str = "final",
    image_size: int = 224,
    data_dir: str | None = None,
    mock_data: bool = False,
    mock_num_examples: int | None = None,
) -> dict[str, np.ndarray]:
    """Loads a task's VTAB-1k training set fully into memory.

    Args:
      task: task name (or a `vtab.TaskSpec`).
      split: "final": train800 followed by val200 (1,000 examples); "tune": train800.
      image_size: output height and width.
      data_dir: TFDS data directory (None: TFDS default).
      mock_data: read random mock data (see the module docstring for its slicing).
      mock_num_examples: examples per mock split (default 32); mock mode only.

    Returns:
      {"image": uint8 [N, image_size, image_size, 3], "label": int32 [N]}, in TFDS order.

    Raises:
      DataNotPreparedError: the dataset is not prepared (real mode).
      ValueError: unknown task or split.
    """
    import tensorflow as tf

    spec, m = _spec(task), _resolve_mock(mock_data, mock_num_examples)
    roles = _train_roles(split)
    images, labels = [], []
    with _mock_context(mock_data, m or 1):
        builder = _open_builder(spec, data_dir, mock_data)
        fn = _example_fn(spec, builder, image_size, decode=m is None)
        for role in roles:
            expected = _role_count(spec, builder, role, m)
            ds = _role_dataset(spec, builder, role, m)
            ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            n = 0
            for batch in ds.batch(_TRAIN_READ_BATCH).prefetch(2).as_numpy_iterator():
                images.append(batch["image"])
                labels.append(batch["label"])
                n += len(batch["label"])
            if n != expected:
                raise RuntimeError(f"{spec.name} {role}: read {n} examples, expected {expected}")
            if m is None and n != {"train800": 800, "val200": 200}[role]:
                logging.warning("%s %s has %d examples, not the VTAB-1k size.", spec.name, role, n)
    empty_img = np.zeros((0, image_size, image_size, 3), np.uint8)
    return {
        "image": np.concatenate(images) if images else empty_img,
        "label": np.concatenate(labels).astype(np.int32) if labels else np.zeros(0, np.int32),
    }


class TrainIterator:
    """Infinite, deterministic, resumable iterator over an in-memory train set.

    Epoch e shuffles with `np.random.default_rng([seed, e]).permutation(N)`; each epoch
    has `steps_per_epoch = N // batch_size` batches (remainder dropped). Batch k of a run
    depends only on (seed, k), so an iterator created with `start_step=k` yields exactly
    the batches k, k+1, ... of an uninterrupted run. With several processes,
    `batch_size` is global and process p yields rows [p*b, (p+1)*b) of the global batch,
    b = batch_size // process_count.

    Attributes:
      steps_per_epoch: batches per epoch.
      step: data position (batches consumed so far); save it in checkpoints.
      local_batch_size: rows this process yields per batch.
    """

    def __init__(
        self,
        data: dict[str, np.ndarray],
        *,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        """Creates the iterator.

        Args:
          data: {"image": uint8 [N, H, W, 3], "label": int [N]} (`load_train_set`).
          batch_size: global batch size; must divide by process_count and be <= N.
          seed: shuffling seed.
          start_step: number of batches already consumed (resume point).
          process_index: this process's index in [0, process_count).
          process_count: number of processes sharing the global batch.
        """
        self._images = np.asarray(data["image"])
        self._labels = np.asarray(data["label"]).astype(np.int32)
        n = len(self._labels)
        if len(self._images) != n:
            raise ValueError(f"{len(self._images)} images but {n} labels")
        if batch_size <= 0 or batch_size > n:
            raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
        if batch_size % process_count or not 0 <= process_index < process_count:
            raise ValueError(
                f"batch_size {batch_size} must divide by process_count {process_count} "
                f"and process_index {process_index} must be in [0, {process_count})"
            )
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch_size = batch_size // process_count
        self.steps_per_epoch = n // batch_size
        self.step = start_step
        self._perm_epoch, self._perm = -1, None

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self.step // self.steps_per_epoch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self._labels)), epoch
        return self._perm

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `step`, without moving the iterator.

        Args:
          step: global batch index (0-based, counted over epochs).

        Returns:
          {"image": float32 [b, H, W, 3] in [0, 1], "label": int32 [b]}.
        """
        epoch, k = divmod(step, self.steps_per_epoch)
        start = k * self.batch_size + self.process_index * self.local_batch_size
        idx = self._permutation(epoch)[start : start + self.local_batch_size]
        image = self._images[idx].astype(np.float32) / np.float32(255.0)
        return {"image": image, "label": self._labels[idx]}

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch


# ---------------------------------------------------------------------------------------
# Evaluation data.


def num_eval_examples(
    task: str | vtab.TaskSpec,
    *,
    split: str = "final",
    data_dir: str | None = None,
    mock_data: bool = False,
    mock_num_examples: int | None = None,
) -> int:
    """Number of examples of the evaluation split (over all processes).

    Args:
      task: task name (or a `vtab.TaskSpec`).
      split: "final" (test) or "tune" (val200).
      data_dir: TFDS data directory (None: TFDS default).
      mock_data: count the mock split instead.
      mock_num_examples: examples per mock split (default 32).

    Returns:
      The example count (from the TFDS metadata; nothing is read).

    Raises:
      DataNotPreparedError: the dataset is not prepared (real mode).
    """
    spec, m = _spec(task), _resolve_mock(mock_data, mock_num_examples)
    role = _eval_role(split)
    with _mock_context(mock_data, m or 1):
        builder = _open_builder(spec, data_dir, mock_data)
        return _role_count(spec, builder, role, m)


def eval_batches(
    task: str | vtab.TaskSpec,
    *,
    split: str = "final",
    batch_size: int,
    image_size: int = 224,
    data_dir: str | None = None,
    mock_data: bool = False,
    mock_num_examples: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Streams the evaluation split in padded, masked batches.

    Every example is yielded exactly once over all processes (with mask 1); padding rows
    are zeros with mask 0, so accuracy = sum(correct * mask) / sum(mask). Like
    `TrainIterator`, `batch_size` is global: each process yields batches of
    batch_size // process_count rows from its own disjoint shard (example i goes to
    process i % process_count), and all processes yield the same number of batches,
    ceil(ceil(N / process_count) / (batch_size // process_count)).

    The dataset is opened eagerly, so DataNotPreparedError is raised by this call, not
    by the first `next()`.

    Args:
      task: task name (or a `vtab.TaskSpec`).
      split: "final" (test split) or "tune" (val200).
      batch_size: global batch size; must divide by process_count.
      image_size: output height and width.
      data_dir: TFDS data directory (None: TFDS default).
      mock_data: read random mock data (see the module docstring for its slicing).
      mock_num_examples: examples per mock split (default 32); mock mode only.
      process_index: this process's index.
      process_count: number of processes.

    Returns:
      Iterator of {"image": float32 [b, S, S, 3] in [0, 1], "label": int32 [b],
      "mask": float32 [b]}, b = batch_size // process_count.

    Raises:
      DataNotPreparedError: the dataset is not prepared (real mode).
    """
    import tensorflow as tf

    if batch_size <= 0 or batch_size % process_count or not 0 <= process_index < process_count:
        raise ValueError(
            f"batch_size {batch_size} must be positive and divide by process_count "
            f"{process_count}; process_index {process_index} must be in [0, {process_count})"
        )
    spec, m = _spec(task), _resolve_mock(mock_data, mock_num_examples)
    role = _eval_role(split)
    local_bs = batch_size // process_count
    with _mock_context(mock_data, m or 1):
        builder = _open_builder(spec, data_dir, mock_data)
        total = _role_count(spec, builder, role, m)
        ds = _role_dataset(spec, builder, role, m)
    local_n = len(range(process_index, total, process_count))
    num_batches = math.ceil(math.ceil(total / process_count) / local_bs)
    if process_count > 1:
        ds = ds.shard(process_count, process_index)
    fn = _example_fn(spec, builder, image_size, decode=m is None)
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda ex: {**ex, "mask": tf.constant(1.0, tf.float32)})
    pad = {
        "image": tf.zeros((image_size, image_size, 3), tf.uint8),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(0.0, tf.float32),
    }
    num_pad = num_batches * local_bs - local_n
    ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(num_pad))
    ds = ds.batch(local_bs, drop_remainder=True)
    ds = ds.map(lambda b: {**b, "image": tf.cast(b["image"], tf.float32) / 255.0})
    ds = ds.prefetch(2)
    return _counted(ds.as_numpy_iterator(), num_batches, spec.name)


def _counted(it: Iterator[Any], num_batches: int, name: str) -> Iterator[Any]:
    n = 0
    for batch in it:
        n += 1
        yield batch
    if n != num_batches:  # metadata and data disagree: the padding would be wrong
        raise RuntimeError(f"{name}: eval yielded {n} batches, expected {num_batches}")


def num_classes(task: str) -> int:
    """Number of classes of a VTAB-1k task (ValueError listing the tasks for an unknown one)."""
    return vtab.get_task(task).num_classes
