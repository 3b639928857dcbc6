"""Offline demo: pretrain a small ViT on real digits (cached), then transfer a 1-bit adapter.

``python main.py --config=configs/demo.py --workdir=/tmp/bitpet-demo`` runs :func:`main`
(``configs/demo.py`` sets ``config.entry_point = "bitpet.demo:main"``):

1. :func:`prepare` fetches the backbone from the cache, or pretrains it first: a small ViT
   trained from scratch on the real MNIST digits 0-4 (:mod:`bitpet.data.offline`) with a minimal
   full-training loop built from bitpet's own model, iterator and evaluator; the backbone is saved
   with :func:`bitpet.checkpoints.save_npz` under ``$BITPET_CACHE`` (default
   ``~/.cache/bitpet``) with a name keyed by a hash of every pretraining setting, so the next run
   (any workdir, any downstream task) reuses it. Writes are atomic and a file lock stops two
   processes from pretraining the same backbone at once.
2. :func:`bitpet.train.train_and_evaluate` fine-tunes the adapter on a *different* task
   (default: the held-out digits 5-9) on the frozen backbone, exactly as for VTAB, and writes the
   task file.
3. :func:`reload_and_report` reads the task file back from disk, applies it to a freshly loaded
   backbone (:func:`bitpet.taskfile.load_into`), evaluates that model on the test split and
   prints the accuracy, the file size and what they mean; the numbers are added to
   ``results.json`` under ``"demo"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bitpet import checkpoints, evaluate, taskfile, train
from bitpet.data import offline
from bitpet.data.pipeline import TrainIterator
from bitpet.models import vit

CACHE_ENV = "BITPET_CACHE"
CACHE_FORMAT = 1  # bump when the pretraining loop itself changes

# Pretraining recipe of the demo backbone (every key is part of the cache key).
PRETRAIN_DEFAULTS: dict[str, Any] = dict(
    task=offline.PRETRAIN_TASK,  # real MNIST digits 0-4
    variant="micro/7",
    image_size=28,
    steps=1200,
    batch_size=64,
    lr=2e-3,
    weight_decay=0.05,
    warmup_steps=100,
    shift=2,  # random translation (pixels) as augmentation
    seed=0,
)


def say(text: str = "") -> None:
    """Prints one line to stdout at once (progress and the final report)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------
# Cache.


def cache_dir() -> str:
    """``$BITPET_CACHE`` if set, else ``~/.cache/bitpet``."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "bitpet"))


def pretrain_settings(settings: dict[str, Any] | None = None, **overrides) -> dict[str, Any]:
    """:data:`PRETRAIN_DEFAULTS` updated with ``settings`` and ``overrides`` (unknown keys fail)."""
    out = dict(PRETRAIN_DEFAULTS)
    for key, value in {**dict(settings or {}), **overrides}.items():
        if key not in out:
            raise ValueError(f"Unknown pretraining setting {key!r}; valid: {sorted(out)}.")
        out[key] = type(out[key])(value)
    offline.get_task(out["task"])
    vit.get_variant(out["variant"])
    return out


def settings_key(settings: dict[str, Any]) -> str:
    """Hash (12 hex digits) of the settings, the offline data version and the loop version."""
    blob = json.dumps(
        {"settings": settings, "data": offline.VERSION, "format": CACHE_FORMAT}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def backbone_path(settings: dict[str, Any]) -> str:
    """Cache path of the backbone npz for ``settings`` (its JSON sidecar: + ``.json``)."""
    name = f"backbone-{settings['variant'].replace('/', '_')}-{settings['image_size']}px-"
    return os.path.join(cache_dir(), f"{name}{settings_key(settings)}.npz")


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: str):
    """Exclusive advisory lock on ``path + ".lock"`` (waits for another pretraining process)."""
    with open(path + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pretrained_backbone(settings: dict[str, Any] | None = None, **overrides) -> str:
    """Path of the cached backbone for these settings; pretrains and caches it if missing.

    Args:
      settings: pretraining settings (see :data:`PRETRAIN_DEFAULTS`); missing keys default.
      **overrides: individual settings.

    Returns:
      Path of an npz readable by :func:`bitpet.checkpoints.load_pretrained`.
    """
    settings = pretrain_settings(settings, **overrides)
    path = backbone_path(settings)
    if os.path.exists(path):
        say(f"[bitpet demo] Using the cached pretrained backbone {path}")
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _locked(path):
        if os.path.exists(path):  # another process finished it while we waited
            return path
        say(
            f"[bitpet demo] No cached backbone for these settings: pretraining ViT-"
            f"{settings['variant']} from scratch on {settings['task']} "
            f"({settings['steps']} steps; once per machine)."
        )
        params, info = pretrain(settings)
        checkpoints.save_npz(path, params)  # atomic; the head is dropped
        _write_json(path + ".json", info)
        say(f"[bitpet demo] Cached the backbone at {path}")
    return path


def backbone_info(path: str) -> dict[str, Any]:
    """The JSON sidecar of a cached backbone (settings, pretraining accuracy, time), or {}."""
    try:
        with open(path + ".json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------
# Pretraining.


def _shift(images: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Random translation by up to ``max_shift`` pixels per image (zero fill)."""
    if max_shift <= 0:
        return images
    n, h, w, _ = images.shape
    p = max_shift
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    dy, dx = rng.integers(0, 2 * p + 1, size=(2, n))
    return np.stack([padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def pretrain(settings: dict[str, Any]) -> tuple[dict, dict[str, Any]]:
    """Trains every parameter of a ViT from scratch on ``settings["task"]`` (minimal loop).

    bitpet's own :class:`~bitpet.models.vit.VisionTransformer` (no adapters), its
    :class:`~bitpet.data.pipeline.TrainIterator` (deterministic shuffling) and its
    :func:`~bitpet.evaluate.evaluate`; AdamW with a linear warm-up and a cosine decay; random
    translations as the only augmentation. No checkpoints: a few thousand steps of a tiny model.

    Returns:
      ``(params, info)``: the trained params (head included) and a JSON-friendly summary
      (settings, test accuracy, wall time, versions).
    """
    start = time.time()
    size, task = settings["image_size"], settings["task"]
    data = offline.load_train_set(task, split="final", image_size=size)
    model = vit.VisionTransformer(
        num_classes=offline.num_classes(task), variant=settings["variant"]
    )
    params = model.init(jax.random.PRNGKey(settings["seed"]), jnp.zeros((1, size, size, 3)))[
        "params"
    ]
    schedule = optax.warmup_cosine_decay_schedule(
        1e-6, settings["lr"], settings["warmup_steps"], settings["steps"], settings["lr"] / 100
    )
    tx = optax.adamw(schedule, weight_decay=settings["weight_decay"])
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, labels):
        def loss_fn(p):
            logits = model.apply({"params": p}, images, train=True)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, jnp.mean(jnp.argmax(logits, -1) == labels)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, acc

    it = TrainIterator(data, batch_size=settings["batch_size"], seed=settings["seed"])
    rng = np.random.default_rng(settings["seed"])
    total, window, t_last, t_first = settings["steps"], [], time.time(), time.time()
    for i in range(1, total + 1):
        batch = it.batch_at(i - 1)
        images = _shift(batch["image"], settings["shift"], rng)
        params, opt_state, loss, acc = step(params, opt_state, images, batch["label"])
        window.append((loss, acc))
        if i == 1:
            t_first = time.time()  # after compilation
        if i == total or time.time() - t_last > 10:
            loss_m, acc_m = (float(np.mean([float(v[k]) for v in window])) for k in (0, 1))
            eta = (time.time() - t_first) / max(i - 1, 1) * (total - i)
            say(
                f"[bitpet demo] pretraining step {i}/{total}: loss {loss_m:.3f}, train accuracy "
                f"{acc_m:.3f}, {time.time() - start:.0f}s elapsed, ETA {eta:.0f}s"
            )
            window, t_last = [], time.time()
    params = jax.device_get(params)
    result = evaluate.evaluate(
        model, params, offline.eval_batches(task, batch_size=250, image_size=size)
    )
    info = {
        "settings": settings,
        "key": settings_key(settings),
        "pretrain_test_accuracy": result["accuracy"],
        "pretrain_test_examples": result["num_examples"],
        "dataset_version": offline.dataset_version(task),
        "wall_time_sec": time.time() - start,
        "versions": train.versions(),
    }
    say(
        f"[bitpet demo] Pretraining done in {info['wall_time_sec']:.0f}s: test accuracy "
        f"{result['accuracy']:.3f} on {result['num_examples']} held-out {task} digits."
    )
    return params, info


# ---------------------------------------------------------------------------------------
# The demo run.


def prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose ``init_file`` is the (cached or fresh) demo backbone.

    The backbone is pretrained with ``config.pretrain`` settings, at ``config.image_size`` and
    ``config.model.variant`` so that it fits the model being fine-tuned.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    settings = dict(config.get("pretrain") or {})
    settings.update(variant=config.model.variant, image_size=config.image_size)
    config.init_file = pretrained_backbone(settings)
    return config


def float_sizes(model: vit.VisionTransformer) -> dict[str, int]:
    """Task-file bytes of the same model with 32-bit (float) adapters, for comparison."""
    float_model = model.clone(adapter=dataclasses.replace(model.adapter, bits=32), head_bits=32)
    rep = taskfile.size_report(float_model)
    return {"adapter_bytes": rep.adapter_bytes, "total_bytes": rep.total_bytes}


def reload_and_report(config: ml_collections.ConfigDict, workdir: str, results: dict) -> dict:
    """Reloads the run's task file onto a fresh backbone, evaluates it and explains the numbers.

    Returns:
      The "demo" summary (also merged into ``workdir/results.json``).
    """
    config = train.resolve(config)
    path = os.path.join(workdir, train.TASK_FILE)
    say(f"[bitpet demo] Reloading {path} from disk onto a freshly loaded backbone ...")
    tf = taskfile.read(path)
    backbone = checkpoints.normalize_names(checkpoints.read_npz(config.init_file))
    model, params = taskfile.load_into(tf, backbone)
    batches = offline.eval_batches(
        config.task,
        split=config.split,
        batch_size=config.eval_batch_size,
        image_size=config.image_size,
    )
    reloaded = evaluate.evaluate(model, params, batches)
    rep = taskfile.size_report(tf)
    fsize = float_sizes(train.build_model(config))
    n_cls = offline.num_classes(config.task)
    labels = offline.eval_labels(config.task, split=config.split, image_size=config.image_size)
    majority = float(np.bincount(labels).max() / len(labels))
    info = backbone_info(config.init_file)
    summary = {
        "task": config.task,
        "method": config.method,
        "bits": config.model.bits,
        "h": config.model.h,
        "reloaded_test_accuracy": reloaded["accuracy"],
        "test_examples": reloaded["num_examples"],
        "training_run_final_accuracy": results.get("final_accuracy"),
        "chance_accuracy": 1.0 / n_cls,
        "majority_class_accuracy": majority,
        "task_file": path,
        "task_file_bytes": os.path.getsize(path),
        "adapter_payload_bytes": rep.adapter_bytes,
        "head_bytes": rep.head_bytes,
        "header_bytes": rep.header_bytes,
        "float32_adapter_payload_bytes": fsize["adapter_bytes"],
        "backbone": config.init_file,
        "backbone_pretrain_test_accuracy": info.get("pretrain_test_accuracy"),
    }
    _print_report(config, summary)
    merged = dict(results, demo=summary)
    train._write_json(os.path.join(workdir, train.RESULTS_FILE), merged)
    return summary


def _print_report(config, s: dict) -> None:
    acc, chance = s["reloaded_test_accuracy"], s["chance_accuracy"]
    spec = offline.get_task(config.task)
    ratio = s["float32_adapter_payload_bytes"] / max(s["adapter_payload_bytes"], 1)
    say("")
    say("=" * 78)
    say(
        f"Test accuracy of the reloaded model: {100 * acc:.2f} % "
        f"({s['test_examples']} test images of {config.task}: {spec.description})"
    )
    say(f"Task file: {s['task_file']} = {s['task_file_bytes']} bytes")
    say("=" * 78)
    say(
        f"What this means: the task has {spec.num_classes} classes, so guessing gives "
        f"{100 * chance:.1f} % (always answering the most frequent class: "
        f"{100 * s['majority_class_accuracy']:.1f} %)."
    )
    say(
        f"The backbone was pretrained only on the digits 0-4 and stayed frozen; the "
        f"{config.method} adapter (h={s['h']}, {s['bits']}-bit weights) and the classifier head "
        f"are all that was trained for {config.task}."
    )
    say(
        f"The file holds {s['adapter_payload_bytes']} bytes of {s['bits']}-bit adapter weights "
        f"(plus their mean and std), {s['head_bytes']} bytes of float32 head and "
        f"{s['header_bytes']} bytes of header. The same adapter in float32 would take "
        f"{s['float32_adapter_payload_bytes']} bytes, {ratio:.0f}x more."
    )
    if s["training_run_final_accuracy"] is not None:
        same = abs(s["training_run_final_accuracy"] - acc) < 1e-9
        say(
            "Reloading from disk reproduces the accuracy measured at the end of training "
            f"({100 * s['training_run_final_accuracy']:.2f} %)"
            + (" exactly." if same else " up to float rounding.")
        )
    say("=" * 78)


def main(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """The whole demo: backbone (cached or pretrained), fine-tuning, reload, report.

    Returns:
      ``results.json``'s contents (the training results plus the ``"demo"`` summary).
    """
    start = time.time()
    say(f"[bitpet demo] Offline transfer demo; workdir {workdir}; cache {cache_dir()}")
    config = prepare(config)
    say(
        f"[bitpet demo] Fine-tuning {config.method} (bits={config.model.bits}, "
        f"h={config.model.h}) on {config.task} on the frozen backbone ..."
    )
    results = train.train_and_evaluate(config, workdir)
    summary = reload_and_report(config, workdir, results)
    say(
        f"[bitpet demo] Done in {time.time() - start:.0f}s. Results: "
        f"{os.path.join(workdir, train.RESULTS_FILE)}"
    )
    return dict(results, demo=summary)
