"""``python -m bitpet``: inspect, import-original, export, ptq, evaluate."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from release_files import RELEASE

from bitpet import cli, taskfile
from bitpet.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AF32 = os.path.join(RELEASE, "models_bin", "adaptformer", "cifar-bit1-dim32.bin")
needs_release = pytest.mark.skipif(not os.path.exists(AF32), reason="release files not found")


def run(capsys, *argv):
    rc = cli.main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("imp") / "cifar_af32.bitpet"
    assert cli.main(["import-original", AF32, "--out", str(out), "--fingerprint", "ab" * 8]) == 0
    return out


@needs_release
def test_inspect_imported_adaptformer_h32(capsys, imported):
    rc, out, _ = run(capsys, "inspect", imported)
    assert rc == 0
    assert re.search(r"adapter payload\s+73920 B\s+72\.2 KiB", out), out
    assert re.search(r"head\s+307600 B", out)
    assert "task:        cifar100 (100 classes)" in out
    assert "fingerprint abababababababab" in out
    assert out.count("adaptformer/down/kernel") == 12  # per-matrix table
    rc, out, _ = run(capsys, "inspect", imported, "--json")
    sizes = json.loads(out)["sizes"]
    assert sizes["adapter_bytes"] == 73920 and round(sizes["adapter_kib"], 1) == 72.2
    assert sizes["header_bytes"] <= 1024
    assert sizes["total_bytes"] == os.path.getsize(imported)


@needs_release
def test_python_dash_m_bitpet(imported):
    proc = subprocess.run(
        [sys.executable, "-m", "bitpet", "inspect", "--no-rows", str(imported)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"adapter payload\s+73920 B\s+72\.2 KiB", proc.stdout)


@needs_release
def test_errors_exit_1_with_a_message(capsys, tmp_path, imported):
    bad = tmp_path / "bad.bitpet"
    data = bytearray(imported.read_bytes())
    data[5000] ^= 0xFF
    bad.write_bytes(bytes(data))
    rc, _, err = run(capsys, "inspect", bad)
    assert rc == 1 and "checksum" in err
    bad.write_bytes(open(AF32, "rb").read())
    rc, _, err = run(capsys, "inspect", bad)
    assert rc == 1 and "import-original" in err  # a raw release file: says how to convert
    rc, _, err = run(capsys, "inspect", tmp_path / "missing")
    assert rc == 1 and "No such file" in err
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


# ---------------------------------------------------------------------------------------
# export / ptq / evaluate against the trainer (bitpet.train.restore_trained and
# bitpet.evaluate.evaluate_split).


def _fake_run(kind="lora", bits=32):
    """(config, model, params) as restore_trained returns them, for a tiny random model."""
    import ml_collections

    config = ml_collections.ConfigDict(
        dict(task="dtd", method="lora", model=dict(dtype="float32", remat=False))
    )
    model = vit.VisionTransformer(
        num_classes=5,
        variant="testing",
        adapter=vit.AdapterSpec(kind=kind, hidden=4, bits=bits, scale=0.5),
    )
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    shapes = vit.param_names(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    rng = np.random.default_rng(0)
    flat = {n: rng.normal(0, 0.2, s.shape).astype(np.float32) for n, s in shapes.items()}
    return config, model, vit.unflatten(flat)


def test_ptq_and_export_with_a_stub_trainer(capsys, tmp_path, monkeypatch):
    run_ = _fake_run()
    stub = types.ModuleType("bitpet.train")
    stub.restore_trained = lambda workdir: run_
    monkeypatch.setitem(sys.modules, "bitpet.train", stub)
    out = tmp_path / "ptq.bitpet"
    rc, text, err = run(
        capsys, "ptq", "--workdir", tmp_path, "--bits", 2, "--codebook", "kmeans", "--out", out
    )
    assert rc == 0, err
    tf = taskfile.read(out)
    assert tf.method == "ptq-kmeans" and tf.meta["bits"] == 2 and tf.task == "dtd"
    rc, text, err = run(capsys, "export", "--workdir", tmp_path, "--out", tmp_path / "e.bitpet")
    assert rc == 0, err
    assert taskfile.read(tmp_path / "e.bitpet").meta["bits"] == 32

    # evaluate: the model is rebuilt from the file; fingerprints are checked.
    seen = {}

    def evaluate_split(model, params, config):
        x = jnp.ones((2, 16, 16, 3))
        seen["logits"] = model.apply({"params": params}, x)
        return {"accuracy": np.float32(0.5), "num_examples": 2}

    stub_eval = types.ModuleType("bitpet.evaluate")
    stub_eval.evaluate_split = evaluate_split
    monkeypatch.setitem(sys.modules, "bitpet.evaluate", stub_eval)
    rc, text, err = run(capsys, "evaluate", out, "--workdir", tmp_path)
    assert rc == 0, err
    assert json.loads(text) == {"file": str(out), "task": "dtd", "accuracy": 0.5, "num_examples": 2}
    from bitpet import ptq

    res = ptq.ptq(run_[1], run_[2], 2, codebook="kmeans")
    ref = res.model.apply({"params": res.params}, jnp.ones((2, 16, 16, 3)))
    assert np.array_equal(np.asarray(ref), np.asarray(seen["logits"]))

    other = taskfile.write(
        tmp_path / "fp.bitpet", *run_[1:], task="dtd", method="lora", fingerprint="f" * 16
    )
    assert other > 0
    rc, _, err = run(capsys, "evaluate", tmp_path / "fp.bitpet", "--workdir", tmp_path)
    assert rc == 1 and "--allow-fingerprint-mismatch" in err
    rc, _, err = run(
        capsys,
        "evaluate",
        tmp_path / "fp.bitpet",
        "--workdir",
        tmp_path,
        "--allow-fingerprint-mismatch",
    )
    assert rc == 0, err
    rc, _, err = run(capsys, "evaluate", out, "--config", f"{REPO}/configs/vtab.py:lora,task=dtd")
    assert rc == 1 and "init_file" in err
    rc, _, err = run(capsys, "evaluate", out, "--config", f"{REPO}/configs/vtab.py:lora,task=svhn")
    assert rc == 1 and "task 'dtd'" in err
    rc, _, err = run(capsys, "evaluate", out, "--workdir", tmp_path, "--config.nope=1")
    assert rc == 1 and "no such config key" in err

    # --config: the backbone comes from config.init_file (an npz with vit_jax names).
    npz = tmp_path / "backbone.npz"
    flat = vit.param_names(run_[2])
    np.savez(npz, **{n: v for n, v in flat.items() if "lora" not in n and "head" not in n})
    cfg = [f"{REPO}/configs/vtab.py:lora,task=dtd", f"--config.init_file={npz}"]
    rc, text, err = run(capsys, "evaluate", out, "--config", *cfg, "--config.image_size=16")
    assert rc == 0, err
    assert np.array_equal(np.asarray(ref), np.asarray(seen["logits"]))


@pytest.mark.slow
def test_export_and_evaluate_a_real_run(capsys, tmp_path):
    sys.path.insert(0, REPO)
    from bitpet import train
    from configs import vtab

    config = vtab.get_config("bi_lora,task=dtd,h=4")
    config.update(
        dict(image_size=16, batch_size=8, eval_batch_size=16, mock_data=True, total_steps=1)
    )
    config.mock_num_examples = 16
    config.model.variant = "testing"
    workdir = tmp_path / "run"
    results = train.train_and_evaluate(config, str(workdir))
    capsys.readouterr()

    out = tmp_path / "export.bitpet"
    rc, text, err = run(capsys, "export", "--workdir", workdir, "--out", out)
    assert rc == 0, err
    assert out.read_bytes() == (workdir / "task.bitpet").read_bytes()
    rc, text, err = run(capsys, "evaluate", out, "--workdir", workdir)
    assert rc == 0, err
    metrics = json.loads(text.strip().splitlines()[-1])
    n = metrics["num_examples"]
    assert n > 0 and abs(metrics["accuracy"] - results["final_accuracy"]) <= 1 / n + 1e-9
