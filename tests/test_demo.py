"""Tests of the offline demo path (bitpet.demo, configs/demo.py) on a tiny configuration."""

from __future__ import annotations

import importlib
import json
import os

import pytest

from bitpet import demo, taskfile
from configs import demo as demo_config

TINY_PRETRAIN = dict(steps=3, warmup_steps=1, batch_size=16)


def tiny_config(**overrides):
    """configs/demo.py shrunk to the "testing" ViT at 16 px and a few steps."""
    config = demo_config.get_config("bi_lora,task=lfw_faces,h=4")
    config.image_size = 16
    config.model.variant = "testing"
    config.batch_size = 16
    config.eval_batch_size = 50
    config.total_steps = 4
    config.eval_every_epochs = 100
    config.log_every_steps = 2
    config.pretrain.update(TINY_PRETRAIN)
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv(demo.CACHE_ENV, str(path))
    return path


def test_config_dispatches_to_demo():
    config = demo_config.get_config()
    module, _, name = config.entry_point.partition(":")
    assert getattr(importlib.import_module(module), name) is demo.main
    assert config.data_source == "offline" and config.task == "mnist_5to9"
    assert config.model.bits == 1 and config.model.scale > 0
    with pytest.raises(ValueError, match="valid offline tasks"):
        demo_config.get_config("bi_lora,task=cifar100")


def test_cache_key_and_location(cache):
    a = demo.pretrain_settings()
    assert demo.cache_dir() == str(cache)
    assert demo.backbone_path(a).startswith(str(cache))
    assert demo.backbone_path(a) == demo.backbone_path(demo.pretrain_settings())
    assert demo.backbone_path(a) != demo.backbone_path(demo.pretrain_settings(steps=7))
    with pytest.raises(ValueError, match="Unknown pretraining setting"):
        demo.pretrain_settings(nonsense=1)


def test_demo_end_to_end_and_cache_reuse(cache, tmp_path, capsys, monkeypatch):
    results = demo.main(tiny_config(), str(tmp_path / "run1"))
    out = capsys.readouterr().out
    assert "pretraining ViT-testing" in out
    assert "Test accuracy of the reloaded model" in out and "bytes" in out

    s = results["demo"]
    path = tmp_path / "run1" / "task.bitpet"
    assert path.exists() and s["task_file_bytes"] == os.path.getsize(path)
    assert 0.0 <= s["reloaded_test_accuracy"] <= 1.0 and s["test_examples"] == 100
    assert s["reloaded_test_accuracy"] == pytest.approx(s["training_run_final_accuracy"])
    assert s["chance_accuracy"] == 0.5
    assert s["float32_adapter_payload_bytes"] > 16 * s["adapter_payload_bytes"]
    with open(tmp_path / "run1" / "results.json") as f:
        assert json.load(f)["demo"]["task_file_bytes"] == s["task_file_bytes"]
    tf = taskfile.read(str(path))
    assert tf.meta["bits"] == 1 and tf.meta["task"] == "lfw_faces"

    npzs = sorted(p for p in os.listdir(cache) if p.endswith(".npz"))
    assert len(npzs) == 1 and not [p for p in os.listdir(cache) if ".tmp" in p]
    mtime = os.path.getmtime(cache / npzs[0])
    info = demo.backbone_info(str(cache / npzs[0]))
    assert info["settings"]["steps"] == TINY_PRETRAIN["steps"]

    def no_pretraining(*args, **kwargs):
        raise AssertionError("the cached backbone should have been reused")

    monkeypatch.setattr(demo, "pretrain", no_pretraining)
    again = demo.main(tiny_config(), str(tmp_path / "run2"))
    assert "Using the cached pretrained backbone" in capsys.readouterr().out
    assert os.path.getmtime(cache / npzs[0]) == mtime
    assert again["demo"]["task_file_bytes"] == s["task_file_bytes"]
    assert again["demo"]["reloaded_test_accuracy"] == s["reloaded_test_accuracy"]  # deterministic
