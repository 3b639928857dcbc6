"""Training and evaluation loop: ``train_and_evaluate(config, workdir)``.

One jitted train step over a 1-D device mesh (batch sharded on "data", parameters
replicated); gradients and optimizer state exist for the trainable partition only; CLU metric
writers (TensorBoard + console); orbax checkpoints that resume a killed run exactly; a
``results.json`` at the end.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, parameter_overview, periodic_actions
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bitpet import checkpoints, evaluate, optim, partition, resume, scales
from bitpet.data import sources
from bitpet.data.pipeline import TrainIterator
from bitpet.models import vit

RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"
TASK_FILE = "task.bitpet"


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the task's adapter scale filled in and values validated."""
    config = ml_collections.ConfigDict(config.to_dict())
    if "data_source" not in config:
        config.data_source = "vtab"
    sources.get_source(config.data_source).num_classes(config.task)  # unknown task -> error
    if config.split not in ("final", "tune"):
        raise ValueError(f"config.split={config.split!r}; valid values: ['final', 'tune'].")
    partition.rules_for(config.trainable)
    config.model.scale = scales.resolve_scale(config.model, config.task)
    return config


def build_model(config) -> vit.VisionTransformer:
    """The model of a resolved config."""
    num_classes = sources.get_source(config.get("data_source", "vtab")).num_classes(config.task)
    return vit.from_config(config.model, num_classes)


def init_params(model, config) -> dict:
    """Initial params: random (seeded) init, then the backbone from ``config.init_file``."""
    shape = (1, config.image_size, config.image_size, 3)
    params = jax.jit(lambda rng: model.init(rng, jnp.zeros(shape, jnp.float32))["params"])(
        jax.random.PRNGKey(config.seed)
    )
    if config.init_file:
        return checkpoints.load_pretrained(config.init_file, params)
    logging.warning(
        "\n%s\nNO BACKBONE CHECKPOINT (config.init_file is empty): the ViT is RANDOMLY "
        "initialised. Results are meaningless for transfer learning. %s\n%s",
        "!" * 80, checkpoints.DOWNLOAD_HINT, "!" * 80,
    )  # fmt: skip
    return params


def versions() -> dict:
    """Library versions recorded in results.json."""
    import flax
    import orbax.checkpoint
    import tensorflow_datasets as tfds

    import bitpet

    return {
        "bitpet": bitpet.__version__, "python": sys.version.split()[0], "jax": jax.__version__,
        "flax": flax.__version__, "optax": optax.__version__,
        "orbax-checkpoint": orbax.checkpoint.__version__, "tensorflow-datasets": tfds.__version__,
        "backend": jax.default_backend(), "devices": jax.device_count(),
    }  # fmt: skip


def loss_fn(model, trainable, frozen, batch, rng):
    """Mean cross-entropy of a training batch; returns ``(loss, logits)``.

    Differentiate with respect to ``trainable`` only: the frozen backbone is a constant.
    """
    params = partition.merge(trainable, frozen)
    logits = model.apply({"params": params}, batch["image"], train=True, rngs={"dropout": rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return loss.mean(), logits


def make_step_fn(model, tx, schedule):
    """The (unjitted) step ``(state, frozen, batch, rng) -> (state, metrics)``.

    Only the trainable partition is differentiated: the backbone enters as a constant.
    """

    def step_fn(state, frozen, batch, rng):
        (loss, logits), grads = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)(
            model, state["params"], frozen, batch, jax.random.fold_in(rng, state["step"])
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
        }
        metrics = {
            "train_loss": loss,
            "train_accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
            "learning_rate": schedule(state["step"]),
            "grad_norm": optax.tree.norm(grads),
        }
        return new_state, metrics

    return step_fn


def make_train_step(model, tx, schedule, frozen_sharding, mesh):
    """:func:`make_step_fn` jitted over ``mesh``: batch on "data", state replicated, donated."""
    repl = NamedSharding(mesh, P())
    return jax.jit(
        make_step_fn(model, tx, schedule),
        in_shardings=(repl, frozen_sharding, NamedSharding(mesh, P("data")), repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )


class _QuietLibraries(pylogging.Filter):
    """Drops INFO chatter of orbax (dozens of lines per save) from the absl log."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
    """Installs :class:`_QuietLibraries` on the absl handler (idempotent)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
        handler.addFilter(_QuietLibraries())


def maybe_initialize_distributed(config) -> None:
    """Multi-host launch: ``jax.distributed.initialize()`` (Cloud TPU pods, SLURM, ...)."""
    if config.get("distributed", False) or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        if not jax.distributed.is_initialized():
            jax.distributed.initialize()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains per ``config``, evaluates periodically, writes checkpoints and results.json.

    Args:
      config: a config from ``configs/`` (see configs/vtab.py for the keys).
      workdir: output directory; an existing one with checkpoints is resumed.

    Returns:
      The results dict also written to ``workdir/results.json``.
    """
    start_time = time.time()
    quiet_library_logs()
    maybe_initialize_distributed(config)
    config = resolve(config)
    is_main = jax.process_index() == 0
    source = sources.get_source(config.data_source)
    os.makedirs(workdir, exist_ok=True)
    logging.info("Resolved config:\n%s", config)
    if is_main:
        _write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())

    # Data first: an unprepared dataset fails here within seconds.
    data_kwargs = dict(
        image_size=config.image_size, data_dir=config.data_dir or None,
        mock_data=config.mock_data, mock_num_examples=config.mock_num_examples,
    )  # fmt: skip
    train_set = source.load_train_set(config.task, split=config.split, **data_kwargs)
    dataset_version = source.dataset_version(
        config.task, data_dir=config.data_dir or None, mock_data=config.mock_data
    )
    logging.info("Dataset %s: %d training examples.", dataset_version, len(train_set["label"]))
    steps_per_epoch = max(len(train_set["label"]) // config.batch_size, 1)
    total_steps = config.total_steps or config.epochs * steps_per_epoch
    eval_every = config.eval_every_epochs * steps_per_epoch

    model = build_model(config)
    params = init_params(model, config)
    trainable, frozen = partition.split(params, partition.rules_for(config.trainable))
    n_train, n_frozen = partition.count(trainable), partition.count(frozen)
    logging.info("Trainable parameters: %d; frozen: %d.", n_train, n_frozen)
    parameter_overview.log_parameter_overview(trainable, msg="Trainable parameters")

    mesh = evaluate.data_mesh()
    repl = NamedSharding(mesh, P())
    if config.batch_size % jax.device_count():
        raise ValueError(
            f"batch_size={config.batch_size} must be divisible by the {jax.device_count()} devices."
        )
    tx, schedule = optim.make_optimizer(config, steps_per_epoch, total_steps)
    frozen = jax.device_put(frozen, repl)
    state = jax.device_put(
        {"params": trainable, "opt_state": tx.init(trainable), "step": jnp.zeros((), jnp.int32)},
        repl,
    )
    mngr = resume.manager(workdir)
    restored, meta = resume.restore_latest(mngr, state)
    evals = []
    if restored is not None:
        state, evals = restored, meta["evals"]
        logging.info(
            "Resumed from step %d (data position %d).", meta["step"], meta["data_position"]
        )
    start_step = int(state["step"])

    train_iter = TrainIterator(
        train_set, batch_size=config.batch_size, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count(),
    )  # fmt: skip
    train_step = make_train_step(model, tx, schedule, repl, mesh)
    eval_step = evaluate.make_eval_step(model, mesh)
    rng = jax.random.PRNGKey(config.seed + 1)

    writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
    if start_step == 0:
        writer.write_hparams(_flat_hparams(config))
    progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_secs=config.progress_every_secs
    )

    def save(step):
        resume.save(
            mngr, step, state, {"step": step, "data_position": train_iter.step, "evals": evals}
        )

    def run_eval(step):
        result = evaluate.evaluate_split(
            model, partition.merge(state["params"], frozen), config, mesh, eval_step
        )
        evals.append({"step": step, "epoch": step / steps_per_epoch, **result})
        writer.write_scalars(step, {"eval_accuracy": result["accuracy"]})
        logging.info("Step %d: eval accuracy %.4f on %d examples.", step, result["accuracy"],
                     result["num_examples"])  # fmt: skip

    window, window_start, last_line = [], time.time(), time.time()
    for step in range(start_step + 1, total_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = evaluate.shard_batch(next(train_iter), mesh)
            state, metrics = train_step(state, frozen, batch, rng)
        window.append(metrics)
        progress(step)
        if (
            step % config.log_every_steps == 0
            or step == total_steps
            or (time.time() - last_line > config.progress_every_secs)
        ):
            scalars = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
            elapsed = time.time() - window_start
            scalars["images_per_sec"] = len(window) * config.batch_size / max(elapsed, 1e-9)
            writer.write_scalars(step, scalars)
            eta = (total_steps - step) * elapsed / len(window)
            logging.info(
                "step %d/%d loss %.4f lr %.2e %.1f img/s ETA %.0fs", step, total_steps,
                scalars["train_loss"], scalars["learning_rate"], scalars["images_per_sec"], eta,
            )  # fmt: skip
            window, window_start, last_line = [], time.time(), time.time()
        if step % eval_every == 0 or step == total_steps:
            run_eval(step)
        if step % config.checkpoint_every_steps == 0 or step == total_steps:
            save(step)
    if start_step >= total_steps and not evals:
        run_eval(total_steps)
    writer.flush()

    task_bytes = None
    if is_main and config.trainable != "all":  # a full fine-tune is a backbone, not a task file
        from bitpet import taskfile

        params = jax.device_get(partition.merge(state["params"], frozen))
        task_bytes = taskfile.write(
            os.path.join(workdir, TASK_FILE), model, params, task=config.task, method=config.method
        )
        logging.info("Wrote %s (%d bytes).", os.path.join(workdir, TASK_FILE), task_bytes)
    results = _results(config, state, evals, n_train, task_bytes, dataset_version, start_time)
    if is_main:
        _write_json(os.path.join(workdir, RESULTS_FILE), results)
    logging.info("Results: %s", json.dumps(results, indent=1))
    return results


def _results(config, state, evals, n_train, task_bytes, dataset_version, start_time) -> dict:
    final = evals[-1]["accuracy"] if evals else None
    best = max(evals, key=lambda e: e["accuracy"]) if evals else None
    return {
        "task": config.task,
        "method": config.method,
        "split": config.split,
        "bits": config.model.bits,
        "h": config.model.h,
        "head_bits": config.model.head_bits,
        "blocks": config.model.blocks,
        "scale": config.model.scale,
        "variant": config.model.variant,
        "final_accuracy": final,
        "periodic_evals": evals,
        "best_periodic_accuracy_original_protocol": best
        and {
            "accuracy": best["accuracy"],
            "step": best["step"],
            "note": "Best of the periodic test evaluations, as the original code reports it: "
            "selected on the test set, hence optimistic. final_accuracy is the honest number.",
        },  # fmt: skip
        "trainable_parameters": n_train,
        "task_file": TASK_FILE if task_bytes is not None else None,
        "task_size_bytes": task_bytes,
        "steps": int(state["step"]),
        "wall_time_sec": time.time() - start_time,
        "dataset_version": dataset_version,
        "versions": versions(),
    }


def restore_trained(workdir: str):
    """Rebuilds a finished (or interrupted) run: ``(config, model, params)``.

    ``params`` holds the backbone (from ``config.init_file``, or the same seeded random init)
    and the latest checkpointed trainable parameters.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} the workdir of a bitpet run?")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    model = build_model(config)
    params = init_params(model, config)
    trainable, frozen = partition.split(params, partition.rules_for(config.trainable))
    mngr = resume.manager(workdir)
    if mngr.latest_step() is None:
        raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints.")
    # Only the shapes matter for the restore target (optimizer state included).
    steps_per_epoch = 1
    tx, _ = optim.make_optimizer(config, steps_per_epoch, max(config.total_steps, 1))
    abstract = jax.eval_shape(
        lambda t: {"params": t, "opt_state": tx.init(t), "step": jnp.zeros((), jnp.int32)},
        trainable,
    )
    state, _ = resume.restore_latest(mngr, abstract)
    return config, model, partition.merge(state["params"], frozen)


def _flat_hparams(config) -> dict:
    out = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(config.to_dict())
    return out


def _write_json(path: str, obj) -> None:
    """Atomic JSON write (temp file + rename)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    os.replace(tmp, path)
