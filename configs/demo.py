"""Offline demo: a 1-bit adapter transferred from a backbone pretrained here, no downloads.

Usage::

  python main.py --config=configs/demo.py --workdir=/tmp/bitpet-demo
  python main.py --config=configs/demo.py:bi_lora,task=lfw_faces --workdir=/tmp/bitpet-lfw

``main.py`` hands the config to ``config.entry_point`` (:func:`bitpet.demo.main`): it fetches a
small ViT pretrained on the real MNIST digits 0-4 from ``$BITPET_CACHE`` (default
``~/.cache/bitpet``), pretraining and caching it first if needed (about a minute on two CPU
cores), fine-tunes the adapter with :func:`bitpet.train.train_and_evaluate` on another task of
:mod:`bitpet.data.offline` (default: the unseen digits 5-9), then reloads the written task file
onto a fresh backbone, evaluates it and explains the accuracy and the file size.

Arguments (``configs/demo.py:ARG``): ``method[,task=..][,h=..][,bits=..][,scale=..][,steps=..]``;
methods as in configs/vtab.py. Every value can be overridden afterwards with
``--config.key=value``, e.g. ``--config.pretrain.steps=2000``.
"""

from __future__ import annotations

import ml_collections

from bitpet import demo
from bitpet.data import offline
from configs import vtab
from configs.common import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The demo config for ``arg`` (see the module docstring)."""
    a = parse_arg(
        arg,
        method="bi_adaptformer",
        task="mnist_5to9",
        h=0,
        bits=0,
        scale=10.0,
        steps=300,
        variant=demo.PRETRAIN_DEFAULTS["variant"],
        image_size=demo.PRETRAIN_DEFAULTS["image_size"],
    )
    offline.get_task(a.task)
    vtab_arg = a.method + (f",h={a.h}" if a.h else "") + (f",bits={a.bits}" if a.bits else "")
    config = vtab.get_config(vtab_arg)  # the paper's recipe and every key; task set below

    config.entry_point = "bitpet.demo:main"  # main.py runs this instead of train_and_evaluate
    config.task = a.task
    config.data_source = "offline"
    config.init_file = ""  # filled in by bitpet.demo.prepare() with the cached backbone
    config.image_size = a.image_size
    config.batch_size = 64
    config.eval_batch_size = 500
    config.total_steps = a.steps  # as benchmarks/offline_transfer: 20 epochs of 1,000 images
    config.epochs = 100  # with warmup_epochs = 10: warm-up over the first 10 % of the steps
    config.lr_per_epoch = False
    config.eval_every_epochs = 1000  # evaluate once, at the end
    config.checkpoint_every_steps = 10_000  # only at the end
    config.log_every_steps = 25
    config.progress_every_secs = 10.0
    config.model.variant = a.variant
    config.model.scale = a.scale  # no released value for offline tasks: set explicitly

    # Pretraining of the backbone (variant and image size follow the model above).
    config.pretrain = ml_collections.ConfigDict(
        {k: v for k, v in demo.PRETRAIN_DEFAULTS.items() if k not in ("variant", "image_size")}
    )
    return config
