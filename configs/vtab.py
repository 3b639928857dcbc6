"""VTAB-1k configurations for every method and all 19 tasks (the paper's recipe).

Usage::

  python main.py --config=configs/vtab.py:bi_lora,task=dtd --workdir=/tmp/dtd
  python main.py --config=configs/vtab.py:lora,task=cifar100,h=8,bits=32 --workdir=...
  python main.py --config=configs/vtab.py:bi_lora,task=kitti,h=1,head_bits=1 --workdir=...

Every value can be overridden afterwards with ``--config.key=value``.

Methods: ``adaptformer`` and ``lora`` (float adapters, h=8 by default), ``bi_adaptformer`` and
``bi_lora`` (Gaussian-codebook QAT, 1 bit and h=32 by default, bits 1..8), ``linear`` (head
only) and ``full`` (every parameter).

The adapter scale s is the only per-task hyper-parameter. Unless set, it comes from the
released 1-bit values (``bitpet.scales.SCALES``, resolved when the run starts, so
``--config.task`` works): the h=1 column when h == 1, else the h=32 column; the "bihead"
columns when the head is quantized. Float adapters use the same columns (no other values were
released); override with ``scale=...``.
"""

from __future__ import annotations

import ml_collections

from bitpet.data.vtab import TASK_NAMES
from configs.common import parse_arg

TASKS = TASK_NAMES  # the 19 VTAB-1k tasks, in the paper's order

# method -> (adapter kind, default bits, default h, what is trained)
METHODS = {
    "adaptformer": ("adaptformer", 32, 8, "adapters"),
    "lora": ("lora", 32, 8, "adapters"),
    "bi_adaptformer": ("adaptformer", 1, 32, "adapters"),
    "bi_lora": ("lora", 1, 32, "adapters"),
    "linear": ("none", 32, 0, "head"),
    "full": ("none", 32, 0, "all"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Composes the config for ``arg`` = ``method[,task=..][,h=..][,bits=..][,head_bits=..]...``.

    ``h``, ``bits``, ``scale`` and ``head_bits`` of 0 mean "the method's default".
    """
    a = parse_arg(arg, method="bi_lora", task="cifar100", h=0, bits=0, head_bits=0, scale=0.0,
                  blocks=1, variant="B/16")  # fmt: skip
    if a.method not in METHODS:
        raise ValueError(f"Unknown method {a.method!r}; valid methods: {list(METHODS)}.")
    if a.task not in TASKS:
        raise ValueError(f"Unknown task {a.task!r}; valid tasks: {list(TASKS)}.")
    adapter, bits, h, trainable = METHODS[a.method]
    bits = a.bits or bits
    h = a.h or h
    head_bits = a.head_bits or 32
    if adapter == "none" and (a.bits or a.h):
        raise ValueError(f"Method {a.method!r} has no adapters: drop bits= and h=.")
    if a.method in ("adaptformer", "lora") and bits <= 8:
        raise ValueError(
            f"Method {a.method!r} trains float adapters (bits 16 or 32); "
            f"use bi_{a.method} for bits={bits}."
        )

    config = ml_collections.ConfigDict()
    config.method = a.method
    config.task = a.task
    config.data_source = "vtab"  # "vtab" (TFDS) or "offline" (bundled real images).
    config.split = "final"  # "final": train800val200 -> test; "tune": train800 -> val200.
    config.trainable = trainable  # "adapters" (+ head), "head" or "all".
    config.init_file = ""  # Backbone npz, e.g. ViT-B_16.npz (ImageNet-21k). Empty: random init.
    config.data_dir = ""  # TFDS data_dir; empty: TFDS default.
    config.mock_data = False  # Run the real pipeline on tfds.testing.mock_data.
    config.mock_num_examples = 64
    config.seed = 42

    config.image_size = 224
    config.batch_size = 64
    config.eval_batch_size = 256
    config.epochs = 100
    config.total_steps = 0  # 0: epochs * steps_per_epoch. Set to shorten a run.
    config.lr = 1e-3
    config.weight_decay = 1e-4
    config.warmup_epochs = 10
    config.warmup_lr = 1e-6
    config.min_lr = 1e-5
    config.lr_per_epoch = True  # The original steps its cosine schedule once per epoch.
    config.eval_every_epochs = 10
    config.checkpoint_every_steps = 150
    config.log_every_steps = 15
    config.progress_every_secs = 30.0
    config.distributed = False  # Call jax.distributed.initialize() (multi-host launch).

    config.model = ml_collections.ConfigDict()
    config.model.variant = a.variant
    config.model.adapter = adapter
    config.model.h = h
    config.model.bits = bits
    config.model.blocks = a.blocks
    config.model.scale = a.scale  # 0: the task's released value (bitpet.scales), at run time.
    config.model.dropout = 0.1
    config.model.std_mode = "population"
    config.model.head_bits = head_bits
    config.model.drop_path = 0.1
    config.model.dtype = "float32"
    config.model.remat = False
    return config
