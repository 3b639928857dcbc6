"""Training loop: CLI runs, frozen backbone, resume after SIGKILL, multi-device equivalence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_utils import tiny_config

from bitpet import partition, resume, train
from bitpet.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = [
    "--config.mock_data=True",
    "--config.mock_num_examples=24",
    "--config.model.variant=testing",
    "--config.image_size=16",
    "--config.batch_size=8",
    "--config.eval_batch_size=16",
]


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2", **extra)
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def _run_main(workdir, config_arg, *flags, **popen):
    config = f"--config={REPO}/configs/vtab.py:{config_arg}"
    cmd = [sys.executable, os.path.join(REPO, "main.py"), config, f"--workdir={workdir}"]
    cmd += [*TINY_FLAGS, *flags]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)  # fmt: skip


def _trainable_params(workdir):
    _, model, params = train.restore_trained(str(workdir))
    trainable, _ = partition.split(params, partition.rules_for("adapters"))
    return vit.param_names(trainable), params


def test_cli_smoke_run_leaves_logs_checkpoint_and_results(tmp_path):
    proc = _run_main(tmp_path, "bi_lora,task=cifar100", "--config.total_steps=3")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    names = os.listdir(tmp_path)
    assert any(n.startswith("events.out.tfevents") for n in names), names
    assert "results.json" in names and "config.json" in names and "task.bitpet" in names
    assert resume.manager(str(tmp_path)).latest_step() == 3
    results = json.load(open(tmp_path / "results.json"))
    assert results["method"] == "bi_lora" and results["bits"] == 1 and results["h"] == 32
    assert results["scale"] == 0.1  # cifar100, LoRA, h=32, float head (released table)
    assert results["steps"] == 3
    assert 0.0 <= results["final_accuracy"] <= 1.0
    assert results["task_size_bytes"] == os.path.getsize(tmp_path / "task.bitpet")
    assert "best_periodic_accuracy_original_protocol" in results
    assert "RANDOMLY" in out  # loud warning without init_file
    assert "Resolved config" in out


@pytest.mark.parametrize("method", ["adaptformer", "lora", "bi_adaptformer", "linear", "full"])
def test_every_method_trains_and_writes_results(tmp_path, method):
    results = train.train_and_evaluate(
        tiny_config(f"{method},task=dtd", total_steps=2), str(tmp_path)
    )
    assert results["method"] == method and results["steps"] == 2
    assert os.path.exists(tmp_path / "results.json")
    assert resume.manager(str(tmp_path)).latest_step() == 2
    assert (results["task_size_bytes"] is None) == (method == "full")


def test_frozen_params_unchanged_and_no_optimizer_state_for_them(tmp_path):
    config = tiny_config("bi_adaptformer,task=dtd", total_steps=3)
    train.train_and_evaluate(config, str(tmp_path))
    resolved = train.resolve(config)
    model = train.build_model(resolved)
    init = vit.param_names(train.init_params(model, resolved))
    _, params = _trainable_params(tmp_path)
    trained = vit.param_names(params)
    frozen_names = [n for n in init if not ("adaptformer" in n or n.startswith("head/"))]
    assert frozen_names, "the test needs a frozen backbone"
    for name in frozen_names:  # bit-identical backbone
        np.testing.assert_array_equal(np.asarray(trained[name]), np.asarray(init[name]), name)
    changed = [n for n in init if n not in frozen_names and not np.array_equal(init[n], trained[n])]
    assert changed, "adapters/head should have moved"

    # The optimizer state holds moments for trainable leaves only.
    tx, _ = __import__("bitpet.optim", fromlist=["x"]).make_optimizer(resolved, 1, 3)
    trainable, frozen = partition.split(
        train.init_params(model, resolved), partition.rules_for("adapters")
    )
    opt_state = tx.init(trainable)
    n_opt = sum(x.size for x in jax.tree.leaves(opt_state) if x.ndim > 0)
    assert n_opt == 2 * partition.count(trainable)
    assert partition.count(frozen) > 0


def test_gradients_only_for_the_trainable_partition():
    config = train.resolve(tiny_config("bi_lora,task=dtd"))
    model = train.build_model(config)
    params = train.init_params(model, config)
    trainable, frozen = partition.split(params, partition.rules_for("adapters"))
    batch = {"image": jnp.ones((2, 16, 16, 3)), "label": jnp.array([0, 1])}
    grads = jax.grad(lambda t: train.loss_fn(model, t, frozen, batch, jax.random.PRNGKey(0))[0])(
        trainable
    )
    assert set(vit.param_names(grads)) == set(vit.param_names(trainable))
    assert all("lora" in n or n.startswith("head/") for n in vit.param_names(grads))


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted_run(tmp_path):
    flags = ["--config.total_steps=200", "--config.checkpoint_every_steps=10",
             "--config.eval_every_epochs=1000", "--config.log_every_steps=100"]  # fmt: skip
    ref = _run_main(tmp_path / "ref", "bi_lora,task=dtd", *flags)
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out[-3000:]

    work = tmp_path / "killed"
    proc = _run_main(work, "bi_lora,task=dtd", *flags, start_new_session=True)
    ckpt_dir = work / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.exists() and any(p.isdigit() for p in os.listdir(ckpt_dir)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (work / "results.json").exists()
    killed_at = resume.manager(str(work)).latest_step()
    assert killed_at is not None and killed_at < 200

    again = _run_main(work, "bi_lora,task=dtd", *flags)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out[-3000:]
    assert "Resumed from step" in out
    a, _ = _trainable_params(tmp_path / "ref")
    b, _ = _trainable_params(work)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), name)


MULTI_DEVICE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, "tests")
    from train_utils import tiny_config
    from bitpet import train, partition
    from bitpet.models import vit

    assert jax.device_count() == 8, jax.devices()
    config = train.resolve(tiny_config("bi_lora,task=dtd"))
    model = train.build_model(config)
    params = train.init_params(model, config)
    trainable, frozen = partition.split(params, partition.rules_for("adapters"))
    rng = np.random.default_rng(0)
    batch = {"image": rng.random((16, 16, 16, 3), np.float32),
             "label": rng.integers(0, 47, 16).astype(np.int32)}

    def run(devices):
        mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        f = jax.jit(jax.value_and_grad(lambda t, fr, b, r: train.loss_fn(model, t, fr, b, r)[0]),
                    in_shardings=(repl, repl, data, repl), out_shardings=(repl, repl))
        loss, grads = f(trainable, frozen, jax.device_put(batch, data), jax.random.PRNGKey(3))
        return float(loss), {k: np.asarray(v) for k, v in vit.param_names(grads).items()}

    l1, g1 = run(jax.devices()[:1])
    l8, g8 = run(jax.devices())
    diff = max(float(np.max(np.abs(g1[k] - g8[k]))) for k in g1)
    scale = max(float(np.max(np.abs(g1[k]))) for k in g1)
    print(json.dumps({"loss1": l1, "loss8": l8, "grad_diff": diff, "grad_scale": scale}))
    """
)


def test_eight_devices_match_one_device():
    out = subprocess.run(
        [sys.executable, "-c", MULTI_DEVICE_SCRIPT], cwd=REPO, capture_output=True, text=True,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(r["loss1"] - r["loss8"]) <= 1e-5
    assert r["grad_scale"] > 0
    assert r["grad_diff"] <= 1e-5


def test_unprepared_dataset_fails_fast_with_instructions(tmp_path):
    start = time.time()
    proc = _run_main(tmp_path / "w", "bi_lora,task=dtd", "--config.mock_data=False",
                     f"--config.data_dir={tmp_path}/no_data")  # fmt: skip
    out, _ = proc.communicate(timeout=120)
    elapsed = time.time() - start
    assert proc.returncode != 0
    assert "tfds build" in out, out[-2000:]
    # A generous bound: it only has to rule out the ~200 s offline retry loop of tfds.load.
    assert elapsed < 60, f"took {elapsed:.1f}s"
